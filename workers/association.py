"""Running one accepted connection as a pynetdicom association inside a worker.

pynetdicom's own server creates associations from a listening socket; ours arrive as
file descriptors from the acceptor, so we build the Association the way
`transport.RequestHandler._create_association` does, with a bounded socket.
"""
from __future__ import annotations

import logging
import socket
from typing import Any

from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket

from stowage.protocol.pdu import A_ABORT, A_ABORT_INVALID_PDU, A_ASSOCIATE_RQ

log = logging.getLogger("stowage.association")
_MIN_PDU_LIMIT = 1 << 16  # association requests are not bound by the P-DATA maximum
_PDU_TYPES = frozenset(range(A_ASSOCIATE_RQ, A_ABORT + 1))  # PS3.8 9.3


class BoundedSocket(AssociationSocket):
    """An AssociationSocket that refuses to buffer a PDU longer than we advertised or of an
    unknown type, and re-arms TCP_QUICKACK so the peer's next PDU is not held by delayed ACKs."""

    def __init__(self, assoc: Association, client_socket: socket.socket, limit: int,
                 pushback: bytes = b"") -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._limit = max(limit, _MIN_PDU_LIMIT)
        self._header_next = True
        self._pushback = pushback  # bytes already read from the peer (its A-ASSOCIATE-RQ)
        self.trail_key = id(client_socket)  # what the worker's audit trail knows the association by

    @property
    def ready(self) -> bool:
        return bool(self._pushback) or super().ready

    def _take(self, n: int) -> bytearray:
        if not self._pushback:
            return super().recv(n)
        head, self._pushback = self._pushback[:n], self._pushback[n:]
        return bytearray(head) + (super().recv(n - len(head)) if len(head) < n else b"")

    def recv(self, nr_bytes: int) -> bytearray:
        header = self._header_next  # pynetdicom reads each PDU as recv(6), then recv(length)
        if nr_bytes > self._limit:
            self._abort(f"declared a {nr_bytes}-byte PDU (limit {self._limit})")
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        data = self._take(nr_bytes)
        if header and len(data) == 6 and data[0] not in _PDU_TYPES:
            self._abort(f"sent an unknown PDU type 0x{data[0]:02X}")
        self._header_next = not header or len(data) < 6
        return data

    def _abort(self, why: str) -> None:
        """A-ABORT, then shut the socket: pynetdicom handles an event one loop late and
        would otherwise block reading whatever follows until the network timeout."""
        log.warning("peer %s %s: aborting", self.assoc.requestor.address, why)
        try:
            self.socket.sendall(A_ABORT_INVALID_PDU)
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise OSError(why)


def tune(sock: socket.socket, network_timeout: float) -> None:
    """Blocking with a timeout (a peer stalled mid-PDU is dropped), no Nagle."""
    sock.setblocking(True)
    sock.settimeout(network_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def create(ae: AE, sock: socket.socket, contexts: list, handlers: list[tuple[Any, Any]],
           ae_title: str, pushback: bytes = b"", source: tuple[str, int] | None = None) -> Association:
    """An acceptor-mode Association over `sock`, ready to start(); `pushback` holds bytes
    already read from the peer, which pynetdicom reads first; `source`: the requestor's
    address when a trusted balancer's PROXY header named it (else the connection's)."""
    assoc = Association(ae, MODE_ACCEPTOR)
    assoc.set_socket(BoundedSocket(assoc, sock, ae.maximum_pdu_size, pushback))
    assoc.acceptor.maximum_length = ae.maximum_pdu_size
    assoc.acceptor.ae_title = ae_title
    assoc.acceptor.address_info = AddressInformation.from_tuple(sock.getsockname()[:2])
    assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
    assoc.acceptor.implementation_version_name = ae.implementation_version_name
    # Negotiation only reads these: share one list instead of the deepcopy pynetdicom
    # makes (costly for our ~200 contexts × 39 syntaxes: docs/benchmarks.md).
    assoc.acceptor.supported_contexts = contexts
    assoc.requestor.address_info = AddressInformation.from_tuple(source or sock.getpeername()[:2])
    for event, handler in handlers:
        assoc.bind(event, *handler) if isinstance(handler, tuple) else assoc.bind(event, handler)
    return assoc
