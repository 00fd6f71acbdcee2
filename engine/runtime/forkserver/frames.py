"""The fork server's wire: frames on one stream socket, each an 8-byte length and JSON,
descriptors attached with SCM_RIGHTS, and the two kinds of argument that are not plain
strings (a passed descriptor, the server's pid)."""
from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass

_HEADER = struct.Struct("!Q")
_MAX_FDS = 16
PRELOAD_ENV = "STOWAGE_FORK_SERVER_PRELOAD"  # the modules the server imports, comma-separated
PARENT = "{fork-server-pid}"  # an argument the child sees as its parent's (the server's) pid


@dataclass(frozen=True)
class Fd:
    """An argument that is a file descriptor of the acceptor's, passed to the child; the
    child's argument is the number it has there."""
    fd: int


def send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    body = json.dumps(obj).encode()
    data = _HEADER.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[dict, list[int]] | None:
    """One frame and the descriptors that came with it; None at the end of the stream."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, _MAX_FDS)
    if not head:
        return None
    if len(head) < _HEADER.size:
        rest = _recv_exactly(sock, _HEADER.size - len(head))
        if rest is None:
            return None
        head += rest
    body = _recv_exactly(sock, _HEADER.unpack(head)[0])
    return (json.loads(body), fds) if body is not None else None
