"""The acceptor/supervisor process: accepts TCP connections, admits them under the global
association cap, hands each to the least-loaded worker (SCM_RIGHTS), restarts workers
that die, and drains on SIGTERM/SIGINT. It does no per-instance work.

Connections to the TLS port (`tls_port`) are handed over the same way, marked so (b"T"):
the worker does the TLS handshake, so a slow or hostile handshake never holds up this
loop. Over the cap, a TLS connection still goes to a worker (b"t"), which completes the
handshake only to answer the request with the A-ASSOCIATE-RJ a plain one gets from here.
With `port = 0` there is no plain port: TLS only.

Each connection handed over holds a slot of the global cap (`max_associations`) and one
of its IP address's (`max_associations_per_address`) until the worker says it ended
(b"E" + its id) or the worker dies. Past the address's cap a connection is refused here,
never handed over: a plain one with the A-ASSOCIATE-RJ of the global cap, a TLS one just
closed (an RJ over TLS would cost the handshake the flood is made of). A peer that does not
complete its A-ASSOCIATE-RQ within `association_request_timeout` of the accept is closed
by its worker, which frees the slots.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import count
from typing import Callable

from stowage.catalog import duckdb_spill
from stowage.engine.receive.access import Policy
from stowage.engine import metrics
from stowage.engine.runtime.config import Config, ConfigError
from stowage.engine.runtime import forkserver
from stowage.engine.runtime.counts import REPORT
from stowage.engine.runtime.forkserver import Fd, ForkedProcess
from stowage.engine.store.recovery import recover
from stowage.engine.forward.process import ForwardProcess, ForwardStartError
from stowage.engine.iceberg.process import IcebergProcess
from stowage.engine.lifecycle.scrub import ScrubProcess
from stowage.engine.storage.restore import RestoreError, restore_from_bucket
from stowage.engine.storage.uploader import UploaderProcess
from stowage.engine.runtime.tls import http_context, server_context
from stowage.engine.web.processes import HttpProcesses, HttpStartError
from stowage.protocol.pdu import A_ASSOCIATE_RJ_LIMIT
from stowage.protocol.proxy_header import Trusted

log = logging.getLogger("stowage.acceptor")
_REJECT_LINGER_S = 2.0
# accept() errors that belong to the one connection (Linux passes its pending network
# error up, accept(2)): retried like EAGAIN, never a reason for the acceptor to stop.
_PEER_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                        errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH})
_READY_TIMEOUT_S = 120.0


_HELPERS_WAIT_S = 10.0  # the helpers start then even if the fork server has not said it has imported all


class ServeError(RuntimeError):
    """The archive cannot start; the message says why and what to do."""


@dataclass
class WorkerSlot:
    slot: int
    process: ForkedProcess | None = None
    control: socket.socket | None = None
    ready: bool = False
    active: int = 0
    started_at: float = 0.0
    restarts: list[float] = field(default_factory=list)


class Acceptor:
    def __init__(self, config: Config, on_drain: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_drain = on_drain  # called as the drain begins
        self.sel = selectors.DefaultSelector()
        self.slots = [WorkerSlot(i) for i in range(config.worker_count)]
        self.listener: socket.socket | None = None
        self.tls_listener: socket.socket | None = None
        self.draining = False
        self._rejected: dict[socket.socket, float] = {}
        self._unanswered: set[socket.socket] = set()  # rejected, RJ not sent yet
        self._pending_restart: dict[int, float] = {}
        self._conns: dict[int, tuple[int, str]] = {}  # connection id -> (worker slot, peer IP address)
        self._per_address: Counter[str] = Counter()   # connections handed over and open, by IP address
        self._ids = count(1)
        self._wake_r, self._wake_w = socket.socketpair()
        self.metrics = metrics.ArchiveMetrics(config.data_dir, lambda: (
            sum(ws.active for ws in self.slots), sum(ws.ready for ws in self.slots)))
        self._lock_file = None
        self.scrub = ScrubProcess(config)  # the background scrub (scrub_rate), one process
        self.forward = ForwardProcess(config)  # [[forward]] rules: docs/forwarding.md
        self.iceberg = IcebergProcess(config)  # iceberg_catalog: docs/scale-out.md
        self.upload = UploaderProcess(config)  # sealed segments to object storage (storage = s3://...)
        self.http = HttpProcesses(config, self.sel, self.metrics)  # DICOMweb and the web pages (http_port)
        self.proxies = Trusted(config.proxy_protocol_from)  # load balancers sending PROXY headers

    # -- start-up -----------------------------------------------------------------

    def _lock_data_dir(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.config.data_dir / "serve.lock", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServeError(f"another stowage process is serving {self.config.data_dir}; stop it first") from None

    def _listen(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.bind, port))
        except OSError as e:
            sock.close()
            raise ServeError(f"cannot listen on {self.config.bind}:{port}: {e.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    def _spawn(self, ws: WorkerSlot) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, STOWAGE_WORKER_CONFIG=json.dumps(self.config.to_dict()))
        ws.process = forkserver.spawn("stowage.workers.worker", [str(ws.slot), Fd(child.fileno())], env)
        child.close()
        ws.control, ws.ready, ws.active, ws.started_at = parent, False, 0, time.monotonic()
        parent.setblocking(False)
        self.sel.register(parent, selectors.EVENT_READ, ("worker", ws))
        log.info("worker %d started (pid %d)", ws.slot, ws.process.pid)

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        self._lock_data_dir()
        duckdb_spill.remove_stale(self.config.data_dir)  # of processes killed before they could
        try:
            restore_from_bucket(self.config)  # a node's data directory lost: its uploaded segments found again
        except RestoreError as e:
            raise ServeError(str(e)) from None
        if self.config.iceberg_catalog and self.config.storage:  # and its deletions, from the Iceberg table
            from stowage.engine.iceberg.restore import DeletionsUnknown, restore_if_lost
            try:
                restore_if_lost(self.config)
            except DeletionsUnknown as e:
                raise ServeError(f"{e}: this data directory was lost, and serving before its deletions are found "
                                 "again would show deleted instances; start again once the catalog is reachable") \
                    from None
        try:
            recovered = recover(self.config.data_dir)
        except OSError as e:
            raise ServeError(f"start-up recovery could not index {self.config.data_dir}: "
                             f"{e.strerror or e}; free some space and start again") from None
        if recovered:
            log.info("start-up recovery indexed %d record(s)", recovered)
        try:
            server_context(self.config)  # certificates that do not load stop us here, not in a worker
            http_context(self.config)
        except ConfigError as e:
            raise ServeError(str(e)) from None
        if self.config.port:  # 0: TLS only (the configuration requires tls_port then)
            self.listener = self._listen(self.config.port)
        if self.config.tls_port:
            self.tls_listener = self._listen(self.config.tls_port)
        if self.config.metrics_port:
            try:
                metrics.serve(self.metrics, self.config.bind, self.config.metrics_port)
            except OSError as e:
                raise ServeError(f"cannot serve metrics on {self.config.bind}:{self.config.metrics_port}: "
                                 f"{e.strerror or e}") from None
        if self.config.http_port:
            try:
                self.http.bind()  # a busy port stops us here, before any worker starts
            except HttpStartError as e:
                raise ServeError(str(e)) from None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda *_: self._wake())
        forkserver.server().on_exit = self._wake  # our workers and helpers are the fork server's children
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        for ws in self.slots:
            self._spawn(ws)
        self._wait_ready()
        if self.draining:  # SIGTERM or Ctrl-C while the workers started: stop, never say "listening"
            return self._drain()
        try:
            self.forward.start_cursor()  # before the listeners: its cursor must precede the first store
        except (OSError, ForwardStartError) as e:
            self.draining = True
            self._drain()
            raise ServeError(f"forwarding cannot start: {e}") from None
        if self.listener is not None:
            self.sel.register(self.listener, selectors.EVENT_READ, ("listen", False))
        if self.tls_listener is not None:
            self.sel.register(self.tls_listener, selectors.EVENT_READ, ("listen", True))
        log.info("%s listening on %s with %d workers, data in %s", self.config.aet, self._ports(),
                 len(self.slots), self.config.data_dir)
        log.info("access: %s; %d configured remote AE(s) (docs/access.md)", Policy(self.config).describe_unknown(),
                 len(self.config.remotes))
        if self.proxies:
            log.info("connections from %s begin with a PROXY v2 header naming the client (proxy_protocol_from); "
                     "max_associations_per_address does not apply to them", ", ".join(self.config.proxy_protocol_from))
        helpers_by = time.monotonic() + _HELPERS_WAIT_S
        while not self.draining:
            self._tick(0.5)
            if helpers_by and (forkserver.server().preloaded.is_set() or time.monotonic() > helpers_by):
                self._start_helpers()
                helpers_by = 0.0
        return self._drain()

    def _start_helpers(self) -> None:
        """The scrub, Iceberg, uploader, forwarding and HTTP processes: once the DICOM port is
        served and the fork server has imported their modules (asked before, a fork waits for
        the import in progress, ~1 s at start-up, while no association is accepted)."""
        self.scrub.start()
        self.iceberg.start()
        self.upload.start()
        self.forward.start()
        if self.config.http_port:
            self.http.start()

    def _ports(self) -> str:
        """The ports served, for the start-up line: plain and/or TLS."""
        where = [f"{self.config.bind}:{self.config.port} (plain)"] if self.listener is not None else []
        if self.tls_listener is not None:
            where.append(f"{self.config.bind}:{self.config.tls_port} (TLS)")
        return " and ".join(where) + ("" if self.listener is not None else " only; no plain port (port = 0)")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not all(ws.ready for ws in self.slots):
            if time.monotonic() > deadline:
                raise ServeError("workers did not become ready; see the log above")
            if self.draining:
                return
            self._tick(0.2)

    def _tick(self, timeout: float) -> None:
        for key, _mask in self.sel.select(timeout):
            kind, ws = key.data
            if kind == "listen":
                self._accept(key.fileobj, ws)
            elif kind == "worker":
                self._from_worker(ws)
            elif kind == "http":
                self.http.read(ws)
            elif kind == "wake":
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            elif kind == "rejected":
                self._finish_reject(key.fileobj)
        self._reap()
        self._expire_rejects()

    def _on_signal(self, signum: int, _frame) -> None:
        if not self.draining:
            log.info("signal %d: draining", signum)
        self.draining = True
        self._wake()

    def _wake(self) -> None:
        """Make the loop look round now (a signal, a child ended); the loop may be in select()."""
        try:
            self._wake_w.send(b"w")
        except OSError:  # full: it is awake already
            pass

    # -- admission ----------------------------------------------------------------

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        while True:
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; refusing connections for a moment", e.strerror)
                    time.sleep(0.1)
                    return
                if e.errno in _PEER_GONE:  # that connection failed before we took it: the next one
                    log.info("accept: %s", e.strerror)
                    continue
                raise
            self._admit(conn, tls, str(addr[0]), time.monotonic())

    def _admit(self, conn: socket.socket, tls: bool, address: str, accepted_at: float) -> None:
        if address not in self.proxies and self._address_full(address):  # a balancer caps per client itself
            self._refuse_address(conn, tls, address)
            return
        live, total = self._load()
        if total >= self.config.max_associations and live:
            # A peer that released one and at once opens another must not find its own
            # old one counted: take the workers' notices not read yet, then count again.
            for ws in live:
                self._from_worker(ws)
            live, total = self._load()
        if total >= self.config.max_associations or not live:
            why = "association cap reached" if live else "no worker is ready"
            self.metrics.rejected += 1
            # b"t": the worker completes the TLS handshake only to send the RJ
            if tls and live and self._hand_over(conn, live, b"t", address, accepted_at):
                log.warning("A-ASSOCIATE-RJ over TLS: %s", why)
            else:
                self._reject(conn, why)
            return
        if self._hand_over(conn, live, b"T" if tls else b"A", address, accepted_at):
            self.metrics.admitted += 1
        else:
            self.metrics.rejected += 1
            self._reject(conn, "no worker took the connection")

    def _load(self) -> tuple[list[WorkerSlot], int]:
        """The workers that can take a connection, and the associations open."""
        return [ws for ws in self.slots if ws.ready and ws.control is not None], sum(ws.active for ws in self.slots)

    def _address_full(self, address: str) -> bool:
        """Whether `address` holds max_associations_per_address connections already (after
        the workers' notices not read yet: a peer that just released one is not counted twice)."""
        cap = self.config.max_associations_per_address
        if not cap or self._per_address.get(address, 0) < cap:
            return False
        for ws in self._load()[0]:
            self._from_worker(ws)
        return self._per_address.get(address, 0) >= cap

    def _refuse_address(self, conn: socket.socket, tls: bool, address: str) -> None:
        self.metrics.rejected += 1
        self.metrics.refused("associations_per_address")
        why = (f"{self._per_address[address]} connections open from {address} "
               f"(max_associations_per_address {self.config.max_associations_per_address})")
        if tls:  # an RJ over TLS would take a worker's handshake: the flood's own weapon
            log.warning("closing a TLS connection from %s: %s", address, why)
            conn.close()
        else:
            self._reject(conn, why)

    def _hand_over(self, conn: socket.socket, live: list[WorkerSlot], kind: bytes, address: str,
                   accepted_at: float) -> bool:
        """Pass `conn` to the least-loaded worker that takes it; it holds a slot of the
        global cap and one of its address's until the worker says it ended."""
        conn_id = next(self._ids)
        token = f"{conn_id} {accepted_at:.6f}".encode()
        for ws in sorted(live, key=lambda w: w.active):
            try:
                socket.send_fds(ws.control, [kind + token], [conn.fileno()])
            except OSError:
                continue
            ws.active += 1
            self._conns[conn_id] = (ws.slot, address)
            self._per_address[address] += 1
            conn.close()
            return True
        return False

    def _ended(self, ws: WorkerSlot, token: bytes) -> None:
        """The worker says a connection ended: free its slots."""
        ws.active = max(0, ws.active - 1)
        try:
            entry = self._conns.pop(int(token.split()[0]), None)
        except (IndexError, ValueError):
            return
        if entry is not None:
            self._forget_address(entry[1])

    def _forget_address(self, address: str) -> None:
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    def _worker_lost(self, ws: WorkerSlot) -> None:
        """A worker died: the connections it held are gone with it, and so are their slots."""
        ws.active = 0
        for conn_id, (slot, address) in list(self._conns.items()):
            if slot == ws.slot:
                del self._conns[conn_id]
                self._forget_address(address)

    def _reject(self, conn: socket.socket, why: str) -> None:
        try:
            peer = conn.getpeername()[0]
        except OSError:  # the peer has already gone: nothing to answer, and no reason to stop
            conn.close()
            return
        log.warning("A-ASSOCIATE-RJ to %s: %s", peer, why)
        try:
            conn.setblocking(False)
        except OSError:
            conn.close()
            return
        # The RJ answers the peer's A-ASSOCIATE-RQ (PS3.8 9.2), so it goes once that arrives
        # (_finish_reject); sent before, a peer can take it for a broken connection. Then read
        # what the peer sends until it closes, so our close does not reset the RJ away.
        self._rejected[conn] = time.monotonic() + _REJECT_LINGER_S
        self._unanswered.add(conn)
        self.sel.register(conn, selectors.EVENT_READ, ("rejected", None))

    def _finish_reject(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and conn in self._unanswered:
            self._unanswered.discard(conn)
            try:
                conn.send(A_ASSOCIATE_RJ_LIMIT)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                data = b""
        if not data:
            self._close_rejected(conn)

    def _close_rejected(self, conn: socket.socket) -> None:
        self._rejected.pop(conn, None)
        self._unanswered.discard(conn)
        self.sel.unregister(conn)
        conn.close()

    def _expire_rejects(self) -> None:
        now = time.monotonic()
        for conn in [c for c, t in self._rejected.items() if t < now]:
            self._close_rejected(conn)

    # -- workers ------------------------------------------------------------------

    def _from_worker(self, ws: WorkerSlot) -> None:
        while True:
            try:
                msg = ws.control.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:  # the worker is gone; _reap restarts it
                self.sel.unregister(ws.control)
                ws.control.close()
                ws.control, ws.ready = None, False
                return
            if msg == b"R":
                ws.ready = True
                log.info("worker %d ready", ws.slot)
            elif msg[:1] == b"E":
                self._ended(ws, msg[1:])
            elif msg.startswith(REPORT):
                self.metrics.worker_report(ws.slot, msg[len(REPORT):])

    def _reap(self) -> None:
        now = time.monotonic()
        self.scrub.poll(self.draining)
        self.upload.poll(self.draining)
        self.forward.poll(self.draining)
        self.iceberg.poll(self.draining)
        self.http.poll(self.draining)
        for ws in self.slots:
            if ws.process is None or ws.process.poll() is None:
                continue
            code = ws.process.returncode
            if ws.control is not None:
                self.sel.unregister(ws.control)
                ws.control.close()
            ws.process, ws.control, ws.ready = None, None, False
            self._worker_lost(ws)
            self.metrics.worker_gone(ws.slot)
            if self.draining:
                continue
            self.metrics.restarts += 1
            log.error("worker %d exited with %s; restarting it (its open associations were lost)", ws.slot, code)
            ws.restarts = [t for t in ws.restarts if now - t < 60] + [now]
            delay = min(30.0, 0.5 * 2 ** (len(ws.restarts) - 1)) if len(ws.restarts) > 3 else 0.0
            self._pending_restart[ws.slot] = now + delay
        for slot, at in list(self._pending_restart.items()):
            if at <= now and not self.draining:
                del self._pending_restart[slot]
                self._spawn(self.slots[slot])

    # -- shutdown -----------------------------------------------------------------

    def _drain(self) -> int:
        if self.on_drain is not None:
            self.on_drain()
        self.scrub.stop()  # it saves its position and goes on from there next time
        self.upload.stop()  # the manifest says what is uploaded: the next one goes on from there
        self.forward.stop()  # the queue is durable: it goes on from there next time
        self.iceberg.stop()  # the outbox and the ledger are durable: likewise
        http_failed = self.http.stop()  # requests in flight finish first
        for listener in (self.listener, self.tls_listener):
            if listener is not None:
                if listener in self.sel.get_map():  # not yet when the HTTP port failed to start
                    self.sel.unregister(listener)
                listener.close()
        for ws in self.slots:
            if ws.control is not None:
                try:
                    ws.control.send(b"D")
                except OSError:
                    pass
        deadline = time.monotonic() + self.config.drain_timeout + 15
        failed = http_failed
        for ws in self.slots:
            if ws.process is None:
                continue
            try:
                code = ws.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not finish draining; killing it", ws.slot)
                ws.process.kill()
                code = ws.process.wait()
            if code != 0:
                log.error("worker %d ended with %s while draining", ws.slot, code)
            failed += code != 0
        if failed:
            log.error("stopped; %d worker or HTTP process(es) did not stop cleanly (see above)", failed)
            return 1
        log.info("stopped")
        return 0


def serve(config: Config, on_drain: Callable[[], None] | None = None) -> int:
    """Run the archive until a signal drains it; `on_drain` is called as the drain begins
    (the background compaction is told to stop then, not once the workers are gone)."""
    try:
        return Acceptor(config, on_drain).run()
    finally:
        forkserver.stop()  # every child has stopped (or will, with it)
