"""Socket options shared by the receive path (workers/) and the lean sender (protocol/store_scu.py)."""
from __future__ import annotations

import socket
import struct


def kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose reads and writes time out after `seconds`, kept by the
    kernel (SO_RCVTIMEO/SO_SNDTIMEO) instead of Python: a Python socket timeout costs a
    poll() before every recv and send, and each poll a release and re-acquisition of the
    GIL. A read or write that times out then raises BlockingIOError (EAGAIN); a write
    that times out part-way returns the bytes it sent."""
    seconds = max(seconds, 0.001)
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
