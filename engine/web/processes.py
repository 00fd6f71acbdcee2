"""The acceptor's side of the HTTP port: bind it once, run N processes that accept on the
same listening socket (inherited), restart those that die, stop them on drain.

Binding here, before any process starts, makes a busy port or a bad address a start-up
error of `stowage serve`, said once. Without any token configured (`http_tokens`), the
port is bound to loopback only, whatever `bind` says, and the start-up line says so.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from stowage.engine.runtime import forkserver
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.counts import REPORT
from stowage.engine.runtime.forkserver import Fd, ForkedProcess

log = logging.getLogger("stowage.http")
_STOP_TIMEOUT_S = 20.0


class HttpStartError(RuntimeError):
    """The HTTP port cannot be served; the message says why and what to do."""


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


def http_bind(config: Config) -> str:
    """The address the HTTP port listens on: `bind`, or loopback when no token is configured."""
    if config.http_tokens or is_loopback(config.bind):
        return config.bind
    return "::1" if ":" in config.bind else "127.0.0.1"


METRICS_KEY = 1000  # http process i reports its counts as "worker" METRICS_KEY + i (engine/metrics.py)


@dataclass
class _Process:
    index: int
    popen: ForkedProcess | None = None
    control: socket.socket | None = None  # its counts come in here (REPORT + JSON), as a worker's do
    restarts: list[float] = field(default_factory=list)
    due: float = 0.0


class HttpProcesses:
    """`sel`, `metrics`: the acceptor's selector and ArchiveMetrics; the acceptor hands what
    arrives on a ("http", process) key to read()."""

    def __init__(self, config: Config, sel: selectors.BaseSelector | None = None, metrics=None) -> None:
        self.config = config
        self.sel = sel
        self.metrics = metrics
        self.sock: socket.socket | None = None
        self.started = False  # bound, and its processes started (poll() restarts them from then on)
        self.procs = [_Process(i) for i in range(config.http_process_count)]

    def bind(self) -> None:
        """Bind the port (clients queue on it until the processes are started); raises
        HttpStartError."""
        address = http_bind(self.config)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, self.config.http_port))
        except OSError as e:
            sock.close()
            raise HttpStartError(f"cannot listen for HTTP on {address}:{self.config.http_port}: {e.strerror}; "
                                 "set http_port (--http-port) to a free port, or 0 for no HTTP") from None
        sock.listen(1024)
        self.sock = sock

    def start(self) -> None:
        """Start the processes on the bound port."""
        self.started = True
        for p in self.procs:
            self._spawn(p)
        scheme = "https" if self.config.http_tls else "http"
        where = f"{scheme}://{http_bind(self.config)}:{self.config.http_port}/dicom-web"
        if self.config.http_tokens:
            log.info("DICOMweb on %s with %d processes; bearer tokens required (%d configured)", where,
                     len(self.procs), len(self.config.http_tokens))
        else:
            log.warning("DICOMweb on %s with %d processes, loopback clients only: no http_tokens configured "
                        "(configure tokens to serve other hosts)", where, len(self.procs))

    def _spawn(self, p: _Process) -> None:
        env = dict(os.environ, STOWAGE_WORKER_CONFIG=json.dumps(self.config.to_dict()))
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p.popen = forkserver.spawn("stowage.engine.web.process", [str(p.index), Fd(self.sock.fileno()),
                                                                   Fd(child.fileno())], env)
        child.close()
        parent.setblocking(False)
        p.control = parent
        if self.sel is not None:
            self.sel.register(parent, selectors.EVENT_READ, ("http", p))
        log.info("http process %d started (pid %d)", p.index, p.popen.pid)

    def read(self, p: _Process) -> None:
        """What process `p` sent: its counts, for the metrics."""
        while p.control is not None:
            try:
                msg = p.control.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                self._forget(p)
                return
            if msg.startswith(REPORT) and self.metrics is not None:
                self.metrics.worker_report(METRICS_KEY + p.index, msg[len(REPORT):])

    def _forget(self, p: _Process) -> None:
        if p.control is not None:
            if self.sel is not None:
                self.sel.unregister(p.control)
            p.control.close()
            p.control = None

    def poll(self, draining: bool) -> None:
        """Restart processes that died (backing off when one keeps dying)."""
        if not self.started or self.sock is None or draining:
            return
        now = time.monotonic()
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is not None:
                log.error("http process %d exited with %s; restarting it", p.index, p.popen.returncode)
                self.read(p)
                self._forget(p)
                if self.metrics is not None:
                    self.metrics.worker_gone(METRICS_KEY + p.index)
                p.restarts = [t for t in p.restarts if now - t < 60] + [now]
                p.due = now + (min(30.0, 0.5 * 2 ** (len(p.restarts) - 1)) if len(p.restarts) > 3 else 0.0)
                p.popen = None
            if p.popen is None and p.due <= now:
                self._spawn(p)

    def stop(self) -> int:
        """SIGTERM every process (each finishes its requests in flight), then wait; the
        number that did not stop cleanly."""
        if self.sock is None:
            return 0
        self.sock.close()
        live = [p for p in self.procs if p.popen is not None]
        for p in live:
            try:
                p.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        failed = 0
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for p in live:
            try:
                code = p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("http process %d did not stop; killing it", p.index)
                p.popen.kill()
                code = p.popen.wait()
            if code == -signal.SIGTERM:
                # killed by the signal itself: it had not yet put its handler in, so it was not
                # serving (a restart just before the drain); nothing was in flight
                log.info("http process %d stopped before it served", p.index)
            elif code != 0:
                log.error("http process %d ended with %s while stopping", p.index, code)
                failed += 1
            self._forget(p)
        return failed
