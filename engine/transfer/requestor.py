"""Associations the archive opens as association-requestor (PS3.8): the SCU side of
send, C-MOVE sub-operations and commitment reports; one place for timeouts, TCP_NODELAY
and naming the peer.

pynetdicom creates requestor sockets itself and never sets TCP_NODELAY; a command PDU
followed by a small data PDU then waits out the peer's delayed ACK (40 ms per message,
see shared/notes/pynetdicom.md). We set it from EVT_CONN_OPEN, which pynetdicom fires
right after connect(), before the A-ASSOCIATE-RQ goes out. Peers that leave Nagle on
(DCMTK storescp writes a C-STORE-RSP in two pieces) cost the same 40 ms per instance the
other way, until we ACK at once: so our socket also re-arms TCP_QUICKACK before each
read (what each saves: docs/benchmarks.md, figures behind design choices).
"""
from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Sequence

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from stowage.engine.runtime.config import Config, Remote
from stowage.engine.runtime.tls import client_context
from stowage.protocol import pynetdicom_patches
from stowage.protocol.identity import identify

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})$")


class PeerError(RuntimeError):
    """A peer that cannot be named or reached; the message says which and why."""


@dataclass(frozen=True)
class Peer:
    """Where to connect, which AE title to call, and over TLS or not."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


def peer_of(remote: Remote, ae_title: str | None = None) -> Peer:
    """The peer a configured remote names (calling `ae_title` instead of its own, if given)."""
    try:
        tls = client_context(remote)
    except (OSError, ssl.SSLError) as e:
        raise PeerError(f"{remote.ae_title}: cannot load its TLS certificates: {e}") from None
    return Peer(ae_title or remote.ae_title, remote.host, remote.port, tls)


def resolve(target: str, config: Config, called_aet: str | None = None) -> Peer:
    """A configured remote by AE title, or `host:port` (called AE title `called_aet`,
    else ANY-SCP)."""
    remote: Remote | None = config.remotes.get(target)
    if remote is not None:
        return peer_of(remote, called_aet)
    m = _HOST_PORT.match(target)
    if m and 0 < int(m["port"]) < 65536:
        return Peer(called_aet or "ANY-SCP", m["host"].strip("[]"), int(m["port"]))
    known = ", ".join(sorted(config.remotes)) or "none configured"
    raise PeerError(f"unknown AE {target!r}: not in [remotes] of the configuration (known: {known}) "
                    "and not host:port")


def _nodelay(event: evt.Event, connected: list[bool]) -> None:
    connected.append(True)
    sock = event.assoc.dul.socket
    try:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        return
    pynetdicom_patches.quick_ack(sock)


def new_ae(calling_aet: str, *, acse_timeout: float = 30.0, dimse_timeout: float = 30.0,
           network_timeout: float = 60.0) -> AE:
    pynetdicom_patches.install()  # event-driven, and immune to pynetdicom's lost-response race (#875)
    ae = identify(AE(calling_aet))
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = min(acse_timeout, 10.0)
    return ae


def associate(ae: AE, peer: Peer, contexts: Sequence[PresentationContext], *, max_pdu: int = 262144,
              ext_neg: list | None = None, handlers: list[tuple[Any, Any]] | None = None) -> Association:
    """An established association to `peer`, or PeerError saying why not."""
    connected: list[bool] = []
    try:
        assoc = ae.associate(peer.host, peer.port, contexts=list(contexts), ae_title=peer.ae_title,
                             max_pdu=max_pdu, ext_neg=ext_neg,
                             tls_args=(peer.tls, peer.host) if peer.tls is not None else None,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay, [connected]), *(handlers or [])])
    except socket.gaierror as e:  # pynetdicom resolves the name outside its own error handling
        raise PeerError(f"{peer}: the host name {peer.host!r} does not resolve ({e.strerror})") from None
    if assoc.is_established:
        return assoc
    if not connected:
        if peer.tls is not None and _accepts_tcp(peer):
            raise PeerError(f"{peer}: the TLS handshake failed (is it a TLS port, and does it trust our "
                            "certificate as we trust its?)")
        raise PeerError(f"{peer} is unreachable (connection refused or timed out)")
    if assoc.is_rejected:
        raise PeerError(f"{peer} rejected the association (is {peer.ae_title!r} its AE title, "
                        "and are we known to it?)")
    if assoc.is_aborted:
        raise PeerError(f"{peer} aborted the association request")
    raise PeerError(f"{peer} did not answer the association request within {ae.acse_timeout:g} s")


def _accepts_tcp(peer: Peer) -> bool:
    """Whether a plain TCP connection to `peer` opens: pynetdicom reports a failed TLS
    handshake as a failed connection, and the remedy differs (a plain port, a certificate)."""
    try:
        socket.create_connection((peer.host, peer.port), timeout=5).close()
    except OSError:
        return False
    return True


def echo(peer: Peer, calling_aet: str, timeout: float = 10.0) -> int:
    """C-ECHO `peer`; returns the status, raises PeerError if there is none."""
    from pynetdicom.presentation import build_context
    ae = new_ae(calling_aet, acse_timeout=timeout, dimse_timeout=timeout, network_timeout=timeout)
    assoc = associate(ae, peer, [build_context(Verification)])
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise PeerError(f"{peer} sent no C-ECHO response within {timeout:g} s")
    return int(status.Status)
