"""Association establishment (PS3.8 7.1, 9.3.2-9.3.3) read and answered by the worker:
the A-ASSOCIATE-RQ is read and decoded with pynetdicom's PDU classes and negotiated with
pynetdicom's `negotiate_as_acceptor`; a storage-only association is then answered here
and served by the lean receive path (workers/ingest.py); anything else is handed to
pynetdicom with the request bytes pushed back in front of the socket."""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, AsynchronousOperationsWindowNegotiation,
                                       ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification, MaximumLengthNotification)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
A_ASSOCIATE_RQ_TYPE = 0x01
# A-ABORT, source: service provider (2), reason: invalid PDU parameter value (6) / unexpected PDU (2)
A_ABORT_INVALID_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])
A_ABORT_UNEXPECTED_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 2])
_HEADER = struct.Struct(">BxI")
# Items the lean path answers itself; anything else (role selection, extended negotiation,
# user identity) goes to pynetdicom.
_PLAIN_ITEMS = (MaximumLengthNotification, ImplementationClassUIDNotification,
                ImplementationVersionNameNotification, AsynchronousOperationsWindowNegotiation)


class ProtocolError(Exception):
    """The peer broke the upper layer protocol; `abort` is the A-ABORT PDU to send."""

    def __init__(self, message: str, abort: bytes = A_ABORT_INVALID_PDU) -> None:
        super().__init__(message)
        self.abort = abort


class PeerClosed(Exception):
    """The peer closed the connection."""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return buf


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            raise PeerClosed(f"connection closed {got} bytes into a {n}-byte read")
        got += r


class PduReader:
    """Reads whole PDUs of one association through a buffer kept for its life: each
    recv takes whatever has arrived (a small instance's command and data PDUs usually
    come in one), and no PDU costs an allocation, a zero-fill or page faults
    (docs/benchmarks.md). A body is valid until the next read."""

    _INITIAL = 1 << 16

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock, self.limit = sock, limit
        self._buf = bytearray()
        self._start = self._end = 0

    def read(self) -> tuple[int, memoryview]:
        """One whole PDU: (type, body). A declared length over `limit` is refused unread."""
        self._fill(6)
        pdu_type, length = _HEADER.unpack_from(self._buf, self._start)
        if not 0x01 <= pdu_type <= 0x07:
            raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}")
        if length > self.limit:
            raise ProtocolError(f"declared PDU length {length} exceeds the limit {self.limit}")
        self._fill(6 + length)
        body = memoryview(self._buf)[self._start + 6:self._start + 6 + length]
        self._start += 6 + length
        return pdu_type, body

    def _fill(self, need: int) -> None:
        """Have at least `need` unread bytes in the buffer, receiving as much as fits."""
        have = self._end - self._start
        if have >= need:
            return
        if self._start + need > len(self._buf):  # make room: move the unread bytes to the front
            if need > len(self._buf):  # a new buffer: views of the old one may still be alive
                fresh = bytearray(max(need, self._INITIAL, min(2 * len(self._buf), self.limit + 6)))
                fresh[:have] = self._buf[self._start:self._end]
                self._buf = fresh
            else:
                self._buf[:have] = self._buf[self._start:self._end]
            self._start, self._end = 0, have
        view = memoryview(self._buf)
        while self._end - self._start < need:
            r = self.sock.recv_into(view[self._end:])
            if r == 0:
                raise PeerClosed(f"connection closed {self._end - self._start} bytes into a {need}-byte read")
            self._end += r


def read_pdu(sock: socket.socket, limit: int) -> tuple[int, bytearray]:
    """One whole PDU: (type, body). A declared length over `limit` is refused unread."""
    pdu_type, length = _HEADER.unpack(recv_exact(sock, 6))
    if not 0x01 <= pdu_type <= 0x07:
        raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}")
    if length > limit:
        raise ProtocolError(f"declared PDU length {length} exceeds the limit {limit}")
    return pdu_type, recv_exact(sock, length)


@dataclass
class Request:
    """A received A-ASSOCIATE-RQ: its bytes as they came and its decoded primitive."""

    raw: bytes
    primitive: A_ASSOCIATE

    @property
    def calling_ae(self) -> str:
        return str(self.primitive.calling_ae_title).strip()

    @property
    def called_ae(self) -> str:
        return str(self.primitive.called_ae_title).strip()

    @property
    def peer_max_pdu(self) -> int:
        for item in self.primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                return item.maximum_length_received or 0
        return 0


def read_request(sock: socket.socket, limit: int) -> Request:
    pdu_type, body = read_pdu(sock, limit)
    if pdu_type != A_ASSOCIATE_RQ_TYPE:
        raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", A_ABORT_UNEXPECTED_PDU)
    raw = bytes(_HEADER.pack(pdu_type, len(body)) + body)
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(raw)
        primitive = pdu.to_primitive()
    except Exception as e:  # pynetdicom raises assorted errors on malformed items
        raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {e}") from None
    return Request(raw, primitive)


def storage_only(req: Request, storage: frozenset[str]) -> bool:
    """Whether the lean path can serve this association: every proposed abstract syntax is
    a storage or verification class and no negotiation item needs pynetdicom."""
    p = req.primitive
    if str(p.application_context_name) != APPLICATION_CONTEXT_NAME:
        return False
    if not all(isinstance(item, _PLAIN_ITEMS) for item in p.user_information):
        return False
    return all(str(cx.abstract_syntax) in storage for cx in p.presentation_context_definition_list)


@dataclass
class Accepted:
    ac: bytes                                  # the A-ASSOCIATE-AC PDU to send
    contexts: dict[int, tuple[str, str]]       # context ID -> (abstract syntax, transfer syntax)


def user_information(max_pdu: int, implementation_class_uid: str, implementation_version_name: str) -> list:
    """The User Information items every association request or acceptance carries (PS3.7 D.3.3)."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID(implementation_class_uid)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = implementation_version_name
    return [length, impl, version]


def _keep_senders_encoding(proposed: list[PresentationContext], results: list[PresentationContext],
                           supported: list[PresentationContext]) -> None:
    """Accept the requestor's first transfer syntax where it is an encapsulated or deflated
    one we support: the sender holds the instance that way, and our own preference (the
    uncompressed syntaxes first) would make it decompress, or fail to (a C-MOVE source such
    as dcmqrscp proposes RLE and the uncompressed syntaxes in one context; 0xA702 when it
    cannot convert). Where the sender lists an uncompressed syntax first, ours stands.
    PS3.8 9.3.3.2 leaves the choice among proposed syntaxes to the acceptor."""
    ours = {str(cx.abstract_syntax): set(map(str, cx.transfer_syntax)) for cx in supported}
    first = {cx.context_id: str(cx.transfer_syntax[0]) for cx in proposed if cx.transfer_syntax}
    for cx in results:
        wanted = first.get(cx.context_id)
        if (cx.result == 0x00 and wanted and (UID(wanted).is_encapsulated or UID(wanted).is_deflated)
                and wanted in ours.get(str(cx.abstract_syntax), ()) and str(cx.transfer_syntax[0]) != wanted):
            cx.transfer_syntax = [UID(wanted)]


def accept(req: Request, supported: list[PresentationContext], max_pdu: int,
           implementation_class_uid: str, implementation_version_name: str) -> Accepted:
    """Negotiate the presentation contexts and build the A-ASSOCIATE-AC."""
    p = req.primitive
    results, _roles = negotiate_as_acceptor(p.presentation_context_definition_list, supported, {})
    _keep_senders_encoding(p.presentation_context_definition_list, results, supported)
    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    ac.calling_ae_title = p.calling_ae_title
    ac.called_ae_title = p.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    ac.user_information = user_information(max_pdu, implementation_class_uid, implementation_version_name)
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    accepted = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in results if cx.result == 0x00}
    return Accepted(pdu.encode(), accepted)
