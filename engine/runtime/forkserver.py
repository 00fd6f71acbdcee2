"""The fork server: one process that imports the archive's modules once, then forks every
worker, HTTP and helper process the acceptor starts.

A fresh `python -m stowage.workers.worker` spends ~1.5 s of CPU importing pydicom,
pynetdicom, pyarrow and DuckDB before it does anything, and `serve` starts two workers, two
HTTP processes and a scrub at the least: a start or restart took ~6.5 s until the HTTP port
answered, and a crashed worker was replaced ~2 s later. Forked from here, a child starts in
~20 ms with those modules imported (their pages shared until written). multiprocessing's
forkserver does the same for multiprocessing.Process; this one runs `python -m` modules,
which is what the acceptor's children are, and hands back a Popen-like handle.

The server is a fresh interpreter the acceptor starts from its main thread, before any
thread of the acceptor's matters: it imports, then only forks, so no child inherits a lock
held elsewhere. A child
- runs as `python -m <module> <args>` would: as __main__, with sys.argv, the environment and
  working directory the acceptor gives, non-daemon threads joined and atexit handlers run
  at its end, and the command it would have had as its title (setproctitle: ps, psutil);
- gets the file descriptors the acceptor passes (SCM_RIGHTS), at numbers written into its
  arguments (`Fd`), and the server's pid where its arguments ask for `PARENT`;
- gets SIGTERM when the server dies, and the server SIGKILL when the acceptor dies
  (PR_SET_PDEATHSIG), so nothing outlives the acceptor.

Frames on one stream socket are an 8-byte length and JSON. Acceptor to server: {"module",
"args", "env", "cwd"} with the descriptors attached; server to acceptor: {"pid"} for each
request in order, {"exit": pid, "code"} when a child ended (the code as Popen's returncode).
"""
from __future__ import annotations

import atexit
import ctypes
import importlib
import json
import logging
import os
import queue
import runpy
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

import psutil

log = logging.getLogger("stowage.acceptor")

# What the acceptor's children import: the workers', the HTTP processes' and the scrub's
# modules (forwarding, Iceberg and the uploader import the rest they need themselves).
PRELOAD = ("stowage.workers.worker", "stowage.engine.web.process", "stowage.engine.lifecycle.scrub")
_PRELOAD_ENV = "STOWAGE_FORK_SERVER_PRELOAD"
_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct("!Q")
_MAX_FDS = 16
_REPLY_TIMEOUT_S = 120.0  # the server answers once its imports are done: seconds on a loaded machine


@dataclass(frozen=True)
class Fd:
    """An argument that is a file descriptor of the acceptor's, passed to the child; the
    child's argument is the number it has there."""
    fd: int


UNKNOWN_EXIT = 255  # the exit code of a child that ended after its fork server: lost with the server
PARENT = "{fork-server-pid}"  # an argument the child sees as its parent's (the server's) pid


# -- frames -------------------------------------------------------------------------

def _send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    body = json.dumps(obj).encode()
    data = _HEADER.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict, list[int]] | None:
    """One frame and the descriptors that came with it; None at the end of the stream."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, _MAX_FDS)
    if not head:
        return None
    if len(head) < _HEADER.size:
        rest = _recv_exactly(sock, _HEADER.size - len(head))
        if rest is None:
            return None
        head += rest
    body = _recv_exactly(sock, _HEADER.unpack(head)[0])
    return (json.loads(body), fds) if body is not None else None


def die_with_parent(sig: int, parent: int) -> None:
    """PR_SET_PDEATHSIG: `sig` when our parent (pid `parent`, known from before: asked now,
    getppid() may already say 1) dies, even by kill -9; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


# -- the acceptor's side -------------------------------------------------------------

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
    thread) whenever one of its children ended, as SIGCHLD would be for a direct child."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        self.preload = preload
        self.on_exit: Callable[[], None] | None = None
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
        env = dict(os.environ)
        # Arrow reads this as it loads, here in the server: the system allocator, not mimalloc,
        # whose arena kept growing in the HTTP processes (engine/web/process.py)
        env.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        env[_PRELOAD_ENV] = ",".join(self.preload)  # not in its arguments, where it would look like a worker
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), str(theirs.fileno())],
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
                    _send(self._sock, request, fds)
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
                frame = _recv(sock)
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


# -- the server's side ----------------------------------------------------------------

def _serve(sock: socket.socket, preload: list[str]) -> None:
    """Fork a child for each request, report each child's end, until the acceptor closes;
    import the `preload` modules one by one while no request waits (the workers, first in
    it, start once theirs are in, not after the HTTP processes' too)."""
    sel = selectors.DefaultSelector()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wake-up fd is written
    sel.register(sock, selectors.EVENT_READ, "request")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    try:
        _loop(sock, sel, wake_r, wake_w, list(preload))
    except (BrokenPipeError, ConnectionResetError):  # the acceptor went first: nothing to tell
        pass


def _loop(sock: socket.socket, sel: selectors.BaseSelector, wake_r: int, wake_w: int, preload: list[str]) -> None:
    me = os.getpid()
    while True:
        events = sel.select(0 if preload else None)
        if not events and preload:
            _import(preload.pop(0))
            continue
        for key, _mask in events:
            if key.data == "child":
                _drain(wake_r)
                _report_ended(sock)
                continue
            frame = _recv(sock)
            if frame is None:
                return
            request, fds = frame
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                sel.close()
                sock.close()
                os.close(wake_r)
                os.close(wake_w)
                _become(request, fds, me)  # never returns
            for fd in fds:
                os.close(fd)
            _send(sock, {"pid": pid})
        _report_ended(sock)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _report_ended(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _become(request: dict, fds: list[int], server_pid: int) -> None:
    """In the forked child: turn into `python -m module args`, then exit with its code.
    `server_pid` is known from before the fork: asked now, getppid() would say 1 (or a
    subreaper) had the server died already, and the child would outlive it."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        die_with_parent(signal.SIGTERM, server_pid)
        for fd in fds:
            os.set_inheritable(fd, True)  # as Popen's pass_fds leaves them
        module = request["module"]
        args = [str(fds[a["fd"]]) if isinstance(a, dict) else a.replace(PARENT, str(server_pid))
                for a in request["args"]]
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [module, *args]
        _set_title(" ".join([sys.executable, "-m", module, *args]))
        code = _run(module)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _run(module: str) -> int:
    """Run `module` as __main__ and end as the interpreter would; its exit code."""
    # runpy warns that the module was imported before it ran: the server preloaded it, on purpose
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                            category=RuntimeWarning)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads
    except Exception:
        traceback.print_exc()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def _prepare_title() -> None:
    """setproctitle finds the memory it writes titles into (argv and the environment) on
    first use: here, while the environment is still the one the process started with."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.getproctitle()


def main() -> None:
    parent, fd = int(sys.argv[1]), int(sys.argv[2])
    preload = [m for m in os.environ.pop(_PRELOAD_ENV, "").split(",") if m]
    die_with_parent(signal.SIGKILL, parent)  # nothing to clean up: its children get SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the acceptor decides
    sock = socket.socket(fileno=fd)
    _prepare_title()
    _serve(sock, preload)


def _import(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # the child that runs it will say why, where it is logged
        pass


if __name__ == "__main__":
    main()
