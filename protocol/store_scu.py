"""A lean Storage SCU association (PS3.8 upper layer, PS3.7 C-STORE) on a blocking
socket: pre-encoded datasets go out as they are, one message at a time. The sending core
(engine/transfer/send.py: `stowage send`, C-MOVE sub-operations) and the load generator
(bench/loadgen.py) both use it; it imports nothing of the archive.

The association is requested and its answer decoded with pynetdicom's PDU classes (the
same ones the archive's lean receive path uses, engine/receive/negotiation.py); everything after
that is a few struct calls: the C-STORE-RQ command set from a template, the dataset in
P-DATA-TF fragments no longer than the peer's maximum PDU, written with one
``sendmsg`` per message (header and payload buffers side by side, no copy of the
dataset), and the C-STORE-RSP read back whole. Datasets held in a file (large ones)
go out with ``os.sendfile`` between the PDV headers.

The socket sets TCP_NODELAY (two small writes would otherwise wait for a delayed ACK)
and re-arms TCP_QUICKACK before each read, so a peer that leaves Nagle on does not
stall on our ACK either.
"""
from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from typing import Iterable, Sequence

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC as AcPdu, A_ASSOCIATE_RJ as RjPdu, A_ASSOCIATE_RQ as RqPdu
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext

from stowage.protocol import dimse
from stowage.protocol.acse import APPLICATION_CONTEXT_NAME, user_information
from stowage.protocol.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from stowage.protocol.pdu import (A_ABORT, A_ABORT_USER, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP,
                                  A_RELEASE_RQ, A_RELEASE_RQ_PDU, COMMAND, COMMAND_LAST, DATA_LAST, DATA_MORE,
                                  HEADER, LAST, P_DATA_TF, PDV_HEADER, pdv_pdu)
from stowage.protocol.sockopts import kernel_timeouts

__all__ = ["Association", "AssociationError", "StoreFailed", "Dataset", "store_command", "send_message"]

_MAX_RESPONSE_PDU = 1 << 20
_IOV_MAX = 512


class AssociationError(Exception):
    """The association could not be established or broke; the message says how."""


class StoreFailed(AssociationError):
    """The association broke during a C-STORE (no response will come)."""


@dataclass(frozen=True)
class Dataset:
    """One pre-encoded dataset: its bytes in memory, or a byte range of a file."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    length: int
    data: bytes | None = None          # the dataset bytes (no file meta), or
    path: str | None = None            # ... a file holding them at `offset`
    offset: int = 0


def store_command(message_id: int, sop_class: str, sop_instance: str, priority: int = 0,
                  originator: tuple[str, int] | None = None) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 9.3.1.1); `originator`
    is the Move Originator's (AE title, Message ID) for a C-MOVE sub-operation."""
    return dimse.store_request(message_id, sop_class, sop_instance, priority, originator)


def parse_response(command: bytes | bytearray) -> tuple[int, int, str]:
    """(Command Field, Status, Error Comment) of a response command set."""
    try:
        fields = dimse.decode(command)
    except dimse.CommandError as e:
        raise AssociationError(f"malformed response command set: {e}") from None
    return int(fields["command_field"]), int(fields.get("status", -1)), str(fields.get("error_comment", ""))


class Association:
    """One association to a Storage SCP, proposing ``contexts`` ((abstract syntax, transfer
    syntax) pairs, one presentation context each; a list of transfer syntaxes in place of
    one proposes them all in that context). ``roles``: SOP classes for which we propose the
    SCP role alone (SCP/SCU Role Selection, PS3.7 D.3.3.4), as a C-GET SCU does for the
    storage classes it is to receive."""

    def __init__(self, host: str, port: int, called_aet: str, calling_aet: str,
                 contexts: Sequence[tuple[str, str | Sequence[str]]], *, max_pdu: int = 1 << 20,
                 timeout: float = 60.0, implementation_version: str = IMPLEMENTATION_VERSION_NAME,
                 tls: ssl.SSLContext | None = None, roles: Sequence[str] = ()) -> None:
        if not 0 < len(contexts) <= 128:
            raise ValueError(f"between 1 and 128 presentation contexts, not {len(contexts)}")
        self.host, self.port = host, port
        self.called_aet, self.calling_aet = called_aet, calling_aet
        self.proposed = [(abstract, [transfer] if isinstance(transfer, str) else list(transfer))
                         for abstract, transfer in contexts]
        self.roles = list(roles)
        self.max_pdu = max_pdu
        self.timeout = timeout  # connect, each send and each wait for an answer
        self.implementation_version = implementation_version
        self.tls = tls
        self.sock: socket.socket | None = None
        self.accepted: dict[tuple[str, str], int] = {}  # (abstract, transfer) -> context ID
        self.contexts: dict[int, tuple[str, str]] = {}  # context ID -> (abstract, transfer)
        self.peer_max_pdu = 0
        self.message_id = 0

    # -- association establishment and release ------------------------------------------
    def open(self) -> "Association":
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise AssociationError(f"{self.called_aet}@{self.host}:{self.port} is unreachable: "
                                   f"{e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise AssociationError(f"TLS with {self.called_aet}@{self.host}:{self.port} failed: "
                                       f"{getattr(e, 'reason', None) or e}") from None
        self.sock = sock
        try:
            self._sendall(self._request())
            pdu_type, body = self._read_pdu()
        except (OSError, AssociationError) as e:
            self.close()
            raise AssociationError(f"association request to {self.called_aet}@{self.host}:{self.port}: {e}") from None
        raw = HEADER.pack(pdu_type, len(body)) + body
        if pdu_type == A_ASSOCIATE_RJ:
            rj = RjPdu()
            rj.decode(raw)
            self.close()
            raise AssociationError(f"{self.called_aet}@{self.host}:{self.port} rejected the association "
                                   f"({rj.result_str.lower()}: {rj.reason_str}; is {self.called_aet!r} its "
                                   f"AE title, and is {self.calling_aet!r} known to it?)")
        if pdu_type != A_ASSOCIATE_AC:
            self.close()
            raise AssociationError(f"{self.called_aet}@{self.host}:{self.port} answered the association "
                                   f"request with PDU type 0x{pdu_type:02X}")
        ac = AcPdu()
        ac.decode(raw)
        primitive = ac.to_primitive()
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = item.maximum_length_received or 0
        for cx in primitive.presentation_context_definition_results_list:
            if cx.result == 0x00 and 0 < cx.context_id <= 2 * len(self.proposed) - 1 and cx.context_id % 2:
                abstract, offered = self.proposed[(cx.context_id - 1) // 2]
                transfer = str(cx.transfer_syntax[0]) if cx.transfer_syntax else offered[0]
                if transfer in offered:
                    self.accepted[(abstract, transfer)] = cx.context_id
                    self.contexts[cx.context_id] = (abstract, transfer)
        if not self.accepted:
            self.abort()
            raise AssociationError(f"{self.called_aet}@{self.host}:{self.port} accepted none of the "
                                   f"{len(self.proposed)} presentation contexts proposed")
        self.set_timeout(self.timeout)
        return self

    def set_timeout(self, seconds: float) -> None:
        """Time out each send and each wait for an answer after `seconds`: kept by the
        kernel on a plain socket (no poll() per call), by Python's ssl module under TLS."""
        self.timeout = seconds
        if self.sock is None:
            return
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(seconds)
        else:
            kernel_timeouts(self.sock, seconds)

    def _request(self) -> bytes:
        rq = A_ASSOCIATE()
        rq.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        rq.calling_ae_title = self.calling_aet
        rq.called_ae_title = self.called_aet
        contexts = []
        for i, (abstract, transfers) in enumerate(self.proposed):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = UID(abstract)
            cx.transfer_syntax = [UID(t) for t in transfers]
            contexts.append(cx)
        rq.presentation_context_definition_list = contexts
        rq.user_information = user_information(self.max_pdu, IMPLEMENTATION_CLASS_UID, self.implementation_version)
        for sop_class in self.roles:
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = UID(sop_class)
            role.scu_role, role.scp_role = False, True
            rq.user_information.append(role)
        request = RqPdu()
        request.from_primitive(rq)
        return request.encode()

    def release(self) -> None:
        """A-RELEASE; falls back to closing the socket if the peer does not answer."""
        if self.sock is None:
            return
        try:
            self._sendall(A_RELEASE_RQ_PDU)
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type in (A_RELEASE_RP, A_ABORT):
                    break
        except (OSError, AssociationError):
            pass
        self.close()

    def abort(self) -> None:
        if self.sock is not None:
            try:
                self.sock.sendall(A_ABORT_USER)
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "Association":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.release() if exc[0] is None else self.abort()

    # -- C-STORE ---------------------------------------------------------------------------
    def context_for(self, ds: Dataset) -> int | None:
        return self.accepted.get((ds.sop_class_uid, ds.transfer_syntax_uid))

    def store(self, ds: Dataset, originator: tuple[str, int] | None = None) -> tuple[int, str]:
        """Send one C-STORE-RQ; return the response's (status, error comment).

        Raises KeyError if no presentation context was accepted for the dataset, and
        StoreFailed if the association breaks, or no response comes within `timeout`.
        """
        if self.sock is None:
            raise StoreFailed("association is closed")
        context_id = self.accepted[(ds.sop_class_uid, ds.transfer_syntax_uid)]
        self.message_id = self.message_id % 0xFFFF + 1
        command = store_command(self.message_id, ds.sop_class_uid, ds.sop_instance_uid, originator=originator)
        try:
            self._send_message(context_id, command, ds)
            return self._read_response()
        except (TimeoutError, BlockingIOError):  # BlockingIOError: the kernel's timeout (set_timeout)
            self.abort()
            raise StoreFailed(f"C-STORE of {ds.sop_instance_uid}: no response within {self.timeout:g} s") from None
        except (OSError, AssociationError) as e:
            self.close()
            raise StoreFailed(f"C-STORE of {ds.sop_instance_uid}: {e}") from None

    def _send_message(self, context_id: int, command: bytes, ds: Dataset) -> None:
        send_message(self.sock, self.peer_max_pdu, context_id, command, ds)

    def _read_response(self) -> tuple[int, str]:
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == A_ABORT:
                raise AssociationError("the peer aborted the association")
            if pdu_type == A_RELEASE_RQ:
                raise AssociationError("the peer asked to release the association")
            if pdu_type != P_DATA_TF:
                raise AssociationError(f"unexpected PDU type 0x{pdu_type:02X}")
            pos, done = 0, False
            while pos + 6 <= len(body):
                length, _cx, header = PDV_HEADER.unpack_from(body, pos)
                if header & COMMAND:
                    command += body[pos + 6:pos + 4 + length]
                    done = done or bool(header & LAST)
                pos += 4 + length
            if done:
                field, status, comment = parse_response(command)
                if field != dimse.C_STORE_RSP or status < 0:
                    raise AssociationError(f"expected a C-STORE-RSP, got command field 0x{field & 0xFFFF:04X}")
                return status, comment

    # -- bytes on the wire -----------------------------------------------------------------
    def _sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            r = self.sock.recv_into(view[got:])
            if r == 0:
                raise AssociationError("the peer closed the connection")
            got += r
        return buf

    def _read_pdu(self) -> tuple[int, bytearray]:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except (AttributeError, OSError):
            pass
        pdu_type, length = HEADER.unpack(self._recv_exact(6))
        if length > _MAX_RESPONSE_PDU:
            raise AssociationError(f"the peer sent a {length}-byte PDU of type 0x{pdu_type:02X}")
        return pdu_type, self._recv_exact(length)


def send_message(sock: socket.socket, peer_max_pdu: int, context_id: int, command: bytes, ds: Dataset) -> None:
    """One DIMSE message, the command set then the dataset in P-DATA-TF PDUs no longer than
    `peer_max_pdu` (0: unlimited), written on `sock` with as few system calls as it takes."""
    frag = max((peer_max_pdu or (1 << 22)) - 6, 1)  # payload bytes per PDV: its item header is 6
    bufs: list[bytes | memoryview] = [pdv_pdu(context_id, COMMAND_LAST, len(command)), command]
    if ds.data is not None:
        view, n = memoryview(ds.data), ds.length
        middle = pdv_pdu(context_id, DATA_MORE, frag)  # every fragment but the last has this header
        start = 0
        while n - start > frag:
            bufs += (middle, view[start:start + frag])
            start += frag
            if len(bufs) >= _IOV_MAX:
                _sendv(sock, bufs)
                bufs = []
        bufs += (pdv_pdu(context_id, DATA_LAST, n - start), view[start:n])
        _sendv(sock, bufs)
        return
    _sendv(sock, bufs)
    with open(ds.path, "rb") as f:
        fd = f.fileno()
        for start in range(0, max(ds.length, 1), frag):
            n = min(frag, ds.length - start)
            sock.sendall(pdv_pdu(context_id, DATA_LAST if start + frag >= ds.length else DATA_MORE, n))
            if isinstance(sock, ssl.SSLSocket):  # the kernel cannot encrypt: read and send
                piece = os.pread(fd, n, ds.offset + start)
                if len(piece) != n:
                    raise AssociationError(f"{ds.path} is shorter than expected")
                sock.sendall(piece)
                continue
            sent = 0
            while sent < n:
                r = os.sendfile(sock.fileno(), fd, ds.offset + start + sent, n - sent)
                if r == 0:
                    raise AssociationError(f"{ds.path} is shorter than expected")
                sent += r


def _sendv(sock: socket.socket, bufs: list) -> None:
    """Write every buffer, in order, with as few system calls as the kernel allows
    (on a blocking socket, one: `Association.set_timeout` keeps the timeout in the kernel)."""
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg over TLS: one write, so whole records
        sock.sendall(b"".join(bufs))
        return
    sent, total = sock.sendmsg(bufs), sum(map(len, bufs))
    if sent == total:
        return
    views = [memoryview(b).cast("B") for b in bufs]
    while True:
        while sent:  # drop what went out
            n = len(views[0])
            if sent >= n:
                sent -= n
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
        if not views:
            return
        sent = sock.sendmsg(views)


def contexts_for(datasets: Iterable[Dataset]) -> list[tuple[str, str]]:
    """The distinct (SOP class, transfer syntax) pairs of ``datasets``, in first-seen order."""
    return list(dict.fromkeys((d.sop_class_uid, d.transfer_syntax_uid) for d in datasets))
