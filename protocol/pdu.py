"""Upper Layer PDUs (PS3.8 9.3): their types, the 6-byte header, the fixed-size PDUs we
build ourselves (A-ASSOCIATE-RJ, A-RELEASE-RQ/RP, A-ABORT), P-DATA-TF framing of
presentation data values, and reading whole PDUs off a blocking socket.

The variable PDUs of association establishment (A-ASSOCIATE-RQ/AC) are encoded and
decoded with pynetdicom's PDU classes (protocol/acse.py, engine/receive/negotiation.py).
"""
from __future__ import annotations

import socket
import struct
import time

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

HEADER = struct.Struct(">BxI")   # PDU type, reserved, PDU length
PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context ID, message control header

# Message Control Header of a PDV (PS3.8 E.2): bit 0 command (else data set), bit 1 last fragment
COMMAND, LAST = 0x01, 0x02
COMMAND_LAST, DATA_LAST, DATA_MORE = COMMAND | LAST, LAST, 0x00

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason/diag.
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_ACSE, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x02, 0x03
TEMPORARY_CONGESTION, LOCAL_LIMIT_EXCEEDED = 0x01, 0x02  # reasons of source 3
NO_REASON_GIVEN, CALLING_AE_TITLE_NOT_RECOGNIZED = 0x01, 0x03  # reasons of source 1

# A-ABORT (PS3.8 9.3.8): source, reason/diag. (meaningful for the service provider only)
ABORT_SERVICE_USER, ABORT_SERVICE_PROVIDER = 0x00, 0x02
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU = 0x00, 0x01, 0x02
UNRECOGNIZED_PDU_PARAMETER, UNEXPECTED_PDU_PARAMETER, INVALID_PDU_PARAMETER_VALUE = 0x04, 0x05, 0x06


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes([0, result, source, reason])


def a_abort(source: int, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8)."""
    return HEADER.pack(A_ABORT, 4) + bytes([0, 0, source, reason])


def a_release(pdu_type: int) -> bytes:
    """An A-RELEASE-RQ or A-RELEASE-RP PDU (PS3.8 9.3.6, 9.3.7): four reserved bytes."""
    return HEADER.pack(pdu_type, 4) + bytes(4)


# The fixed PDUs the archive sends.
A_ASSOCIATE_RJ_LIMIT = a_associate_rj(REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
A_ASSOCIATE_RJ_CALLING_AE = a_associate_rj(REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_TITLE_NOT_RECOGNIZED)
A_ABORT_INVALID_PDU = a_abort(ABORT_SERVICE_PROVIDER, INVALID_PDU_PARAMETER_VALUE)
A_ABORT_UNEXPECTED_PDU = a_abort(ABORT_SERVICE_PROVIDER, UNEXPECTED_PDU)
A_ABORT_USER = a_abort(ABORT_SERVICE_USER)
A_RELEASE_RQ_PDU = a_release(A_RELEASE_RQ)
A_RELEASE_RP_PDU = a_release(A_RELEASE_RP)


def pdv_pdu(context_id: int, control: int, n: int) -> bytes:
    """P-DATA-TF PDU header plus the header of its one PDV item of `n` payload bytes."""
    return HEADER.pack(P_DATA_TF, n + 6) + PDV_HEADER.pack(n + 2, context_id, control)


def p_data(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU carrying one whole command set in one PDV."""
    return pdv_pdu(context_id, COMMAND_LAST, len(command)) + command


class ProtocolError(Exception):
    """The peer broke the upper layer protocol; `abort` is the A-ABORT PDU to send."""

    def __init__(self, message: str, abort: bytes = A_ABORT_INVALID_PDU) -> None:
        super().__init__(message)
        self.abort = abort


class PeerClosed(Exception):
    """The peer closed the connection."""


class DeadlinePassed(TimeoutError):
    """A read with a deadline (`read_pdu`) did not complete in time."""


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """`n` bytes; with a `deadline` (time.monotonic()), all of them by then or
    DeadlinePassed: a peer trickling a byte at a time cannot reset the clock as it can a
    per-recv timeout. The socket's own timeout is put back."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    before = sock.gettimeout() if deadline is not None else None
    try:
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlinePassed(f"{got} of {n} bytes by the deadline")
                sock.settimeout(left if before is None else min(left, before))
            try:
                r = sock.recv_into(view[got:])
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlinePassed(f"{got} of {n} bytes by the deadline") from None
                raise
            if r == 0:
                raise PeerClosed(f"connection closed {got} bytes into a {n}-byte read")
            got += r
    finally:
        if deadline is not None:
            sock.settimeout(before)
    return buf


def _check(pdu_type: int, length: int, limit: int) -> None:
    if not A_ASSOCIATE_RQ <= pdu_type <= A_ABORT:
        raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}")
    if length > limit:
        raise ProtocolError(f"declared PDU length {length} exceeds the limit {limit}")


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
        pdu_type, length = HEADER.unpack_from(self._buf, self._start)
        _check(pdu_type, length, self.limit)
        self._fill(6 + length)
        body = memoryview(self._buf)[self._start + 6:self._start + 6 + length]
        self._start += 6 + length
        return pdu_type, body

    def has_pdu(self) -> bool:
        """Whether a whole PDU is already buffered (the next `read` makes no system call)."""
        have = self._end - self._start
        return have >= 6 and have >= 6 + HEADER.unpack_from(self._buf, self._start)[1]

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


def read_pdu(sock: socket.socket, limit: int, deadline: float | None = None) -> tuple[int, bytearray]:
    """One whole PDU: (type, body). A declared length over `limit` is refused unread; with
    a `deadline` (time.monotonic()), the whole PDU must have arrived by then (DeadlinePassed)."""
    pdu_type, length = HEADER.unpack(recv_exact(sock, 6, deadline))
    _check(pdu_type, length, limit)
    return pdu_type, recv_exact(sock, length, deadline)
