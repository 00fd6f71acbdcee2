"""The acceptor's side of the fork server: starting it, asking it for a child, and a
Popen-like handle on each child whose end the server reports."""
from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import psutil

from stowage.engine.runtime.forkserver import frames
from stowage.engine.runtime.forkserver.frames import Fd

log = logging.getLogger("stowage.acceptor")

_PACKAGE = "stowage.engine.runtime.forkserver"  # run with -m: its __main__ is the server
# What the acceptor's children import: the workers', the HTTP processes' and the scrub's
# modules (forwarding, Iceberg and the uploader import the rest they need themselves).
PRELOAD = ("stowage.workers.worker", "stowage.engine.web.process", "stowage.engine.lifecycle.scrub")
_REPLY_TIMEOUT_S = 120.0  # the server answers once its imports are done: seconds on a loaded machine
UNKNOWN_EXIT = 255  # the exit code of a child that ended after its fork server: lost with the server


class ForkedProcess:
    """What the acceptor uses of subprocess.Popen (pid, poll, wait, send_signal,
    terminate, kill, returncode), for a child of the fork server."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid, self.args = pid, args
        self.returncode: int | None = None
        self._changed = threading.Event()  # it ended, or the server died (then it is watched)
        self._orphaned = False  # the server died first: no exit code will come

    def _end(self, code: int) -> None:
        self.returncode = code
        self._changed.set()

    def _orphan(self) -> None:
        self._orphaned = True
        self._changed.set()

    def poll(self) -> int | None:
        if self.returncode is None and self._orphaned and not _exists(self.pid):
            self._end(UNKNOWN_EXIT)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            if self._orphaned:
                time.sleep(0.05 if left is None else min(0.05, left))
            else:
                self._changed.wait(left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ForkServer:
    """The acceptor's handle on its fork server; `on_exit` is called (from a reader
    thread) whenever one of its children ended, as SIGCHLD would be for a direct child,
    and when `preloaded` is set."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        self.preload = preload
        self.on_exit: Callable[[], None] | None = None
        self.preloaded = threading.Event()  # it has imported every PRELOAD module (on_exit is called then too)
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._replies: queue.Queue = queue.Queue()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start the server (it imports in the background: the first spawn waits for it)."""
        ours, theirs = socket.socketpair()
        self.preloaded.clear()
        env = dict(os.environ)
        # Arrow reads this as it loads, here in the server: the system allocator, not mimalloc,
        # whose arena kept growing in the HTTP processes (engine/web/process.py)
        env.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        env[frames.PRELOAD_ENV] = ",".join(self.preload)  # not in its arguments, where it would look like a worker
        self.proc = subprocess.Popen([sys.executable, "-m", _PACKAGE, str(os.getpid()), str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        # each server its own reply queue and children: a dead one's reader, ending late,
        # must not take the next one's for its own
        self._sock, self._replies = ours, queue.Queue()
        threading.Thread(target=self._read, args=(ours, self._replies, {}), name="fork-server", daemon=True).start()

    def spawn(self, module: str, args: list[str | Fd], env: dict[str, str]) -> ForkedProcess:
        """`python -m module args` with environment `env`, forked by the server."""
        fds = [a.fd for a in args if isinstance(a, Fd)]
        wire = [{"fd": fds.index(a.fd)} if isinstance(a, Fd) else a for a in args]
        shown = [str(a.fd) if isinstance(a, Fd) else a for a in args]
        request = {"module": module, "args": wire, "env": env, "cwd": os.getcwd()}
        with self._lock:
            for attempt in (1, 2):
                if self._sock is None or self.proc.poll() is not None:
                    if self._sock is not None:
                        log.error("the fork server exited with %s; starting it again", self.proc.returncode)
                    self.start()
                try:
                    frames.send(self._sock, request, fds)
                    reply = self._replies.get(timeout=_REPLY_TIMEOUT_S)
                except (OSError, queue.Empty) as e:
                    reply = e
                if isinstance(reply, ForkedProcess):
                    reply.args = [sys.executable, "-m", module, *shown]
                    return reply
                self._lost()
                if attempt == 2:
                    raise OSError(f"the fork server did not start {module}: {reply}")
        raise AssertionError("unreachable")

    def _read(self, sock: socket.socket, replies: queue.Queue, children: dict[int, ForkedProcess]) -> None:
        while True:
            try:
                frame = frames.recv(sock)
            except (OSError, ValueError):
                frame = None
            if frame is None:
                replies.put(EOFError("the fork server ended"))
                for child in list(children.values()):
                    child._orphan()
                if self.on_exit is not None:
                    self.on_exit()
                return
            msg = frame[0]
            if "pid" in msg:  # registered here, before its exit can be read
                child = children[msg["pid"]] = ForkedProcess(msg["pid"], [])
                replies.put(child)
            elif "preloaded" in msg:
                self.preloaded.set()
                if self.on_exit is not None:
                    self.on_exit()
            elif "exit" in msg:
                child = children.pop(msg["exit"], None)
                if child is not None:
                    child._end(msg["code"])
                if self.on_exit is not None:
                    self.on_exit()

    def _lost(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, if it still waits
            except OSError:
                pass
            self._sock.close()
            self._sock = None

    def stop(self, timeout: float = 10.0) -> None:
        """Close the server (it exits when its socket closes; its children are not stopped)."""
        with self._lock:
            self._close()
            if self.proc is not None:
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


_server: ForkServer | None = None


def server() -> ForkServer:
    """This process's fork server, started on first use."""
    global _server
    if _server is None:
        _server = ForkServer()
        _server.start()
    return _server


def spawn(module: str, args: list[str | Fd], env: dict[str, str]) -> ForkedProcess:
    return server().spawn(module, args, env)


def stop() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None
