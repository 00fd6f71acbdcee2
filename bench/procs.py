"""Process plumbing for the benchmarks: DCMTK lookup, free ports, tree monitoring, stopping."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any, Callable

import psutil


def without_sigint(target: Callable[..., None], *args: Any) -> None:
    """A benchmark's client process: `target(*args)` with Ctrl-C ignored. The terminal sends
    SIGINT to the whole group; the parent stops its clients itself and says what was done,
    where each client would print a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(*args)


@cache
def find_dcmtk(name: str) -> str | None:
    """Absolute path of the DCMTK tool ``name``, or None.

    Plain PATH lookup is not enough: pynetdicom installs console scripts with the same
    names (storescp, storescu, echoscu) that may shadow DCMTK, so each candidate must
    say "dcmtk" in its ``--version``. ``$DCMTK_BIN`` is tried first.
    """
    dirs = [os.environ.get("DCMTK_BIN", "")] + os.environ.get("PATH", "").split(os.pathsep)
    seen: set[str] = set()
    for d in [*dirs, "/usr/bin", "/usr/local/bin"]:
        exe = os.path.realpath(os.path.join(d, name)) if d else ""
        if not exe or exe in seen or not os.access(exe, os.X_OK):
            continue
        seen.add(exe)
        try:
            r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (r.stdout + r.stderr).lower():
            return exe
    return None


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (tiny race until the receiver binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file ('' if missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def echo(echoscu: str, port: int, aet: str, env: dict[str, str] | None = None) -> bool:
    """True if a DICOM C-ECHO to 127.0.0.1:port succeeds."""
    cmd = [echoscu, "-to", "2", "-ta", "5", "-aec", aet, "127.0.0.1", str(port)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10, env=env).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def wait_echo(echoscu: str, port: int, aet: str, timeout: float = 60.0) -> None:
    """Block until a C-ECHO to 127.0.0.1:port succeeds: a listening socket is not yet a
    receiver that answers associations."""
    deadline = time.monotonic() + timeout
    while not echo(echoscu, port, aet):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers C-ECHO on port {port}")
        time.sleep(0.2)


def serve_stowage(data: Path, port: int, echoscu: str, *options: str) -> subprocess.Popen:
    """`stowage serve` on 127.0.0.1:port in its own session (stopped with stop_tree),
    once it answers C-ECHO."""
    proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(data), "--port",
                             str(port), "--bind", "127.0.0.1", "--http-port", "0", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_echo(echoscu, port, "STOWAGE")
    except BaseException:
        stop_tree(proc, None)
        raise
    return proc


def tear_down(work: Path, server: subprocess.Popen | None, orthanc: Any = None) -> None:
    """End of a benchmark: stop stowage and Orthanc (by PID) if started, remove its temp dir."""
    if server is not None:
        stop_tree(server, None)
    if orthanc is not None:
        orthanc.stop()
    shutil.rmtree(work, ignore_errors=True)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all but idle and iowait)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class TreeMonitor:
    """Samples CPU seconds and RSS of a process and all its descendants.

    CPU of one sample = Σ over the live tree (incl. zombies) of user+system plus
    children_user+children_system (descendants already reaped), so children that
    come and go between samples (``storescp --fork``) are still counted once they
    are waited for. ``cpu`` is the maximum seen, ``peak_rss`` the largest summed RSS
    (forked children share pages copy-on-write, so this over-counts them) and
    ``peak_pss`` the largest summed PSS, which splits shared pages (0 if unreadable).
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.cpu = 0.0
        self.peak_rss = 0
        self.peak_pss = 0
        self.max_procs = 0
        self.seen: dict[int, float] = {}  # pid -> create_time, for cleanup
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)

    def start(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> float:
        """Take one sample; return the tree CPU seconds it saw."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]  # parents before children
        except psutil.Error:
            return self.cpu
        cpu, rss, pss = 0.0, 0, 0
        for p in procs:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue
            try:
                self.seen.setdefault(p.pid, p.create_time())
                rss += p.memory_info().rss
                pss += getattr(p.memory_full_info(), "pss", 0)
            except (psutil.Error, OSError):
                pass
        with self._lock:
            self.cpu = max(self.cpu, cpu)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.max_procs = max(self.max_procs, len(procs))
        return cpu

    def settle(self, timeout: float = 60.0, window: float = 1.0, busy: float = 0.05) -> float:
        """Wait until the tree has used under `busy` of a core over `window` seconds (its
        processes done starting: imports, a background scrub's first plan), at most
        `timeout` seconds; returns the seconds waited. A receiver's start-up is then not
        counted as the cost of the instances it receives, for any receiver."""
        start = time.monotonic()
        last = self.sample()
        while time.monotonic() - start < timeout:
            time.sleep(window)
            now = self.sample()
            if now - last < busy * window:
                break
            last = now
        return time.monotonic() - start

    def stop(self) -> None:
        """Stop the sampling thread and take a final sample."""
        self._stop.set()
        self._thread.join()
        self.sample()


def collect(results: Any, procs: list, poll: float = 0.1, tick: Callable[[], None] | None = None,
            timeout: float | None = None) -> list[dict]:
    """One result from each of `procs` (multiprocessing processes putting one on the queue
    `results`), as they come; `tick()` after each wait of up to `poll` seconds (a progress
    bar). Returns early, with fewer results, once no process is alive and nothing is left
    on the queue (one died without a result: a crash, a kill), or after `timeout` seconds."""
    outs: list[dict] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(outs) < len(procs):
        try:
            outs.append(results.get(timeout=poll))
        except queue.Empty:
            if (not any(p.is_alive() for p in procs) and results.empty()) or \
                    (deadline is not None and time.monotonic() > deadline):
                break
        if tick is not None:
            tick()
    return outs


def stop_tree(proc: subprocess.Popen, monitor: TreeMonitor | None, timeout: float = 10.0) -> int:
    """SIGTERM ``proc``, SIGKILL after ``timeout``; then kill any of its descendants left
    behind (by PID, checking create_time). Returns how many leftovers had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    leftovers: list[psutil.Process] = []
    for pid, created in (monitor.seen if monitor else {}).items():
        if pid == proc.pid:
            continue
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(p)
        except psutil.Error:
            pass
    if not leftovers:
        return 0
    _, alive = psutil.wait_procs(leftovers, timeout=2.0)
    for p in alive:
        p.terminate()
    _, still = psutil.wait_procs(alive, timeout=timeout)
    for p in still:
        p.kill()
    return len(alive)
