"""The PROXY protocol's version 2 header (HAProxy's `send-proxy-v2`): who the client is
when a TCP load balancer sits in front of stowage.

Behind a load balancer every connection comes from the balancer's address, so access
control by host, per-address limits and the audit trail would all see the balancer. A
balancer configured to send the PROXY header puts the client's address in a binary
header before the first byte of DICOM (or of the TLS handshake). It is read only on
connections from addresses the operator named (`proxy_protocol_from`): from anyone else
the header would be a forged identity.

Only version 2 (binary) is read; its layout is in HAProxy's doc/proxy-protocol.txt,
section 2.2. A LOCAL header (the balancer's own health check) names no client: the
connection is the balancer's.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from stowage.protocol.pdu import recv_exact

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_FIXED = struct.Struct("!12sBBH")  # signature, version|command, family|protocol, length
_IPV4 = struct.Struct("!4s4sHH")
_IPV6 = struct.Struct("!16s16sHH")
_MAX_LENGTH = 1024  # addresses (36 bytes at most) and a few TLVs; anything longer is not a balancer's
_LOCAL, _PROXY = 0x20, 0x21
_TCP4, _TCP6 = 0x11, 0x21


class ProxyHeaderError(ValueError):
    """The connection did not begin with a valid PROXY protocol v2 header."""


def read(sock: socket.socket, deadline: float | None = None) -> tuple[str, int] | None:
    """The client's (address, port) from the header at the start of `sock`, or None for a
    LOCAL header (a health check). Reads exactly the header, nothing of what follows."""
    fixed = bytes(recv_exact(sock, _FIXED.size, deadline))
    signature, command, family, length = _FIXED.unpack(fixed)
    if signature != SIGNATURE:
        raise ProxyHeaderError("no PROXY protocol v2 header (is the balancer set to send-proxy-v2?)")
    if length > _MAX_LENGTH:
        raise ProxyHeaderError(f"PROXY header announces {length} bytes of addresses (at most {_MAX_LENGTH})")
    return source_from(command, family, bytes(recv_exact(sock, length, deadline)) if length else b"")


def source_from(command: int, family: int, body: bytes) -> tuple[str, int] | None:
    """(address, port) of the source from the header's fields after its length."""
    if command == _LOCAL:
        return None
    if command != _PROXY:
        raise ProxyHeaderError(f"PROXY header version/command 0x{command:02X} (only version 2 is read)")
    if family == _TCP4 and len(body) >= _IPV4.size:
        source, _, port, _ = _IPV4.unpack_from(body)
        return str(ipaddress.IPv4Address(source)), port
    if family == _TCP6 and len(body) >= _IPV6.size:
        source, _, port, _ = _IPV6.unpack_from(body)
        return str(ipaddress.IPv6Address(source)), port
    raise ProxyHeaderError(f"PROXY header for address family 0x{family:02X} with {len(body)} bytes "
                           "(TCP over IPv4 or IPv6 expected)")


def encode(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for a TCP connection (what a balancer sends; tests use it)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version == 4:
        body = _IPV4.pack(src.packed, dst.packed, source[1], destination[1])
        return _FIXED.pack(SIGNATURE, _PROXY, _TCP4, len(body)) + body
    body = _IPV6.pack(src.packed, dst.packed, source[1], destination[1])
    return _FIXED.pack(SIGNATURE, _PROXY, _TCP6, len(body)) + body


class Trusted:
    """The networks whose connections begin with a PROXY header (`proxy_protocol_from`)."""

    def __init__(self, networks: tuple[str, ...] | list[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)
