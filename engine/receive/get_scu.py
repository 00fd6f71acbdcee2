"""C-GET as SCU on the lean path (PS3.4 C.4.3.3, PS3.7 9.1.3): one C-GET-RQ on an
association we opened (protocol/store_scu.py, proposing the SCP role for the storage
classes), then the C-STORE sub-operations the source sends back on it, each stored
byte-exact through the Storage SCP and answered, until the final C-GET-RSP.

The receiving is engine/receive/ingest.py's, message for message: one thread, blocking reads,
no pynetdicom threads or queues (which cost a C-GET migration 4-6 ms of CPU per instance,
most of it waking threads). What a storage association does not do, this adds: it reads
the C-GET-RSPs, tells the caller of progress, and gives up on a source that stalls.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable

from stowage.protocol import dimse, store_scu
from stowage.protocol.pdu import A_ABORT_USER, PduReader, PeerClosed, ProtocolError
from stowage.protocol.status import PENDING_STATUSES
from stowage.engine.receive.ingest import MAX_COMMAND_BYTES, StorageAssociation, _Message
from stowage.engine.receive.negotiation import Accepted
from stowage.engine.receive.spill import SpillBuffer
from stowage.engine.receive.store import StorageSCP

log = logging.getLogger("stowage.get")


@dataclass
class GetOutcome:
    """How one C-GET ended: the final status (None if none came), the latest counts the
    source gave (completed, failed, warning), its Error Comment, and whether we gave up."""

    status: int | None
    counts: tuple[int, int, int] = (0, 0, 0)
    comment: str = ""
    stalled: bool = False


class SubOperations:
    """What a retrieve's responses say of its sub-operations: the latest counts
    (completed, failed, warning); the instances that arrived, told to `on_progress` once
    each; and when anything last moved (a stall is too long without). Any sub-operation
    done, failed ones too, is progress."""

    def __init__(self, on_progress: Callable[[int], None]) -> None:
        self.on_progress = on_progress
        self.counts = (0, 0, 0)
        self._arrived = self._seen = 0
        self._moved = time.monotonic()

    def update(self, completed: int, failed: int, warning: int) -> None:
        self.counts = (completed, failed, warning)
        if completed + warning > self._arrived:
            self.on_progress(completed + warning - self._arrived)
            self._arrived = completed + warning
        if sum(self.counts) > self._seen:
            self._seen, self._moved = sum(self.counts), time.monotonic()

    def moved(self) -> None:
        self._moved = time.monotonic()

    def stalled_for(self, seconds: float) -> bool:
        return time.monotonic() - self._moved > seconds


class GetAssociation(StorageAssociation):
    """The receiving side of C-GETs on `assoc`, an established association whose storage
    contexts we serve as SCP; `stall_timeout`: give up when the source sends nothing, or
    only Pending responses without progress, for that long."""

    def __init__(self, assoc: store_scu.Association, scp: StorageSCP, key: int, stall_timeout: float,
                 on_progress: Callable[[int], None] = lambda n: None,
                 max_command_bytes: int = MAX_COMMAND_BYTES) -> None:
        super().__init__(assoc.sock, Accepted(b"", assoc.contexts), scp, key, calling_ae=assoc.called_aet,
                         called_ae=assoc.calling_aet, max_pdu=assoc.max_pdu, max_command_bytes=max_command_bytes)
        self.assoc = assoc
        self.stall_timeout = stall_timeout
        self.on_progress = on_progress
        self._final: GetOutcome | None = None
        self.subops = SubOperations(on_progress)

    def get(self, sop_class: str, identifier: bytes) -> GetOutcome:
        """Send one C-GET-RQ (`identifier` encoded in the context's transfer syntax) and
        receive until its final response; the association stays usable only if one came."""
        context_id = next((cx for cx, (abstract, _ts) in self.contexts.items() if abstract == sop_class), None)
        if context_id is None:
            return GetOutcome(None, comment=f"the source accepted no presentation context for {sop_class}")
        self.assoc.message_id = self.assoc.message_id % 0xFFFF + 1
        self._final, self.subops = None, SubOperations(self.on_progress)
        self.assoc.set_timeout(self.stall_timeout)
        try:
            ident = store_scu.Dataset(sop_class, "", self.contexts[context_id][1], len(identifier), data=identifier)
            store_scu.send_message(self.sock, self.assoc.peer_max_pdu, context_id,
                                   dimse.get_request(self.assoc.message_id, sop_class), ident)
            return self._receive()
        except PeerClosed:
            self.assoc.close()
            return self._ended("the source closed the connection")
        except ProtocolError as e:
            self._abort(e.abort)
            return self._ended(f"protocol error: {e}")
        except (TimeoutError, socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO
            self._abort(A_ABORT_USER)
            return self._ended(f"no response from the source for {self.stall_timeout:g} s (stall timeout); "
                               "association aborted", stalled=True)
        except OSError as e:
            self.assoc.close()
            return self._ended(f"connection error: {e.strerror or e}")
        finally:
            if self._message and self._message.dataset is not None:
                self._message.dataset.discard()
            self._message = None

    def _ended(self, comment: str, stalled: bool = False) -> GetOutcome:
        return GetOutcome(None, self.subops.counts, comment, stalled)

    def _abort(self, pdu: bytes) -> None:
        self._send(pdu)
        self.assoc.close()

    def _receive(self) -> GetOutcome:
        reader = PduReader(self.sock, self.limit)
        while self._final is None:
            ended = self._next_pdu(reader)
            if ended is not None:
                self.assoc.close()
                return self._ended(f"association {ended} before the final C-GET response")
            if self.subops.stalled_for(self.stall_timeout):
                self._abort(A_ABORT_USER)
                return self._ended(f"C-GET pending without progress for {self.stall_timeout:g} s "
                                   "(stall timeout); association aborted", stalled=True)
        return self._final

    def _command(self, msg: _Message) -> None:
        if msg.fields.get("command_field") == dimse.C_GET_RSP:
            self._response(msg)
        else:
            super()._command(msg)

    def _response(self, msg: _Message) -> None:
        """A C-GET-RSP: its counts, and the end if it is not Pending. An identifier after it
        (the Failed SOP Instance UID List) is read and let go."""
        f = msg.fields
        if f.get("responding_to") != self.assoc.message_id:
            raise ProtocolError(f"C-GET-RSP to message {f.get('responding_to')}, not to ours")
        if any(k in f for k in ("completed", "failed", "warning")):
            self.subops.update(int(f.get("completed", 0)), int(f.get("failed", 0)), int(f.get("warning", 0)))
        status = int(f.get("status", -1))
        if f.get("dataset_type") != dimse.NO_DATASET:
            msg.dataset = SpillBuffer()  # its fragments follow; _store lets them go
        else:
            self._message = None
        if status not in PENDING_STATUSES:
            self._final = GetOutcome(status, self.subops.counts, str(f.get("error_comment", "")))

    def _store(self, msg: _Message, dataset: SpillBuffer | bytes) -> None:
        if msg.fields.get("command_field") == dimse.C_GET_RSP:
            if isinstance(dataset, SpillBuffer):
                dataset.discard()
            return
        self.subops.moved()  # a sub-operation arriving is progress
        super()._store(msg, dataset)
