"""Patch 7 (the package's docstring): one connection's socket re-arms TCP_QUICKACK before
each read."""
from __future__ import annotations

import socket

from pynetdicom.transport import AssociationSocket


class QuickAckSocket(AssociationSocket):
    """An AssociationSocket that ACKs every read at once (no 40 ms delayed ACK)."""

    def recv(self, nr_bytes: int) -> bytearray:
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except (AttributeError, OSError):
            pass
        return super().recv(nr_bytes)


def quick_ack(sock: AssociationSocket) -> None:
    """Make `sock` (a plain AssociationSocket) ACK every read at once: same state, one
    method more; only this connection."""
    if type(sock) is AssociationSocket:
        sock.__class__ = QuickAckSocket
