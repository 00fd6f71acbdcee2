"""Running one accepted connection as a pynetdicom association inside a worker.

pynetdicom's own server creates associations from a listening socket; ours arrive as
file descriptors from the acceptor, so we build the Association the way
`transport.RequestHandler._create_association` does, with a bounded socket.
"""
from __future__ import annotations

import logging
import socket
from copy import deepcopy
from typing import Any

from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket

log = logging.getLogger("stowage.association")
# A-ABORT, source: service provider (2), reason: invalid PDU parameter value (6)
A_ABORT_INVALID_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])
_MIN_PDU_LIMIT = 1 << 16  # association requests are not bound by the P-DATA maximum


class BoundedSocket(AssociationSocket):
    """An AssociationSocket that refuses to buffer a PDU longer than we advertised, and
    re-arms TCP_QUICKACK so the peer's next PDU is not held by delayed ACKs."""

    def __init__(self, assoc: Association, client_socket: socket.socket, limit: int) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._limit = max(limit, _MIN_PDU_LIMIT)

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self._limit:
            log.warning("peer %s declared a %d-byte PDU (limit %d): aborting", self.assoc.requestor.address,
                        nr_bytes, self._limit)
            try:
                self.socket.sendall(A_ABORT_INVALID_PDU)
            except OSError:
                pass
            raise OSError(f"declared PDU length {nr_bytes} exceeds the limit {self._limit}")
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        return super().recv(nr_bytes)


def tune(sock: socket.socket, network_timeout: float) -> None:
    """Blocking with a timeout (a peer stalled mid-PDU is dropped), no Nagle."""
    sock.setblocking(True)
    sock.settimeout(network_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def create(ae: AE, sock: socket.socket, contexts: list, handlers: list[tuple[Any, Any]],
           ae_title: str) -> Association:
    """An acceptor-mode Association over `sock`, ready to start()."""
    assoc = Association(ae, MODE_ACCEPTOR)
    assoc.set_socket(BoundedSocket(assoc, sock, ae.maximum_pdu_size))
    assoc.acceptor.maximum_length = ae.maximum_pdu_size
    assoc.acceptor.ae_title = ae_title
    assoc.acceptor.address_info = AddressInformation.from_tuple(sock.getsockname()[:2])
    assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
    assoc.acceptor.implementation_version_name = ae.implementation_version_name
    assoc.acceptor.supported_contexts = deepcopy(contexts)
    assoc.requestor.address_info = AddressInformation.from_tuple(sock.getpeername()[:2])
    for event, handler in handlers:
        assoc.bind(event, *handler) if isinstance(handler, tuple) else assoc.bind(event, handler)
    return assoc
