"""The fork server (engine/runtime/forkserver/): a child it forks behaves as `python -m
module args` would (arguments, environment, working directory, passed descriptors, exit
code, atexit handlers and threads at its end, its command in ps), its end is reported, and
nothing outlives the process that started the server, however either dies."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from stowage.engine.runtime.forkserver import PARENT, UNKNOWN_EXIT, Fd, ForkServer

CHILD = '''
import atexit, os, socket, sys, threading, time
sock = socket.socket(fileno=int(sys.argv[1]))
atexit.register(lambda: sock.send(b"atexit"))
def later():
    time.sleep(0.3)
    sock.send(b"thread")
sock.send(f"{sys.argv[2]} {os.environ.get('PROBE')} {os.getcwd()} {os.getppid()}".encode())
if sys.argv[3] == "wait":
    sock.recv(1)
threading.Thread(target=later).start()
sys.exit(int(sys.argv[4]))
'''


@pytest.fixture
def forks(tmp_path, monkeypatch):
    (tmp_path / "probe_child.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    server = ForkServer(preload=("json",))
    server.start()
    yield server
    server.stop()
    if server.proc.poll() is None:
        server.proc.kill()


def _spawn(forks: ForkServer, tmp_path: Path, code: int, wait: bool = False):
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    child = forks.spawn("probe_child", [Fd(theirs.fileno()), PARENT, "wait" if wait else "go", str(code)],
                        dict(os.environ, PROBE="seen"))
    theirs.close()
    return child, ours


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_a_child_runs_as_python_dash_m_would(forks, tmp_path):
    ended = []
    forks.on_exit = lambda: ended.append(1)
    child, ours = _spawn(forks, tmp_path, 3, wait=True)
    first = ours.recv(1000).decode().split()
    assert first == [str(forks.pid), "seen", os.getcwd(), str(forks.pid)]  # PARENT, env, cwd, parent
    cmdline = " ".join(psutil.Process(child.pid).cmdline()).split()
    assert cmdline == [sys.executable, "-m", "probe_child", cmdline[3], str(forks.pid), "wait", "3"]
    assert child.poll() is None
    ours.send(b"x")
    assert child.wait(10) == 3
    rest = b""
    while chunk := ours.recv(100):
        rest += chunk
    assert rest == b"threadatexit"  # the non-daemon thread ran to its end, then the atexit handler
    assert ended, "the acceptor's on_exit hook was not called"


def test_signals_reach_the_child_and_its_end_says_so(forks, tmp_path):
    child, ours = _spawn(forks, tmp_path, 0, wait=True)
    ours.recv(1000)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.3)
    child.kill()
    assert child.wait(10) == -signal.SIGKILL
    child.kill()  # a second time: nothing to signal, no error


def test_a_module_that_fails_to_import_exits_1_with_its_traceback(forks, tmp_path):
    child = forks.spawn("no_such_module_here", [], dict(os.environ))
    assert child.wait(10) == 1


def test_when_the_server_dies_its_children_end_and_the_next_spawn_starts_another(forks, tmp_path):
    child, ours = _spawn(forks, tmp_path, 0, wait=True)
    ours.recv(1000)
    old = forks.pid
    os.kill(old, signal.SIGKILL)
    assert child.wait(15) == UNKNOWN_EXIT  # ended by PR_SET_PDEATHSIG; its code was lost with the server
    again, ours2 = _spawn(forks, tmp_path, 5)
    assert forks.pid != old
    assert ours2.recv(1000).decode().split()[0] == str(forks.pid)
    assert again.wait(10) == 5


def test_nothing_outlives_the_process_that_started_the_server(tmp_path):
    """kill -9 of the acceptor's stand-in: the server gets SIGKILL, its child SIGTERM."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent('''
        import os, sys, time
        from stowage.engine.runtime.forkserver import ForkServer
        server = ForkServer(preload=())
        server.start()
        child = server.spawn("http.server", ["--bind", "127.0.0.1", "0"], dict(os.environ))
        print(server.pid, child.pid, flush=True)
        time.sleep(60)
    '''))
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's stowage, as the tests use
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=repo))
    try:
        server_pid, child_pid = map(int, owner.stdout.readline().split())
        assert psutil.pid_exists(child_pid)
        owner.kill()
        owner.wait(10)
        assert _gone(server_pid, 10), "the fork server outlived its owner"
        assert _gone(child_pid, 10), "a forked child outlived the fork server"
    finally:
        owner.kill()
