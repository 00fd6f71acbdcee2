"""How long `stowage serve` takes to start, and what its start costs: for each run, a fresh
data directory, `serve` started, the seconds until the DICOM port answers C-ECHO (and, with
--http, until QIDO-RS answers), then the CPU seconds of the whole process tree so far
(the acceptor, the fork server, the workers, HTTP and helper processes), then SIGTERM.

    python -m stowage.bench.harness.startup [--runs 5] [--http] [--workers 2] [--checkout DIR ...]

Runs `python -m stowage.cli serve` in each checkout given (the current directory by
default), runs alternating between them, to compare two versions (docs/processes.md)."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from stowage.bench.procs import echo, find_dcmtk, free_port, stop_tree


def _http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=2) as r:
            return r.status in (200, 204)
    except OSError:
        return False


def _wait(ok, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("stowage serve did not start")
        time.sleep(0.02)


def _tree_cpu(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


def one(echoscu: str, workers: int, http: bool, checkout: str) -> tuple[float, float | None, float]:
    """(seconds to C-ECHO, seconds to QIDO-RS or None, CPU seconds of the tree) of one start."""
    with tempfile.TemporaryDirectory(prefix="stowage-startup-") as tmp:
        port, http_port = free_port(), free_port() if http else 0
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(Path(tmp) / "data"),
                                 "--port", str(port), "--bind", "127.0.0.1", "--workers", str(workers),
                                 "--http-port", str(http_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                cwd=checkout)
        try:
            _wait(lambda: echo(echoscu, port, "STOWAGE"), proc)
            dicom = time.monotonic() - t0
            web = None
            if http:
                _wait(lambda: _http_ok(http_port), proc)
                web = time.monotonic() - t0
            time.sleep(1.0)  # the processes started after the ports answer (scrub) settle
            cpu = _tree_cpu(proc.pid)
        finally:
            stop_tree(proc, None)
    return dicom, web, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--http", action="store_true", help="also serve HTTP (the default configuration) and wait for it")
    ap.add_argument("--checkout", action="append", help="a source checkout whose serve to start (repeatable)")
    args = ap.parse_args()
    checkouts = args.checkout or ["."]
    echoscu = find_dcmtk("echoscu")
    if echoscu is None:
        sys.exit("DCMTK's echoscu is needed (apt-get install dcmtk)")
    rows: dict[str, list] = {c: [] for c in checkouts}
    for i in range(args.runs):
        for c in checkouts:
            dicom, web, cpu = one(echoscu, args.workers, args.http, c)
            rows[c].append((dicom, web or 0.0, cpu))
            print(f"{c} run {i + 1}: C-ECHO after {dicom:.2f} s" + (f", QIDO-RS after {web:.2f} s" if web else "")
                  + f", {cpu:.2f} CPU-s", flush=True)
    for c, got in rows.items():
        med = [statistics.median(col) for col in zip(*got)]
        print(f"{c}: median of {args.runs}: C-ECHO {med[0]:.2f} s" + (f", QIDO-RS {med[1]:.2f} s" if args.http else "")
              + f", {med[2]:.2f} CPU-s")
    print(f"load average {psutil.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
