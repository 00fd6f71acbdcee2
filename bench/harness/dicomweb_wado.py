"""WADO-RS retrieval, A/B: the same stored CT series served by two source trees of
stowage in alternation (and by Orthanc with its DICOMweb plugin in the same run), each
series retrieved as stored (`transfer-syntax=*`) by one client; the receiver's CPU per MB
(its whole process tree), the client's CPU per MB, and MB/s, warm page cache. For cutting WADO-RS CPU: the archives
are stored once in DIR and served again by each tree, so only the serving code differs.

    python -m stowage.bench.harness.dicomweb_wado --dir D --tree A=/path/to/old --tree B=. --rounds 3

`--lean N`: also the lean client (bench/harness/dicomweb_lean.py: the body read into a
reused buffer, its parts counted) alone and as N processes asking for the series at once,
so the server rather than one Python client is the bound; same rounds, same targets.

`--profile OUT` records the HTTP processes of the last tree's last round with py-spy
(`--native --idle off`, one SVG/speedscope file per process) while it serves.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from stowage.bench.command import CorpusSpec
from stowage.bench.dicomweb import WebTarget, run_stow, run_wado, series_of
from stowage.bench.harness.dicomweb_lean import run_lean
from stowage.bench.harness.dicomweb import PLUGIN, evict
from stowage.bench.harness.orthanc import Orthanc
from stowage.bench.loadgen import load_corpus
from stowage.bench.procs import TreeMonitor, find_dcmtk, free_port, stop_tree, wait_echo


def _serve(tree: Path, data: Path) -> tuple[subprocess.Popen, WebTarget]:
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(data), "--port",
                             str(port), "--bind", "127.0.0.1", "--http-port", str(http_port)], cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # a loaded machine can take a minute or more to start it
        wait_echo(find_dcmtk("echoscu"), port, "STOWAGE", timeout=300)
        TreeMonitor(proc.pid).settle()
    except BaseException:
        stop_tree(proc, None)
        raise
    return proc, WebTarget(f"http://127.0.0.1:{http_port}/dicom-web")


def kept_archives(work: Path, count: int, tree: Path) -> tuple[list[Path], list]:
    """The CT corpus in WORK/corpus and stowage's archive of it in WORK/stowage (STOW-RS by
    `tree`), made on the first run and kept: (paths, loaded items)."""
    corpus = work / "corpus"
    paths = sorted(corpus.glob("**/*.dcm")) if corpus.exists() else \
        CorpusSpec(["ct"], ["explicit"], count, 1, 1, 1, None, seed=100).generate(corpus, lambda m: None)
    items = load_corpus(paths)
    if not (work / "stowage").exists():
        proc, target = _serve(tree, work / "stowage")
        try:
            run_stow(target, items, 4, 10, proc.pid)
            time.sleep(3)
        finally:
            stop_tree(proc, None)
    return paths, items


@contextmanager
def orthanc_serving(work: Path, paths: list[Path]) -> Iterator[tuple[Orthanc, WebTarget]]:
    """Orthanc with its DICOMweb plugin on WORK/orthanc (the corpus uploaded the first
    time), settled: (orthanc, its DICOMweb target); stopped after."""
    db = work / "orthanc"
    fresh = not db.exists()
    orthanc = Orthanc(db, None, nodelay=True, timeout=120, Plugins=[PLUGIN],
                      DicomWeb={"Enable": True, "Root": "/dicom-web/"}, SaveJobs=False)
    try:
        if fresh:
            orthanc.upload(paths)
        TreeMonitor(orthanc.proc.pid).settle()
        yield orthanc, WebTarget(f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
    finally:
        orthanc.stop()


def _http_pids(root: int) -> list[int]:
    return [p.pid for p in psutil.Process(root).children(recursive=True)
            if "stowage.engine.web.process" in " ".join(p.cmdline())]


def _row(name: str, rs: list, load: float) -> dict:
    cpu = sum(r.target_cpu_s for r in rs)
    mb = sum(r.mb_per_s * r.wall_s for r in rs)
    return {"what": name, "mb_per_s": round(mb / sum(r.wall_s for r in rs), 1), "cpu_ms_per_mb": round(cpu / mb * 1e3, 3),
            "client_cpu_ms_per_mb": round(sum(r.sender_cpu_s for r in rs) / mb * 1e3, 3),
            "failed": sum(r.failed for r in rs), "errors": sorted({e for r in rs for e in r.errors})[:2],
            "load": round(load, 2)}


def _clients(lean: int) -> list[tuple[str, int]]:
    """(client, processes) of each way the series is retrieved: http.client's `read()`,
    and with --lean N the lean client alone and N of it at once."""
    return [("http.client", 1)] + ([("lean", 1), (f"lean x{lean}", lean)] if lean else [])


def _once(target: WebTarget, items: list, series: list, pid: int, client: tuple[str, int]):
    if client[0] == "http.client":
        return run_wado(target, items, 1, "retrieve", pid)
    return run_lean(target, series, client[1], sum(it.length for it in items), pid)


def _retrieve(target: WebTarget, items: list, pid: int, repeat: int, cold: Path | None = None,
              client: tuple[str, int] = ("http.client", 1)) -> list:
    """`repeat` retrieves after a warm-up one; `cold`: each from a cold page cache (that
    data directory evicted first)."""
    series = series_of(items)
    _once(target, items, series, pid, client)  # warm-up: buffers (and the page cache)
    out = []
    for _ in range(repeat):
        if cold is not None:
            evict(cold)
        out.append(_once(target, items, series, pid, client))
    return out


def _profile(pids: list[int], out: Path, seconds: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["py-spy", "record", "--native", "-r", "100", "-d", str(seconds),
                              "-f", "speedscope", "-o", str(out.with_name(f"{out.name}-{pid}.json")), "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="kept: the corpus and both archives")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a stowage source tree")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="retrieves per tree per round")
    ap.add_argument("--orthanc", action="store_true")
    ap.add_argument("--cold", action="store_true", help="each retrieve from a cold page cache")
    ap.add_argument("--lean", type=int, default=0, metavar="N",
                    help="also the lean client, alone and N at once")
    ap.add_argument("--profile", type=Path)
    args = ap.parse_args(argv)
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in args.tree)]
    paths, items = kept_archives(args.dir, args.count, trees[0][1])
    rows = []
    for rnd in range(args.rounds):
        for name, tree in trees:
            proc, target = _serve(tree, args.dir / "stowage")
            try:
                spies = _profile(_http_pids(proc.pid), args.profile, 30) \
                    if args.profile and rnd == args.rounds - 1 and name == trees[-1][0] else []
                for client in _clients(args.lean):
                    rs = _retrieve(target, items, proc.pid, args.repeat * (4 if spies else 1),
                                   args.dir / "stowage" if args.cold else None, client)
                    rows.append(_row(f"round {rnd + 1} {name}{' cold' if args.cold else ''} {client[0]}", rs,
                                     os.getloadavg()[0]))
                    print(json.dumps(rows[-1]), flush=True)
                for s in spies:
                    s.terminate()
                    s.wait(30)
            finally:
                stop_tree(proc, None)
        if args.orthanc:
            with orthanc_serving(args.dir, paths) as (orthanc, target):
                for client in _clients(args.lean):
                    rs = _retrieve(target, items, orthanc.proc.pid, args.repeat,
                                   args.dir / "orthanc" if args.cold else None, client)
                    rows.append(_row(f"round {rnd + 1} orthanc {client[0]}", rs, os.getloadavg()[0]))
                    print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
