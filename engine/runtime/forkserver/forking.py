"""The fork server itself: imports the archive's modules while idle, forks a child per
request, reports each child's end; in the child, becomes `python -m <module> <args>`."""
from __future__ import annotations

import atexit
import ctypes
import importlib
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import traceback
import warnings

from stowage.engine.runtime.forkserver import frames

_PR_SET_PDEATHSIG = 1
_BURST_S = 0.1  # how long after a fork the next request is waited for before importing on


def die_with_parent(sig: int, parent: int) -> None:
    """PR_SET_PDEATHSIG: `sig` when our parent (pid `parent`, known from before: asked now,
    getppid() may already say 1) dies, even by kill -9; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


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
    forked = False
    if not preload:
        frames.send(sock, {"preloaded": True})
    while True:
        # a request comes in bursts (the acceptor starts its workers one after the other): after
        # a fork, a moment for the next before the next import, which would make it wait ~1 s
        events = sel.select((_BURST_S if forked else 0) if preload else None)
        forked = False
        if not events and preload:
            _import(preload.pop(0))
            if not preload:  # from now on a fork waits for no import
                frames.send(sock, {"preloaded": True})
            continue
        for key, _mask in events:
            if key.data == "child":
                _drain(wake_r)
                _report_ended(sock)
                continue
            forked = True
            frame = frames.recv(sock)
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
            frames.send(sock, {"pid": pid})
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
        frames.send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


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
        args = [str(fds[a["fd"]]) if isinstance(a, dict) else a.replace(frames.PARENT, str(server_pid))
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
    preload = [m for m in os.environ.pop(frames.PRELOAD_ENV, "").split(",") if m]
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
