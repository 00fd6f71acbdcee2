"""STOW-RS against C-STORE, A/B: one or more source trees of stowage in alternation, each
started fresh on an empty data directory, then sent the same CT series by STOW-RS (K
clients, `--batch` instances a request) and another by C-STORE (K associations). Reported
per run: the receiver's CPU per instance (its whole process tree, and the HTTP processes
alone during STOW-RS), instances/s, STOW-RS ÷ C-STORE, the STOW-RS series' metadata the
first time (after a sync and the data directory dropped from the page cache) and again,
and the load average. For cutting STOW-RS and metadata CPU without Orthanc or WADO-RS in
the loop (bench/harness/dicomweb.py has both).

    python -m stowage.bench.harness.dicomweb_stow --dir D --tree base=/path/to/old --tree new=. --rounds 3

The corpora are written once into DIR and reused: each archive starts empty, so nothing
is a duplicate. `--profile OUT` records the HTTP processes of the last tree's last STOW-RS
with py-spy (idle samples left out; `--gil` for the GIL-holding view, `--native` for C
frames too), one file of collapsed stacks per process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import psutil

from stowage.bench.command import CorpusSpec
from stowage.bench.dicomweb import WebTarget, run_stow, run_wado
from stowage.bench.harness.dicomweb import evict
from stowage.bench.loadgen import Target, load_corpus, run
from stowage.bench.procs import TreeMonitor, find_dcmtk, free_port, stop_tree, wait_echo


def _serve(tree: Path, data: Path, port: int, http_port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["nice", "-n", "15", sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(data),
                             "--port", str(port), "--bind", "127.0.0.1", "--http-port", str(http_port)], cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_echo(find_dcmtk("echoscu"), port, "STOWAGE")
        TreeMonitor(proc.pid).settle()
    except BaseException:
        stop_tree(proc, None)
        raise
    return proc


def _http(root: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(root).children(recursive=True)
            if "stowage.engine.web.process" in " ".join(p.cmdline())]


def _usage(procs: list[psutil.Process]) -> tuple[float, float, int]:
    """User and system CPU seconds and minor page faults of `procs`, summed."""
    user = system = faults = 0
    for p in procs:
        try:
            t = p.cpu_times()
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (psutil.Error, OSError):
            continue
        user, system, faults = user + t.user, system + t.system, faults + int(fields[7])
    return user, system, faults


def _profile(procs: list[psutil.Process], out: Path, how: list[str]) -> list[subprocess.Popen]:
    out.parent.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(["py-spy", "record", "-r", "200", *how,
                              "-f", "raw", "-o", f"{out}-{p.pid}.txt", "-p", str(p.pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in procs]


def one_run(name: str, tree: Path, data: Path, stow_items: list, store_items: list, k: int, batch: int,
            profile: Path | None = None, how: tuple[str, ...] = ()) -> dict:
    shutil.rmtree(data, ignore_errors=True)
    port, http_port = free_port(), free_port()
    proc = _serve(tree, data, port, http_port)
    try:
        http = _http(proc.pid)
        spies = _profile(http, profile, list(how)) if profile else []
        h0 = _usage(http)
        stow = run_stow(WebTarget(f"http://127.0.0.1:{http_port}/dicom-web"), stow_items, k, batch, proc.pid)
        h1 = _usage(http)
        for s in spies:
            s.send_signal(2)  # SIGINT: py-spy writes what it has
            s.wait(60)
        TreeMonitor(proc.pid).settle()  # the STOW-RS batch sealed before C-STORE is timed
        meta = []
        for cold in (True, False):  # the series' metadata the first time (cold page cache), then again
            if cold:
                evict(data)
            meta.append(run_wado(WebTarget(f"http://127.0.0.1:{http_port}/dicom-web"), stow_items, 1, "metadata",
                                 proc.pid))
        store = run(Target("127.0.0.1", port, "STOWAGE"), store_items, k, pid=proc.pid, progress=False)
    finally:
        stop_tree(proc, None)
        shutil.rmtree(data, ignore_errors=True)
    n = max(stow.completed, 1)
    row = {"tree": name, "load": round(os.getloadavg()[0], 2),
           "stow_ms_per_inst": round(stow.target_cpu_s / n * 1e3, 3),
           "stow_http_ms_per_inst": round((h1[0] + h1[1] - h0[0] - h0[1]) / n * 1e3, 3),
           "stow_http_sys_ms_per_inst": round((h1[1] - h0[1]) / n * 1e3, 3),
           "stow_http_faults_per_inst": round((h1[2] - h0[2]) / n, 1),
           "store_ms_per_inst": round(store.target_cpu_s / max(store.completed, 1) * 1e3, 3),
           "stow_inst_per_s": stow.inst_per_s, "store_inst_per_s": store.inst_per_s,
           "rate_ratio": round(stow.inst_per_s / store.inst_per_s, 3) if store.inst_per_s else None,
           "meta_first_ms": meta[0].latency_ms.get("p50"), "meta_first_cpu_ms": round(meta[0].target_cpu_s * 1e3),
           "meta_again_ms": meta[1].latency_ms.get("p50"),
           "failed": stow.failed + store.failed + meta[0].failed + meta[1].failed}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="kept: the two corpora")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a stowage source tree")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", type=Path, help="py-spy the HTTP processes of the last tree's last STOW-RS")
    ap.add_argument("--gil", action="store_true", help="with --profile: only samples holding the GIL")
    ap.add_argument("--native", action="store_true", help="with --profile: native frames too (fewer samples)")
    args = ap.parse_args(argv)
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in args.tree)]
    corpora = []
    for n, seed in enumerate((100, 101)):
        folder = args.dir / f"corpus{n}"
        paths = sorted(folder.glob("**/*.dcm")) if folder.exists() else \
            CorpusSpec(["ct"], ["explicit"], args.count, 1, 1, 1, None, seed=seed).generate(folder, lambda m: None)
        corpora.append(load_corpus(paths))
    rows = []
    for rnd in range(args.rounds):
        order = trees if rnd % 2 == 0 else trees[::-1]
        for name, tree in order:
            last = rnd == args.rounds - 1 and name == order[-1][0]
            row = one_run(name, tree, args.dir / "archive", corpora[0], corpora[1], args.k, args.batch,
                          args.profile if last else None,
                          tuple(f for f, on in (("--gil", args.gil), ("--native", args.native)) if on))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name, _ in trees:
        mine = [r for r in rows if r["tree"] == name]
        med = {key: statistics.median(r[key] for r in mine) for key in
               ("stow_ms_per_inst", "stow_http_ms_per_inst", "store_ms_per_inst", "rate_ratio", "meta_first_ms",
                "meta_first_cpu_ms")}
        print(f"{name}: median STOW-RS {med['stow_ms_per_inst']:.3f} ms CPU/inst (HTTP processes "
              f"{med['stow_http_ms_per_inst']:.3f}), C-STORE {med['store_ms_per_inst']:.3f}, STOW÷C-STORE rate "
              f"{med['rate_ratio']:.2f}x; series metadata first time {med['meta_first_ms']:.0f} ms "
              f"({med['meta_first_cpu_ms']:.0f} ms CPU); load {min(r['load'] for r in mine)}-{max(r['load'] for r in mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
