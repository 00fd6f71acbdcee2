"""What idle associations and one very large instance cost a running stowage: a benchmark
(it reports against targets, it asserts nothing).

``python -m stowage.bench.harness.footprint [--idle 100] [--window 10] [--size-mib 2048] [--json FILE]``

Starts ``stowage serve`` (``--workers 2``, default fsync durability) on a free 127.0.0.1
port with a fresh data directory in a temporary directory, then:

1. Idle associations. The CPU seconds of the whole serve tree (acceptor + workers,
   psutil user+system) over ``--window`` seconds with no association open: the
   baseline. Then, held open without traffic, half of ``--idle`` associations
   storage-only (protocol/store_scu.Association proposing CT Image Storage: the
   worker's lean path), and the same window again; then the other half added,
   proposing Study Root C-FIND (a pynetdicom AE with engine.reactor installed: the
   worker's pynetdicom path), and the window once more, so each path's cost shows.
   Reported as % of one core; target: all of them under 10 % above the baseline.
   Associations the server refuses are counted with the reason it gives, and the
   figure is then also scaled per path to the number requested.
   The acceptor's association cap (64 by default) is raised to twice ``--idle``, and
   ``network_timeout`` (60 s by default, after which a silent peer is dropped) is raised
   through STOWAGE_NETWORK_TIMEOUT so nothing is dropped while we hold them.
2. One large instance of ``--size-mib`` (default 2 GiB): an Ultrasound Multi-frame
   RGB instance built from a few frames of the ``us`` corpus kind (bench/corpus.py),
   its header written by pydicom and its Pixel Data appended frame by frame, so the
   benchmark never holds it in memory. It is sent once with the lean sender (from the
   file, ``sendfile``) while every worker's RSS is sampled every 50 ms. Reported: each
   worker's idle and peak RSS and its increase, the C-STORE status, time (association
   open to release, so it includes the archive's store before its response) and MB/s.
   Target: worker memory under 300 MB while receiving a 2 GB instance.

Every process started is stopped by PID (bench/procs.stop_tree); the temporary
directory is removed at the end, on error too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from stowage.bench.procs import TreeMonitor, free_port, stop_tree, tail
from stowage.bench.report import disk, machine

AET, CALLING = "STOWAGE", "FOOTPRINT"
CT_STORAGE, EXPLICIT_LE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
VERIFICATION, IMPLICIT_LE = "1.2.840.10008.1.1", "1.2.840.10008.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IDLE_TARGET_PCT, RSS_TARGET_MB = 10.0, 300.0
MB = 1e6


# -- the server ---------------------------------------------------------------------------
def start_server(tmp: Path, port: int, workers: int, max_associations: int,
                 network_timeout: float) -> tuple[subprocess.Popen, Path]:
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(tmp / "data"), "--port", str(port),
           "--bind", "127.0.0.1", "--workers", str(workers), "--max-associations", str(max_associations)]
    env = dict(os.environ, STOWAGE_NETWORK_TIMEOUT=str(network_timeout))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log


def worker_procs(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The serve process's workers by slot (``python -m stowage.workers.worker SLOT FD``)."""
    out = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "stowage.workers.worker" in cmd:
            out[int(cmd[cmd.index("stowage.workers.worker") + 1])] = p
    return out


def echo(port: int) -> bool:
    """True if an association with a Verification context is accepted and released."""
    from stowage.protocol.store_scu import Association, AssociationError
    try:
        Association("127.0.0.1", port, AET, CALLING, [(VERIFICATION, IMPLICIT_LE)], timeout=5).open().release()
        return True
    except (AssociationError, OSError):
        return False


def wait_ready(proc: subprocess.Popen, port: int, workers: int, timeout: float = 90.0) -> dict[int, psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stowage serve exited with {proc.returncode}")
        found = worker_procs(proc)
        if len(found) == workers and echo(port):
            return found
        time.sleep(0.3)
    raise RuntimeError(f"stowage serve not ready within {timeout:g} s")


def cpu_by_pid(proc: subprocess.Popen) -> dict[int, float]:
    """CPU seconds (user+system, incl. reaped children) of each process of the serve tree."""
    out = {}
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return out


def cpu_window(proc: subprocess.Popen, window: float) -> tuple[float, dict[int, float]]:
    """% of one core used by the serve tree over ``window`` seconds, and CPU s per pid."""
    before, t0 = cpu_by_pid(proc), time.monotonic()
    time.sleep(window)
    after, wall = cpu_by_pid(proc), time.monotonic() - t0
    per = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    return 100.0 * sum(per.values()) / wall, per


# -- 1. idle associations ---------------------------------------------------------------------
class IdleSet:
    """Associations held open without traffic: lean storage ones and pynetdicom C-FIND ones."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lean: list[Any] = []
        self.find: list[Any] = []
        self.errors: Counter[str] = Counter()

    def open_lean(self, n: int) -> None:
        """``n`` storage-only associations (CT Image Storage): the worker's lean path."""
        from stowage.protocol.store_scu import Association, AssociationError
        for _ in range(n):
            try:
                a = Association("127.0.0.1", self.port, AET, CALLING, [(CT_STORAGE, EXPLICIT_LE)], timeout=30)
                self.lean.append(a.open())
            except AssociationError as e:
                self.errors[f"lean: {e}"] += 1

    def open_find(self, n: int) -> None:
        """``n`` associations proposing Study Root C-FIND: the worker's pynetdicom path."""
        from pynetdicom import AE, evt
        from stowage.protocol import pdu, pynetdicom_patches
        pynetdicom_patches.install()  # our pynetdicom requestors block instead of polling every 1 ms
        ae = AE(CALLING)
        ae.add_requested_context(STUDY_FIND)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 30, None  # None: never drop idle
        reasons: list[str] = []

        def on_acse(event: Any) -> None:  # the A-ASSOCIATE-RJ's reason, which associate() only logs
            p = event.primitive
            if getattr(p, "result", None) in (pdu.REJECTED_PERMANENT, pdu.REJECTED_TRANSIENT):
                reasons.append(f"C-FIND: {p.result_str.lower()} by {p.source_str}: {p.reason_str}")

        for _ in range(n):
            reasons.clear()
            assoc = ae.associate("127.0.0.1", self.port, ae_title=AET, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])
            if assoc.is_established:
                self.find.append(assoc)
            else:
                self.errors[reasons[0] if reasons else "C-FIND: association not established"] += 1

    def alive(self) -> int:
        """How many are still open: no byte (A-ABORT, A-RELEASE) and no close from the server."""
        socks = [a.sock for a in self.lean if a.sock is not None]
        readable, _, _ = select.select(socks, [], [], 0)  # an A-ABORT, or the close, is readable
        return sum(a.is_established for a in self.find) + len(socks) - len(readable)

    def close(self) -> None:
        for a in self.lean:
            a.release()
        for a in self.find:
            a.release() if a.is_established else a.abort()
        self.lean, self.find = [], []


def measure_idle(proc: subprocess.Popen, port: int, n: int, window: float, settle: float,
                 workers: dict[int, psutil.Process]) -> dict[str, Any]:
    """Three windows: none open, the lean half open, both halves open."""
    names = {p.pid: f"worker {slot}" for slot, p in workers.items()} | {proc.pid: "acceptor"}
    time.sleep(settle)
    base, _ = cpu_window(proc, window)
    idle = IdleSet(port)
    try:
        idle.open_lean(n - n // 2)
        time.sleep(settle)
        lean_pct, _ = cpu_window(proc, window)
        idle.open_find(n // 2)
        time.sleep(settle)
        both_pct, per = cpu_window(proc, window)
        alive, lean, find = idle.alive(), len(idle.lean), len(idle.find)
    finally:
        idle.close()
    return {"window_s": window, "requested": n, "lean": lean, "find": find, "alive_after": alive,
            "baseline_pct": base, "lean_pct": lean_pct, "idle_pct": both_pct,
            "lean_cost_pct": lean_pct - base, "find_cost_pct": both_pct - lean_pct, "diff_pct": both_pct - base,
            "errors": dict(idle.errors),
            "per_process_pct": {names.get(pid, str(pid)): 100.0 * s / window for pid, s in per.items()}}


# -- 2. one large instance ---------------------------------------------------------------------
def make_large(tmp: Path, size: int, template_frames: int = 8) -> tuple[Path, int]:
    """One Ultrasound Multi-frame instance of about ``size`` bytes, written frame by frame;
    returns its path and number of frames."""
    import pydicom
    from pydicom.uid import generate_uid
    from stowage.bench.corpus import generate
    tpl = generate(tmp / "template", "us", 1, frames=template_frames)[0]
    ds = pydicom.dcmread(tpl)
    pixels = bytes(ds.PixelData)
    del ds.PixelData
    frame = len(pixels) // template_frames
    frames = max(1, min(size, 0xFFFFFFFE) // frame)
    ds.NumberOfFrames = frames
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp / "large.dcm"
    with open(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)
        f.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", frames * frame))  # Pixel Data, OB, length
        for i in range(frames):
            j = i % template_frames
            f.write(pixels[j * frame:(j + 1) * frame])
    shutil.rmtree(tmp / "template")
    return path, frames


class RssSampler:
    """Peak RSS of each worker, sampled every ``interval`` seconds in a thread."""

    def __init__(self, workers: dict[int, psutil.Process], interval: float = 0.05) -> None:
        self.workers, self.interval = workers, interval
        self.peak = {slot: 0 for slot in workers}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for slot, p in self.workers.items():
                try:
                    self.peak[slot] = max(self.peak[slot], p.memory_info().rss)
                except psutil.Error:
                    pass
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_large(port: int, tmp: Path, size: int, timeout: float,
                  workers: dict[int, psutil.Process]) -> dict[str, Any]:
    from stowage.bench.loadgen import load_corpus
    from stowage.protocol.store_scu import Association, AssociationError
    t0 = time.monotonic()
    path, frames = make_large(tmp, size)
    made_s = time.monotonic() - t0
    ds = load_corpus([path])[0].dataset(preload_limit=0)  # sent from the file, never loaded
    idle_rss = {slot: p.memory_info().rss for slot, p in workers.items()}
    cpu0 = {slot: sum(p.cpu_times()[:2]) for slot, p in workers.items()}
    status, comment = -1, ""
    with RssSampler(workers) as rss:
        t0 = time.monotonic()
        try:
            with Association("127.0.0.1", port, AET, CALLING, [(ds.sop_class_uid, ds.transfer_syntax_uid)],
                             timeout=timeout) as a:
                status, comment = a.store(ds)
        except AssociationError as e:
            comment = str(e)
        wall = time.monotonic() - t0
    rows = [{"slot": slot, "pid": p.pid, "idle_rss_mb": idle_rss[slot] / MB, "peak_rss_mb": rss.peak[slot] / MB,
             "increase_mb": (rss.peak[slot] - idle_rss[slot]) / MB,
             "cpu_s": sum(p.cpu_times()[:2]) - cpu0[slot]} for slot, p in sorted(workers.items())]
    path.unlink()
    return {"bytes": ds.length, "frames": frames, "generate_s": made_s, "status": status, "comment": comment,
            "wall_s": wall, "mb_per_s": ds.length / MB / wall, "samples": rss.samples, "workers": rows}


# -- report -----------------------------------------------------------------------------------
def _verdict(value: float, target: float) -> str:
    return "meets the target" if value < target else "MISSES the target"


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [f"stowage footprint, commit {r['commit']}; {r['command']}",
           f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
           f"Python {m['python']}; temp dir on {r['disk']}",
           f"load average (1 min) at start → end: {r['load'][0]:.2f} → {r['load'][1]:.2f}",
           f"server: stowage serve --workers {r['workers']} --max-associations {r['max_associations']} "
           f"(default cap 64), STOWAGE_NETWORK_TIMEOUT={r['network_timeout']:g} (default 60 s would drop "
           f"idle peers), durability fsync"]
    if i := r.get("idle"):
        opened = i["lean"] + i["find"]
        half = i["requested"] / 2  # a path's cost, scaled to half of the requested number
        scaled = sum(i[f"{k}_cost_pct"] * half / i[k] for k in ("lean", "find") if i[k])
        rows = [("baseline, no association open", f"{i['baseline_pct']:6.2f} %"),
                (f"{i['lean']} lean C-STORE associations open", f"{i['lean_pct']:6.2f} %"),
                (f"+ {i['find']} C-FIND associations (pynetdicom path)",
                 f"{i['idle_pct']:6.2f} %  ({i['alive_after']} of {opened} still open after the window)"),
                (f"cost of {i['lean']} lean", f"{i['lean_cost_pct']:+6.2f} %"),
                (f"cost of {i['find']} C-FIND", f"{i['find_cost_pct']:+6.2f} %"),
                (f"cost of all {opened}", f"{i['diff_pct']:+6.2f} %")]
        if opened != i["requested"]:
            rows.append((f"scaled to {i['requested'] - i['requested'] // 2} + {i['requested'] // 2}",
                         f"{scaled:+6.2f} %  (each path's cost per association times its requested number)"))
        width = max(len(k) for k, _ in rows)
        out += ["", f"1. idle associations: % of one core used by serve + workers over {i['window_s']:g} s "
                    f"(each after {r['settle_s']:g} s settling); {i['requested']} requested, half of each kind"]
        out += [f"  {k:{width}s}  {v}" for k, v in rows]
        judged = (scaled, "scaled figure") if opened != i["requested"] else (i["diff_pct"], "measured")
        out += [f"  target: {i['requested']} idle associations under {IDLE_TARGET_PCT:g} % of a core: "
                f"{_verdict(judged[0], IDLE_TARGET_PCT)} ({judged[1]})",
                "  last window by process: " + ", ".join(f"{k} {v:.2f} %" for k, v in i["per_process_pct"].items())]
        out += [f"  not opened: {n} x {e}" for e, n in i["errors"].items()]
    if g := r.get("large"):
        peak = max(w["peak_rss_mb"] for w in g["workers"])
        out += ["", f"2. one large instance: {g['bytes'] / 2**30:.2f} GiB ({g['bytes'] / MB:.0f} MB), US multi-frame "
                    f"RGB, {g['frames']} frames, Explicit VR LE; lean sender from the file (sendfile)",
                f"  C-STORE status 0x{g['status'] & 0xFFFF:04X}{' ' + g['comment'] if g['comment'] else ''}"
                f" in {g['wall_s']:.1f} s = {g['mb_per_s']:.1f} MB/s (open to release, incl. the archive's store)",
                f"  worker RSS sampled every 50 ms ({g['samples']} samples):",
                "    worker    pid  idle RSS MB  peak RSS MB  increase MB  CPU s"]
        out += [f"    {w['slot']:6d} {w['pid']:6d} {w['idle_rss_mb']:12.1f} {w['peak_rss_mb']:12.1f} "
                f"{w['increase_mb']:12.1f} {w['cpu_s']:6.1f}" for w in g["workers"]]
        out += [f"  largest worker peak RSS {peak:.1f} MB (target < {RSS_TARGET_MB:g} MB: "
                f"{_verdict(peak, RSS_TARGET_MB)})",
                f"  (generating the file took {g['generate_s']:.1f} s)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.footprint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=100, help="idle associations to hold [100]")
    ap.add_argument("--window", type=float, default=10.0, help="CPU measurement window, s [10]")
    ap.add_argument("--settle", type=float, default=5.0, help="wait before each window, s [5]")
    ap.add_argument("--size-mib", type=int, default=2048, help="size of the large instance, MiB [2048]")
    ap.add_argument("--store-timeout", type=float, default=900.0, help="wait for its C-STORE-RSP, s [900]")
    ap.add_argument("--network-timeout", type=float, default=600.0,
                    help="the server's network_timeout, via STOWAGE_NETWORK_TIMEOUT, s [600]")
    ap.add_argument("--workers", type=int, default=2, help="worker processes [2]")
    ap.add_argument("--only", choices=("idle", "large"), help="run one part only")
    ap.add_argument("--tmp", type=Path, help="parent of the temporary directory [system default]")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    if a.network_timeout <= 2 * (a.settle + a.window) + 30:
        ap.error("--network-timeout must comfortably exceed the time idle associations are held")
    tmp = Path(tempfile.mkdtemp(prefix="stowage-footprint-", dir=a.tmp))
    port, max_assoc = free_port(), max(64, 2 * a.idle)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    r: dict[str, Any] = {"commit": commit, "command": " ".join(["python -m stowage.bench.harness.footprint", *(argv or sys.argv[1:])]),
                         "machine": machine(), "disk": disk(tmp), "workers": a.workers, "max_associations": max_assoc,
                         "network_timeout": a.network_timeout, "settle_s": a.settle, "load": [os.getloadavg()[0]]}
    proc: subprocess.Popen | None = None
    monitor: TreeMonitor | None = None
    try:
        proc, log = start_server(tmp, port, a.workers, max_assoc, a.network_timeout)
        monitor = TreeMonitor(proc.pid)
        workers = wait_ready(proc, port, a.workers)
        monitor.sample()  # records the tree's PIDs for stop_tree
        if a.only != "large":
            r["idle"] = measure_idle(proc, port, a.idle, a.window, a.settle, workers)
        if a.only != "idle":
            r["large"] = measure_large(port, tmp, a.size_mib << 20, a.store_timeout, workers)
        r["load"].append(os.getloadavg()[0])
    except BaseException:
        print(f"stowage serve log (last lines):\n{tail(tmp / 'serve.log', 30)}", file=sys.stderr)
        raise
    finally:
        if proc is not None:
            stop_tree(proc, monitor, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
