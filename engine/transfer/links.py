"""The associations C-STOREs go out on: one we opened (lean, protocol/store_scu.py), and a
C-GET requester's (written directly from our thread, or through pynetdicom under TLS)."""
from __future__ import annotations

import logging
import queue
import socket
import ssl
import time
from pathlib import Path
from typing import Protocol

from pynetdicom.association import Association

from stowage.engine.transfer.contexts import accepted_syntaxes
from stowage.engine.transfer.prepared import Prepared
from stowage.protocol import pynetdicom_patches, store_scu

log = logging.getLogger("stowage.send")


class Link(Protocol):
    """One association that C-STOREs go out on."""

    accepted: dict[str, set[str]]

    def store(self, prepared: Prepared, originator: tuple[str, int] | None) -> int | None: ...


class LeanLink:
    """An association we opened (protocol/store_scu.py)."""

    def __init__(self, assoc: store_scu.Association) -> None:
        self.assoc = assoc
        self.comment = ""  # the Error Comment of the last response (forwarding parks it)
        self.accepted: dict[str, set[str]] = {}
        for sop_class, syntax in assoc.accepted:
            self.accepted.setdefault(sop_class, set()).add(syntax)

    def store(self, prepared: Prepared, originator: tuple[str, int] | None) -> int | None:
        try:
            status, self.comment = self.assoc.store(prepared.outgoing(), originator)
        except store_scu.StoreFailed as e:
            log.info("%s", e)
            return None
        return status

    def release(self) -> None:
        self.assoc.release()


class PynetdicomLink:
    """An association someone else opened (C-GET: the requester's)."""

    def __init__(self, assoc: Association, spool: Path) -> None:
        self.assoc = assoc
        self.spool = spool
        self.accepted = accepted_syntaxes(assoc)

    def store(self, prepared: Prepared, originator: tuple[str, int] | None) -> int | None:
        if not self.assoc.is_established:
            return None
        kwargs = {} if originator is None else dict(originator_aet=originator[0], originator_id=originator[1])
        try:
            status = self.assoc.send_c_store(prepared.part10(self.spool), **kwargs)
        except (RuntimeError, ValueError, AttributeError) as e:  # context vanished, association gone
            log.info("send_c_store %s: %s", prepared.instance.sop_instance_uid, e)
            return None
        return int(status.Status) if "Status" in status else None

    def close(self) -> None:
        """Nothing to undo: the association is its opener's."""


def direct_socket(assoc: Association) -> socket.socket | None:
    """The plain TCP socket of an association someone else opened, when messages may be
    written on it from this thread while pynetdicom's DUL thread reads it; None under TLS
    (one SSL connection must not be read and written from two threads) or once it ended."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None or isinstance(sock, ssl.SSLSocket) or not assoc.is_established:
        return None
    return sock


class DirectLink:
    """The requester's association (C-GET), written directly: each C-STORE-RQ goes out
    from this thread as one `sendmsg` (or `sendfile`s), where pynetdicom's `send_c_store`
    makes a P-DATA primitive per PDU for its DUL thread to encode and send (33 hand-offs
    for a CT at a 16 KiB PDU, about 5 ms per instance). pynetdicom's DUL thread still does
    the reading; each C-STORE-RSP is decoded there (protocol/pynetdicom_patches/receive.py, `route`) and queued
    for us. Every other message of the C-GET while it runs (the pending responses) must be
    written here too, in turn."""

    def __init__(self, assoc: Association, sock: socket.socket, timeout: float) -> None:
        self.assoc, self.sock, self.timeout = assoc, sock, timeout
        self.responses = pynetdicom_patches.route(assoc)
        self.accepted = accepted_syntaxes(assoc)
        self.context_ids = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
                            for cx in assoc.accepted_contexts if cx.as_scu is not False}
        self.peer_max_pdu = int(assoc.dimse.maximum_pdu_size or 0)  # the peer's, whichever side opened it
        self.message_id = 0

    def store(self, prepared: Prepared, originator: tuple[str, int] | None) -> int | None:
        ds = prepared.outgoing()
        context_id = self.context_ids.get((ds.sop_class_uid, ds.transfer_syntax_uid))
        if context_id is None or not self._alive():
            return None
        self.message_id = self.message_id % 0xFFFF + 1
        command = store_scu.store_command(self.message_id, ds.sop_class_uid, ds.sop_instance_uid,
                                          originator=originator)
        try:
            store_scu.send_message(self.sock, self.peer_max_pdu, context_id, command, ds)
        except (OSError, store_scu.AssociationError) as e:
            log.info("C-STORE of %s on the requester's association: %s", ds.sop_instance_uid, e)
            return None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                responding_to, status = self.responses.get(timeout=0.5)
            except queue.Empty:
                if not self._alive() or time.monotonic() > deadline:
                    return None  # no response: the association ended, or dimse_timeout passed
                continue
            if responding_to == self.message_id:
                return status
            log.info("a C-STORE-RSP for message %d, not %d: ignored", responding_to, self.message_id)

    def _alive(self) -> bool:
        """Whether a response can still come. `is_established` is not enough: we run in the
        thread that would clear it, so after an A-ABORT only the DUL's state tells."""
        return self.assoc.is_established and self.assoc.dul.state_machine.current_state == "Sta6"

    def close(self) -> None:
        pynetdicom_patches.unroute(self.assoc)
