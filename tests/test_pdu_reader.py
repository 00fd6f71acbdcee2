"""The lean path's PDU reader (protocol/pdu.PduReader) over a real socket pair:
PDUs that arrive together, split anywhere, larger than its buffer, or lying about their
length."""
from __future__ import annotations

import socket
import struct
import threading

import pytest

from stowage.protocol.pdu import PduReader, PeerClosed, ProtocolError


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def test_pdus_together_split_and_large():
    a, b = socket.socketpair()
    big = bytes(range(256)) * 2000  # 512 000 bytes: past the initial buffer
    stream = pdu(4, b"cmd") + pdu(4, b"x" * 9500) + pdu(4, big) + pdu(5, b"\x00" * 4)
    cut = [0, 5, 7, 9000, 20000, 300000, len(stream)]

    def send() -> None:
        for lo, hi in zip(cut, cut[1:]):
            b.sendall(stream[lo:hi])
        b.close()
    t = threading.Thread(target=send)
    t.start()
    reader = PduReader(a, limit=1 << 20)
    got = []
    for _ in range(4):
        pdu_type, body = reader.read()
        got.append((pdu_type, bytes(body)))
    t.join(10)
    assert got == [(4, b"cmd"), (4, b"x" * 9500), (4, big), (5, b"\x00" * 4)]
    with pytest.raises(PeerClosed):
        reader.read()
    a.close()


def test_a_lying_length_is_refused_unread():
    a, b = socket.socketpair()
    b.sendall(struct.pack(">BxI", 4, 0xF0000000))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        PduReader(a, limit=1 << 20).read()
    b.sendall(b"\x09\x00\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="unknown PDU type"):
        PduReader(a, limit=1 << 20).read()
    a.close()
    b.close()
