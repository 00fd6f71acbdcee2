"""WADO-RS: each HTTP process's CPU while N lean clients retrieve a stored series at once,
R rounds: whether concurrent requests use both processes, and the user/system split of
the serving CPU. Serves the archive `dicomweb_wado --dir D` stored (D/stowage, D/corpus)
with the given source tree; `--profile OUT` also records each HTTP process with py-spy.

    python -m stowage.bench.harness.dicomweb_split --dir D --tree . --clients 2 --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from stowage.bench.dicomweb import series_of
from stowage.bench.harness.dicomweb_lean import run_lean
from stowage.bench.harness.dicomweb_wado import _http_pids, _serve
from stowage.bench.loadgen import load_corpus
from stowage.bench.procs import stop_tree


def _cpu(pids: list[int]) -> dict[int, tuple[float, float]]:
    return {p: tuple(psutil.Process(p).cpu_times()[:2]) for p in pids}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--tree", type=Path, default=Path("."))
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--profile", type=Path)
    args = ap.parse_args(argv)
    items = load_corpus(sorted((args.dir / "corpus").glob("**/*.dcm")))
    series, nbytes = series_of(items), sum(it.length for it in items)
    proc, target = _serve(args.tree.resolve(), args.dir / "stowage")
    try:
        pids = _http_pids(proc.pid)
        run_lean(target, series, args.clients, nbytes, proc.pid)  # warm-up
        spies = [subprocess.Popen(["py-spy", "record", "--native", "-r", "200", "-f", "raw",
                                   "-o", f"{args.profile}-{pid}.txt", "-p", str(pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid in pids] if args.profile else []
        before, moved = _cpu(pids), 0.0
        for _ in range(args.rounds):
            r = run_lean(target, series, args.clients, nbytes, proc.pid)
            moved += r.mb_per_s * r.wall_s
            print(json.dumps({"mb_per_s": r.mb_per_s, "client_cpu_ms_per_mb": round(r.sender_cpu_s / (r.mb_per_s * r.wall_s) * 1e3, 3),
                              "failed": r.failed, "load": round(os.getloadavg()[0], 2)}), flush=True)
        after = _cpu(pids)
        for s in spies:
            s.send_signal(2)
            s.wait(60)
        split = {p: {"user_s": round(after[p][0] - before[p][0], 2), "system_s": round(after[p][1] - before[p][1], 2)}
                 for p in pids}
        total = sum(v["user_s"] + v["system_s"] for v in split.values())
        print(json.dumps({"http_processes": split, "http_cpu_ms_per_mb": round(total / moved * 1e3, 3)}))
    finally:
        stop_tree(proc, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
