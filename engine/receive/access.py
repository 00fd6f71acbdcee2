"""Access control: which calling AE may use which service, from where (docs/access.md).

PS3.7 and PS3.8 leave it to the archive whom it serves. Our policy, checked at two points:

- association establishment (`Policy.admit`, from the worker before it answers the
  A-ASSOCIATE-RQ): a configured AE (`[remotes.NAME]`) with `check_host` must call from an
  address its `host` resolves to, and one with `require_certificate` over the TLS port with a
  verified client certificate naming it; an association that proposes no service the caller
  may use is refused too. Refusal: A-ASSOCIATE-RJ, rejected-permanent, service-user,
  calling-AE-title-not-recognized (PS3.8 9.3.4).
- each DIMSE request (`Policy.allows`, from the service handlers): a service the caller may
  not use is answered 0x0124 Refused: Not Authorized (PS3.7 C.5.x, a status every DIMSE
  service may return), with an Error Comment saying what to configure.

A calling AE title that is not configured gets `unknown_ae_loopback_services` from a
loopback address (so `stowage serve` and a tool on the same machine work out of the box) and
`unknown_ae_services` from any other host (echo, store and commitment by default: no C-FIND,
C-MOVE or C-GET for an AE title anyone can claim). Every refusal is an audit line.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from stowage.engine.runtime.config import SERVICES, Config, Remote
from stowage.engine.runtime.logs import audit_line

log = logging.getLogger("stowage.access")

_RESOLVE_TTL_S = 60.0  # a configured host name is looked up again after this long


@dataclass(frozen=True)
class Caller:
    """Who asks: the calling AE title, the address it connects from, and, over the TLS port,
    the client certificate the handshake verified (None when none was verified)."""

    ae_title: str
    address: str
    tls: bool = False
    certificate: Mapping | None = None


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused, for the log, the audit line and the operator."""

    reason: str


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def certificate_names(certificate: Mapping | None) -> set[str]:
    """The common names and DNS/IP subjectAltNames of a certificate as `ssl.getpeercert()` gives it."""
    if not certificate:
        return set()
    names = {value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for kind, value in certificate.get("subjectAltName", ()) if kind in ("DNS", "IP Address")}
    return names


class Policy:
    """The access rules of one configuration. Thread-safe; one per worker."""

    def __init__(self, config: Config) -> None:
        self.remotes = config.remotes
        self.unknown = frozenset(config.unknown_ae_services)
        self.unknown_loopback = frozenset(config.unknown_ae_loopback_services)
        self._addresses: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def services(self, ae_title: str, address: str) -> frozenset[str]:
        """What `ae_title` calling from `address` may use (host and certificate checks are
        `admit`'s, made before any request)."""
        remote = self.remotes.get(ae_title)
        if remote is not None:
            return frozenset(remote.services)
        return self.unknown_loopback if is_loopback(address) else self.unknown

    def allows(self, ae_title: str, address: str, service: str) -> bool:
        return service in self.services(ae_title.strip(), str(address))

    def admit(self, caller: Caller, proposed: Iterable[str]) -> Refusal | None:
        """None when the association may go on; else why it is refused."""
        remote = self.remotes.get(caller.ae_title)
        if remote is not None:
            if remote.check_host and not self._from_host(remote, caller.address):
                return Refusal(f"calling AE {caller.ae_title!r} is configured for host {remote.host!r}, "
                               f"not {caller.address}")
            if remote.require_certificate and not _certificate_names_it(remote, caller):
                return Refusal(f"calling AE {caller.ae_title!r} requires TLS with a client certificate naming "
                               f"{remote.ae_title!r} or {remote.host!r}" +
                               ("" if caller.tls else " (it called the plain port)"))
        wanted = set(proposed) & set(SERVICES)
        allowed = self.services(caller.ae_title, caller.address)
        if wanted and not wanted & allowed:
            return Refusal(f"calling AE {caller.ae_title!r} from {caller.address} may not use "
                           f"{', '.join(sorted(wanted))} ({_whose(remote, caller.address)})")
        return None

    def describe_unknown(self) -> str:
        """The start-up line's words for what an AE title we do not know may do."""
        return (f"unknown calling AEs may use {_names(self.unknown_loopback)} from this machine (loopback) "
                f"and {_names(self.unknown)} from other hosts")

    def _from_host(self, remote: Remote, address: str) -> bool:
        return address.split("%")[0] in self._resolve(remote.host) or \
            (is_loopback(address) and remote.host in ("localhost", "127.0.0.1", "::1"))

    def _resolve(self, host: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            cached = self._addresses.get(host)
        if cached is not None and now - cached[0] < _RESOLVE_TTL_S:
            return cached[1]
        try:
            found = frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
        except (OSError, UnicodeError):
            log.warning("cannot resolve the host %r of a configured remote AE; its associations are refused", host)
            found = frozenset()
        found |= {f"::ffff:{a}" for a in found if ":" not in a}
        with self._lock:
            self._addresses[host] = (now, found)
        return found


def _certificate_names_it(remote: Remote, caller: Caller) -> bool:
    return caller.tls and bool(certificate_names(caller.certificate) & {remote.ae_title, remote.host})


def _whose(remote: Remote | None, address: str) -> str:
    if remote is not None:
        return f"its [remotes.{remote.ae_title}] services"
    return "unknown_ae_loopback_services" if is_loopback(address) else "unknown_ae_services"


def _names(services: frozenset[str]) -> str:
    return ", ".join(s for s in SERVICES if s in services) or "nothing"


def refusal_comment(ae_title: str, address: str, service: str, policy: Policy) -> str:
    """The Error Comment (LO, 64 characters) of a 0x0124 answer: what the peer's operator
    must ask ours for."""
    remote = policy.remotes.get(ae_title.strip())
    where = f"services of remotes.{ae_title.strip()}" if remote else "unknown AE: configure it as a remote"
    return f"{service} not authorized ({where})"[:64]


def refused(caller: Caller, called_ae: str, what: str, reason: str) -> None:
    """The audit line and log line of one refusal (an association or one request)."""
    log.warning("refused %s from %s at %s: %s", what, caller.ae_title or "-", caller.address, reason)
    audit_line(f"access refused {what} {caller.ae_title}", {
        "event": "access-refused", "what": what, "calling_ae": caller.ae_title, "called_ae": called_ae,
        "peer": caller.address, "tls": caller.tls, "reason": reason})
