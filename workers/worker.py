"""A worker process: receives accepted sockets from the acceptor and runs them as
associations until told to drain.

Control channel (a SOCK_SEQPACKET pair with the acceptor), a kind byte per message:
  acceptor -> worker   b"A" (plain), b"T" (TLS) or b"t" (TLS, answer with an RJ) + token,
                       with the fd (SCM_RIGHTS): a new connection;  b"D": drain and exit
  worker -> acceptor   b"R": ready;  b"E" + token: that connection ended;  b"S" + JSON: counts
The token is b"<connection id> <time.monotonic() at accept>" in ASCII: the acceptor frees
the connection's slots (global and per address) by its id; the worker times the
A-ASSOCIATE-RQ deadline (association_request_timeout) from the accept.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time

from pynetdicom.sop_class import Verification

from stowage.engine.store.archive import Archive
from stowage.engine.runtime import memory_probe
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.logs import setup_logging
from stowage.engine.store.recovery import recover
from stowage.engine.store.slots import claim_exact
from stowage.engine.runtime.tls import server_context
from stowage.protocol import proxy_header, pynetdicom_patches
from stowage.protocol.pdu import (A_ASSOCIATE_RJ_CALLING_AE, A_ASSOCIATE_RJ_LIMIT, DeadlinePassed, PeerClosed,
                                  ProtocolError)
from stowage.protocol.sockopts import kernel_timeouts
from stowage.workers import association
from stowage.engine.receive import access, negotiation, spill
from stowage.engine.runtime.audit import Trail, outcome_of
from stowage.engine.runtime.counts import counts as process_counts
from stowage.workers.contexts import storage_sop_classes
from stowage.engine.receive.ingest import StorageAssociation
from stowage.engine.runtime.malloc import keep_large_buffers_in_heap
from stowage.workers.services import Services, build_ae, supported_contexts
from stowage.engine.iceberg.node_segments import read_other_nodes
from stowage.engine.storage.remote import read_from_bucket

log = logging.getLogger("stowage.worker")
supported_contexts()  # made as this is imported: in the fork server, once for all the workers it forks


class Worker:
    def __init__(self, config: Config, slot: int, control: socket.socket) -> None:
        self.config = config
        self.slot = slot
        self.control = control
        self._send_lock = threading.Lock()
        self._active: set[threading.Thread] = set()
        self._active_lock = threading.Lock()
        self.claim = claim_exact(config.data_dir, slot)  # held for our life: no one else writes this slot
        recover(config.data_dir, slot=slot)
        pynetdicom_patches.install(
            dataset_buffer=spill.prepare(config.data_dir / "spool" / f"{slot:03d}", config.spill_threshold,
                                         max_spool_bytes=config.max_spool_bytes,
                                         min_free_bytes=config.min_free_bytes),
            max_command_bytes=config.max_command_bytes,
            on_command_limit=lambda _peer: process_counts.refused("command_bytes"))
        self.archive = Archive(config, slot)
        self.ae = build_ae(config)
        self.contexts = self.ae.supported_contexts  # built once, shared read-only by every association
        self.storage_uids = frozenset({Verification, *storage_sop_classes()})
        self.trail = Trail()
        self.services = Services(config, self.archive, self.trail)
        self.handlers = self.services.handlers()
        self.service_of = self.services.service_of()
        self.tls = server_context(config)  # for connections to tls_port (the acceptor checked it loads)
        self.proxies = proxy_header.Trusted(config.proxy_protocol_from)

    def _tell(self, message: bytes) -> None:
        with self._send_lock:
            try:
                self.control.send(message)
            except OSError:
                pass  # the acceptor is gone; we drain when its end of the channel closes

    def serve(self) -> int:
        self._tell(b"R")
        threading.Thread(target=self._report, daemon=True, name="metrics-report").start()
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.control, 16, 1)
            except InterruptedError:
                continue
            kind, token = msg[:1], msg[1:]
            if kind in (b"A", b"T", b"t") and fds:  # plain, TLS, TLS over the cap (answer with an RJ)
                try:
                    self._start(fds[0], token, tls=kind != b"A", reject=kind == b"t")
                except Exception:  # never let one connection take the worker down
                    log.exception("could not start an association")
                    self._tell(b"E" + token)
                continue
            for fd in fds:
                os.close(fd)
            if msg == b"D" or not msg:  # drain, or the acceptor died
                return self.drain()

    def _report(self) -> None:
        """The store totals to the acceptor (engine/metrics.py), when they changed, at most
        once a second."""
        last = b""
        while True:
            time.sleep(1.0)
            report = self.trail.counts.report()
            if report != last:
                self._tell(report)
                last = report

    def _start(self, fd: int, token: bytes, tls: bool = False, reject: bool = False) -> None:
        sock = socket.socket(fileno=fd)
        try:
            association.tune(sock, self.config.network_timeout)
            peer = "%s:%d" % sock.getpeername()[:2]
        except OSError as e:  # the peer went away before we got to it
            log.info("connection dropped before association start: %s", e)
            sock.close()
            self._tell(b"E" + token)
            return
        deadline = _accepted_at(token) + self.config.association_request_timeout
        t = threading.Thread(target=self._connection, args=(sock, peer, token, deadline, tls, reject),
                             daemon=True, name=f"assoc-{peer}")
        with self._active_lock:
            self._active.add(t)
        t.start()

    def _connection(self, sock: socket.socket, peer: str, token: bytes, deadline: float, tls: bool,
                    reject: bool) -> None:
        """One connection's thread: the PROXY header first when a trusted balancer sent it
        (the client it names is the peer from then on), then the association."""
        source = None
        if self.proxies and peer.rpartition(":")[0] in self.proxies:
            try:
                source = proxy_header.read(sock, deadline)
            except (proxy_header.ProxyHeaderError, DeadlinePassed, PeerClosed, OSError) as e:
                log.warning("%s (proxy_protocol_from): %s; closing the connection", peer, e)
                sock.close()
                self._ended(token)
                return
            if source is not None:  # None: the balancer's own health check
                peer = "%s:%d via %s" % (*source, peer)
        if tls:
            self._run_tls(sock, peer, token, deadline, reject, source)
        else:
            self._run(sock, peer, token, deadline, source)

    def _run_tls(self, sock: socket.socket, peer: str, token: bytes, deadline: float, reject: bool,
                 source: tuple[str, int] | None = None) -> None:
        """A connection to the TLS port: the handshake, then the association as on the plain
        port, or (`reject`) the A-ASSOCIATE-RJ for a full house. The handshake counts
        against the A-ASSOCIATE-RQ deadline (CPython bounds a whole handshake by the socket
        timeout, not each read of it)."""
        try:
            assert self.tls is not None, "a TLS connection without tls_port"
            sock.settimeout(max(0.001, min(self.config.network_timeout, deadline - time.monotonic())))
            tls_sock = self.tls.wrap_socket(sock, server_side=True)
            tls_sock.settimeout(self.config.network_timeout)
        except (OSError, ssl.SSLError) as e:
            if isinstance(e, TimeoutError) and time.monotonic() >= deadline:
                self._request_timeout(peer, "TLS handshake")
            else:
                reason = getattr(e, "reason", None) or str(e)
                log.warning("%s: TLS handshake failed: %s%s", peer, reason, _TLS_HINTS.get(reason, ""))
            sock.close()
            self._ended(token)
            return
        if not reject:
            return self._run(tls_sock, peer + " TLS", token, deadline, source)
        try:
            negotiation.read_request(tls_sock, max(self.config.max_pdu, 1 << 16), deadline)
            tls_sock.sendall(A_ASSOCIATE_RJ_LIMIT)
            tls_sock.unwrap()
        except DeadlinePassed:
            self._request_timeout(peer)
        except (OSError, ssl.SSLError, ProtocolError, PeerClosed):
            pass
        finally:
            tls_sock.close()
            self._ended(token)

    def _request_timeout(self, peer: str, what: str = "A-ASSOCIATE-RQ") -> None:
        """The peer did not complete its request in association_request_timeout: we close
        the connection without an A-ABORT, as PS3.8 has it when the ARTIM timer expires
        awaiting an A-ASSOCIATE-RQ (Sta2 + Evt18 -> AA-2: close the transport connection);
        there is no association to abort yet, and nothing a trickling peer could use."""
        log.warning("%s: no whole %s within association_request_timeout (%g s); closing the connection",
                    peer, what, self.config.association_request_timeout)
        process_counts.refused("association_request_timeout")

    def _run(self, sock: socket.socket, peer: str, token: bytes, deadline: float,
             source: tuple[str, int] | None = None) -> None:
        """The association on a connection; `source`: the client a PROXY header named."""
        key = id(sock)
        self.trail.opened(key, peer)
        calling, called, outcome, path = "", self.config.aet, "closed", ""
        try:
            req = negotiation.read_request(sock, max(self.config.max_pdu, 1 << 16), deadline)
            calling, called = req.calling_ae, req.called_ae
            caller = _caller(sock, calling, source)
            refusal = self.services.access.admit(caller, self._proposed(req))
            if refusal is not None:
                access.refused(caller, called, "association", refusal.reason)
                _send_quietly(sock, A_ASSOCIATE_RJ_CALLING_AE)
                outcome = "rejected: not authorized"
            elif negotiation.storage_only(req, self.storage_uids) and \
                    {"echo", "store"} <= self.services.access.services(calling, caller.address):
                path, outcome = "lean", self._serve_storage(sock, req, key, peer)
            else:
                req.primitive  # decoded here: what pynetdicom cannot read gets an A-ABORT, not a traceback in its thread
                path, outcome = "pynetdicom", self._serve_pynetdicom(sock, req, source)
        except DeadlinePassed:
            self._request_timeout(peer)
            outcome = "closed: no A-ASSOCIATE-RQ within association_request_timeout"
        except ProtocolError as e:
            log.warning("%s: %s; aborting", peer, e)
            _send_quietly(sock, e.abort)
            outcome = "aborted: protocol error"
        except (PeerClosed, OSError) as e:
            outcome = f"closed before association: {e}"
        except Exception:
            log.exception("association from %s failed", peer)
            outcome = "failed"
        finally:
            self.trail.closed(key, calling, called, outcome, path)
            sock.close()
            self._ended(token)

    def _proposed(self, req: negotiation.Request) -> set[str]:
        """The services (access.py's names) the request's presentation contexts propose."""
        return {self.service_of.get(abstract, "") for abstract in req.abstract_syntaxes} - {""}

    def _ended(self, token: bytes) -> None:
        """This thread's connection is over: drain stops waiting for it, the acceptor frees
        its slots."""
        with self._active_lock:
            self._active.discard(threading.current_thread())
        self._tell(b"E" + token)

    def _serve_storage(self, sock: socket.socket, req: negotiation.Request, key: int, peer: str) -> str:
        """The lean path: answer the A-ASSOCIATE-RQ here and receive without pynetdicom."""
        accepted = negotiation.accept(req, self.contexts, self.config.max_pdu,
                                      self.ae.implementation_class_uid, self.ae.implementation_version_name)
        sock.sendall(accepted.ac)
        if not isinstance(sock, ssl.SSLSocket):  # TLS keeps Python's timeout: OpenSSL retries reads itself
            kernel_timeouts(sock, self.config.network_timeout)
        return StorageAssociation(sock, accepted, self.services.storage, key, req.calling_ae, req.called_ae,
                                  self.config.max_pdu, self.config.max_command_bytes, peer).run()

    def _serve_pynetdicom(self, sock: socket.socket, req: negotiation.Request,
                          source: tuple[str, int] | None = None) -> str:
        assoc = association.create(self.ae, sock, self.contexts, self.handlers, self.config.aet, req.raw, source)
        assoc.start()
        assoc.join()
        return outcome_of(assoc)

    def drain(self) -> int:
        deadline = time.monotonic() + self.config.drain_timeout
        while time.monotonic() < deadline:
            with self._active_lock:
                if not self._active:
                    break
            time.sleep(0.05)
        with self._active_lock:
            left = len(self._active)
        if left:
            log.warning("drain timeout: aborting %d association(s) still open", left)
        try:
            self.archive.close()  # finishes queued records and seals the tail
        except OSError as e:  # e.g. disk full: the segments hold everything; the next start re-indexes
            log.error("could not seal the catalog tail on stop (%s); the next start recovers it from "
                      "the segments", e.strerror or e)
            return 1
        return 0


_TLS_HINTS = {
    "WRONG_VERSION_NUMBER": " (plain DICOM, not TLS, sent to the TLS port?)",
    "HTTP_REQUEST": " (HTTP, not DICOM over TLS)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": " (tls_ca is set: clients must present a certificate it signed)",
    "CERTIFICATE_VERIFY_FAILED": " (the client's certificate does not chain to tls_ca)",
}


def _accepted_at(token: bytes) -> float:
    """When the acceptor accepted the connection (time.monotonic(), one clock for every
    process of the machine), from its hand-over token; now if the token does not say."""
    now = time.monotonic()
    try:
        return min(now, float(token.split()[1]))
    except (IndexError, ValueError):
        return now


def _caller(sock: socket.socket, calling_ae: str, source: tuple[str, int] | None = None) -> access.Caller:
    """Who the association's requestor is: its AE title, address (the one a trusted
    balancer's PROXY header named, else the connection's) and verified certificate."""
    address = source[0] if source else str(sock.getpeername()[0])
    if isinstance(sock, ssl.SSLSocket):
        return access.Caller(calling_ae, address, True, sock.getpeercert() or None)
    return access.Caller(calling_ae, address)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def _trace_memory() -> None:
    """The memory probe (engine/runtime/memory_probe.py), dumped on SIGUSR2."""
    dump = memory_probe.start("worker")
    if dump is not None:
        signal.signal(signal.SIGUSR2, lambda _signum, _frame: dump())


def main() -> None:
    slot, fd = int(sys.argv[1]), int(sys.argv[2])
    config = Config.from_dict(json.loads(os.environ["STOWAGE_WORKER_CONFIG"]))
    read_other_nodes(config, read_from_bucket(config))  # segments evicted after their upload, other nodes'
    setup_logging(config, f"worker-{slot}")
    keep_large_buffers_in_heap()
    faulthandler.enable()  # a fatal signal (SIGSEGV, SIGBUS…) leaves its stack in the log
    _trace_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the acceptor decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=fd)
    try:
        code = Worker(config, slot, control).serve()
    except OSError as e:  # e.g. start-up recovery on a full disk: say it, let the acceptor retry
        log.error("worker %d cannot start: %s", slot, e.strerror or e)
        code = 1
    except Exception:
        log.exception("worker %d failed", slot)
        code = 1
    logging.shutdown()
    os._exit(code)  # pynetdicom's DUL threads are not daemons


if __name__ == "__main__":
    main()
