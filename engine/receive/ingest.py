"""The lean receive path for storage-only associations (PS3.8 P-DATA, PS3.7 C-STORE and
C-ECHO): one thread per association, blocking reads, no polling.

pynetdicom spends two threads and several 1 ms sleeps on every message; an ingest
association needs none of that. Here a P-DATA-TF PDU is read whole (its declared length
checked against our limit first), its PDVs reassembled into a command set and a dataset,
the dataset handed byte-exact to the Storage SCP (engine/receive/store.py; spilling to disk when
large), and the response sent from a template. Everything other than C-STORE, C-ECHO,
A-RELEASE and A-ABORT ends the association with an A-ABORT.
"""
from __future__ import annotations

import logging
import socket

from stowage.protocol import dimse
from stowage.protocol.pdu import (A_ABORT, A_ABORT_UNEXPECTED_PDU, A_ABORT_USER, A_RELEASE_RP_PDU, A_RELEASE_RQ,
                                  COMMAND, LAST, P_DATA_TF, PDV_HEADER, PduReader, PeerClosed, ProtocolError,
                                  p_data)
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.receive.negotiation import Accepted
from stowage.engine.receive.spill import SpillBuffer
from stowage.engine.receive.store import StorageSCP

log = logging.getLogger("stowage.ingest")
_PDU_SLACK = 1024  # PDV item headers on top of the advertised maximum
MAX_COMMAND_BYTES = Config.max_command_bytes  # its default, for callers that pass none


class PeerOverLimit(ProtocolError):  # not catalog.limits.LimitExceeded: that one is a data set's
    """The peer made us reach one of our resource limits (engine/runtime/counts.LIMITS):
    the association is aborted (A-ABORT, source service user: it is our policy, not a
    protocol violation) and the refusal counted under `limit`."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message, A_ABORT_USER)
        self.limit = limit


class _Message:
    """One DIMSE message being reassembled from PDVs."""

    def __init__(self, context_id: int) -> None:
        self.context_id = context_id
        self.command = bytearray()
        self.fields: dict | None = None
        self.wants_dataset = False  # its command announced a dataset
        self.dataset: SpillBuffer | None = None  # made at its first fragment that is not also its last


class StorageAssociation:
    def __init__(self, sock: socket.socket, accepted: Accepted, scp: StorageSCP, key: int, calling_ae: str,
                 called_ae: str, max_pdu: int, max_command_bytes: int = MAX_COMMAND_BYTES, peer: str = "") -> None:
        self.sock = sock
        self.contexts = accepted.contexts
        self.scp, self.key = scp, key  # key: this association's in the audit trail
        self.calling_ae, self.called_ae = calling_ae, called_ae
        self.peer = f"{calling_ae} ({peer})" if peer else calling_ae  # who, in log lines
        self.limit = max(max_pdu, 1 << 16) + _PDU_SLACK
        self.max_command_bytes = max_command_bytes
        self.outcome = "closed"
        self._message: _Message | None = None

    def run(self) -> str:
        """Serve until release, abort or error; never raises for peer behaviour."""
        try:
            self._loop()
        except PeerClosed:
            self.outcome = "closed by peer"
        except PeerOverLimit as e:
            log.warning("%s: %s; aborting", self.peer, e)
            process_counts.refused(e.limit)
            self._send(e.abort)
            self.outcome = f"aborted: {e.limit} limit"
        except ProtocolError as e:
            log.warning("%s: %s; aborting", self.peer, e)
            self._send(e.abort)
            self.outcome = "aborted: protocol error"
        except (TimeoutError, socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO/SO_SNDTIMEO
            log.warning("%s: no data for the network timeout; aborting", self.peer)
            self._send(A_ABORT_UNEXPECTED_PDU)
            self.outcome = "aborted: network timeout"
        except OSError as e:
            self.outcome = f"connection error: {e.strerror or e}"
        finally:
            if self._message and self._message.dataset is not None:
                self._message.dataset.discard()
        return self.outcome

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def _loop(self) -> None:
        reader = PduReader(self.sock, self.limit)
        while (ended := self._next_pdu(reader)) is None:
            pass
        self.outcome = ended

    def _next_pdu(self, reader: PduReader) -> str | None:
        """Read and act on one PDU; how the association ended ("released", "aborted by
        peer"), or None while it goes on."""
        if not reader.has_pdu():  # about to recv: re-arm quick ACKs (the kernel drops them)
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        pdu_type, body = reader.read()
        if pdu_type == P_DATA_TF:
            self._p_data(body)
            return None
        if pdu_type == A_RELEASE_RQ:
            self._send(A_RELEASE_RP_PDU)
            return "released"
        if pdu_type == A_ABORT:
            return "aborted by peer"
        raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} on an established association",
                            A_ABORT_UNEXPECTED_PDU)

    def _p_data(self, body: memoryview) -> None:
        view, pos, end = body, 0, len(body)
        while pos < end:
            if pos + 6 > end:
                raise ProtocolError("P-DATA-TF ends inside a PDV item header")
            length, context_id, header = PDV_HEADER.unpack_from(view, pos)
            if length < 2 or pos + 4 + length > end:
                raise ProtocolError(f"PDV item length {length} does not fit its PDU")
            self._pdv(context_id, header, view[pos + 6:pos + 4 + length])
            pos += 4 + length

    def _pdv(self, context_id: int, header: int, fragment: memoryview) -> None:
        if context_id not in self.contexts:
            raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
        msg = self._message
        if msg is None:
            msg = self._message = _Message(context_id)
        elif msg.context_id != context_id:
            raise ProtocolError("PDVs of one message on different presentation contexts")
        if header & COMMAND:
            if msg.fields is not None:
                raise ProtocolError("command fragment after the command set was complete")
            if len(msg.command) + len(fragment) > self.max_command_bytes:  # one comparison per PDV
                raise PeerOverLimit("command_bytes", f"command set longer than max_command_bytes "
                                    f"({self.max_command_bytes} bytes) without its last fragment")
            msg.command += fragment
            if header & LAST:
                self._command_complete(msg)
        else:
            if not msg.wants_dataset:
                raise ProtocolError("dataset fragment without a command that announced one")
            if header & LAST and msg.dataset is None:  # the whole dataset in one PDV: one copy, no buffer
                self._message = None
                self._store(msg, bytes(fragment))
                return
            if msg.dataset is None:
                msg.dataset = SpillBuffer()
            msg.dataset.write(fragment)
            if header & LAST:
                self._message = None
                self._store(msg, msg.dataset)

    def _command_complete(self, msg: _Message) -> None:
        try:
            msg.fields = dimse.decode(msg.command)
        except dimse.CommandError as e:
            raise ProtocolError(str(e)) from None
        self._command(msg)

    def _command(self, msg: _Message) -> None:
        """Act on a whole command set (decoded into msg.fields)."""
        if "message_id" not in msg.fields:
            raise ProtocolError("command set lacks Message ID")
        field = msg.fields["command_field"]
        if field == dimse.C_ECHO_RQ:
            self._message = None
            self._send(p_data(msg.context_id, dimse.echo_response(
                msg.fields["message_id"], self.contexts[msg.context_id][0])))
        elif field == dimse.C_STORE_RQ and msg.fields.get("dataset_type") != dimse.NO_DATASET:
            msg.wants_dataset = True
        elif field == dimse.C_CANCEL_RQ:
            self._message = None  # nothing cancellable runs on a storage association
        else:
            raise ProtocolError(f"command 0x{field:04X} is not served on a storage association",
                                A_ABORT_UNEXPECTED_PDU)

    def _store(self, msg: _Message, dataset: SpillBuffer | bytes) -> None:
        f = msg.fields
        sop_class = str(f.get("affected_sop_class_uid", ""))
        sop_instance = str(f.get("affected_sop_instance_uid", ""))
        result = self.scp.store(self.key, dataset, self.contexts[msg.context_id][1], sop_class, sop_instance,
                                self.calling_ae, self.called_ae)
        self._send(p_data(msg.context_id, dimse.store_response(
            f["message_id"], sop_class, sop_instance, result.status, result.comment)))
