"""Bulk import, three ways, on the same folder in one run:

1. `stowage import FOLDER` into a fresh data directory;
2. DCMTK `storescu +sd +r` pushing the folder to a fresh `stowage serve` (one association);
3. Orthanc's own import: HTTP POST /instances per file, a few at a time, as Orthanc's
   ImportDicomFiles.py and its users do, into a fresh Orthanc.

Each row: files/s, MB/s and CPU time per instance (every process of that path: the
importer and its children; storescu plus the whole server tree; Orthanc plus the upload
client's threads). Not a test: the figures depend on the machine and on what else runs.

    python -m stowage.bench.harness.import_bench --kind small,ct --count 20000 [--work DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stowage.bench import corpus
from stowage.bench.harness.orthanc import Orthanc, executable as orthanc_exe
from stowage.bench.procs import TreeMonitor, find_dcmtk, free_port, serve_stowage, stop_tree


@dataclass
class Row:
    name: str
    files: int
    nbytes: int
    seconds: float
    cpu: float        # seconds, all processes of this path
    note: str = ""

    @property
    def rate(self) -> float:
        return self.files / self.seconds

    @property
    def mbps(self) -> float:
        return self.nbytes / 1e6 / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / max(self.files, 1)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def make_corpus(work: Path, kind: str, count: int) -> tuple[Path, int, int]:
    """The corpus folder (reused when already generated with these parameters), in
    nested folders of 1000 files as archives and exports lay them out."""
    folder = work / f"corpus-{kind}-{count}"
    marker = work / f"corpus-{kind}-{count}.complete"  # outside: storescu +sd sends every file
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        flat = work / f".flat-{kind}-{count}"
        shutil.rmtree(flat, ignore_errors=True)
        t = time.monotonic()
        paths = corpus.generate(flat, kind, count)
        for i, p in enumerate(paths):
            sub = folder / f"{i // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            p.rename(sub / p.name)
        shutil.rmtree(flat, ignore_errors=True)
        marker.write_text(json.dumps({"kind": kind, "count": count}))
        print(f"generated {count} {kind} files in {time.monotonic() - t:.0f} s", file=sys.stderr)
    files = [p for p in folder.rglob("*.dcm")]
    return folder, len(files), sum(p.stat().st_size for p in files)


def set_cache(mode: str, folder: Path) -> None:
    """Give every path the same page cache state before it runs: "cold" drops the page
    cache (root only; what a migration of old files meets), "warm" reads the corpus once
    (it must fit in memory), "as-is" leaves it to the previous run."""
    if mode == "cold":
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError as e:
            sys.exit(f"import_bench: --cache cold needs root ({e.strerror})")
    elif mode == "warm":
        for path in folder.rglob("*.dcm"):
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass


def _cache_note(mode: str) -> str:
    return {"cold": "page cache dropped before each path (source read from disk)",
            "warm": "corpus read into the page cache before each path",
            "as-is": "page cache as the previous run left it"}[mode]


def run_import(folder: Path, data: Path, files: int, nbytes: int, extra: list[str]) -> Row:
    cmd = [sys.executable, "-m", "stowage.cli", "import", str(folder), "--data-dir", str(data), "-q", *extra]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if r.returncode != 0:
        raise RuntimeError(f"stowage import failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-2000:]}")
    label = "stowage import" + (f" ({' '.join(extra)})" if extra else "")
    return Row(label, files, nbytes, seconds, cpu, r.stdout.strip().split(";")[0])


def run_storescu(folder: Path, data: Path, files: int, nbytes: int) -> Row:
    storescu, echoscu = find_dcmtk("storescu"), find_dcmtk("echoscu")
    if not storescu or not echoscu:
        raise RuntimeError("DCMTK is not installed: apt-get install dcmtk")
    port = free_port()
    server = serve_stowage(data, port, echoscu)
    monitor = TreeMonitor(server.pid).start()
    try:
        base = monitor.sample()
        cpu0, t0 = _children_cpu(), time.perf_counter()
        r = subprocess.run([storescu, "+sd", "+r", "-aec", "STOWAGE", "-aet", "STORESCU", "127.0.0.1", str(port),
                            str(folder)], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        client = _children_cpu() - cpu0
        server_cpu = monitor.sample() - base
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed ({r.returncode}): {r.stderr[-2000:]}")
    finally:
        monitor.stop()
        stop_tree(server, monitor)
    return Row("storescu -> stowage serve", files, nbytes, seconds, client + server_cpu,
               f"storescu {1000 * client / files:.2f} + server {1000 * server_cpu / files:.2f} ms/inst")


def run_orthanc(folder: Path, work: Path, files: int, nbytes: int, threads: int) -> Row:
    paths = sorted(folder.rglob("*.dcm"))
    orthanc = Orthanc(work, nodelay=True)
    monitor = TreeMonitor(orthanc.proc.pid).start()
    try:
        base = monitor.sample()
        cpu0, t0 = _self_cpu(), time.perf_counter()
        orthanc.upload(paths, threads)
        seconds = time.perf_counter() - t0
        client = _self_cpu() - cpu0
        server_cpu = monitor.sample() - base
        stored = orthanc.rest("GET", "/statistics")["CountInstances"]
    finally:
        monitor.stop()
        orthanc.stop()
    if stored != files:
        raise RuntimeError(f"Orthanc holds {stored} instances, not {files}")
    return Row(f"Orthanc REST upload ({threads} threads)", files, nbytes, seconds, client + server_cpu,
               f"client {1000 * client / files:.2f} + Orthanc {1000 * server_cpu / files:.2f} ms/inst")


def _table(kind: str, rows: list[Row]) -> str:
    ref = {r.name.split(" (")[0]: r for r in rows}
    out = [f"\n{kind}: {rows[0].files} files, {rows[0].nbytes / 1e6:.1f} MB",
           f"| path | files/s | MB/s | CPU ms/instance | import is | notes |", "|---|---|---|---|---|---|"]
    imp = ref.get("stowage import")
    for r in rows:
        ratio = f"{imp.rate / r.rate:.2f}x" if imp and r is not imp else ""
        out.append(f"| {r.name} | {r.rate:.0f} | {r.mbps:.1f} | {r.cpu_ms:.2f} | {ratio} | {r.note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.import_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="small,ct", help="corpus kinds, comma-separated [small,ct]")
    ap.add_argument("--count", default="20000,2000", help="files per kind, one number or one per kind")
    ap.add_argument("--work", type=Path, help="working folder (corpora are kept there and reused)")
    ap.add_argument("--orthanc-threads", type=int, default=4)
    ap.add_argument("--skip", default="", help="paths to leave out: storescu, orthanc")
    ap.add_argument("--import-args", default="", help="extra arguments for stowage import, e.g. '--threads 16'")
    ap.add_argument("--cache", choices=["cold", "warm", "as-is"], default="as-is",
                    help="page cache state before each path [as-is]; cold needs root")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument("--json", type=Path, help="write the rows here")
    a = ap.parse_args(argv)
    kinds = [k for k in a.kind.split(",") if k]
    counts = [int(c) for c in a.count.split(",")]
    counts = counts * len(kinds) if len(counts) == 1 else counts
    work = a.work or Path(tempfile.mkdtemp(prefix="stowage-import-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}; load {os.getloadavg()[0]:.1f}; "
          f"{_cache_note(a.cache)}", file=sys.stderr)
    results = {}
    for kind, count in zip(kinds, counts):
        folder, files, nbytes = make_corpus(work, kind, count)
        rows = []
        runs = work / f"runs-{kind}"
        shutil.rmtree(runs, ignore_errors=True)
        set_cache(a.cache, folder)
        rows.append(run_import(folder, runs / "import", files, nbytes, a.import_args.split()))
        print(f"{kind}: {rows[-1].name}: {rows[-1].rate:.0f} files/s", file=sys.stderr)
        if "storescu" not in skip:
            set_cache(a.cache, folder)
            rows.append(run_storescu(folder, runs / "storescu", files, nbytes))
            print(f"{kind}: {rows[-1].name}: {rows[-1].rate:.0f} files/s", file=sys.stderr)
        if "orthanc" not in skip and orthanc_exe():
            set_cache(a.cache, folder)
            rows.append(run_orthanc(folder, runs / "orthanc", files, nbytes, a.orthanc_threads))
            print(f"{kind}: {rows[-1].name}: {rows[-1].rate:.0f} files/s", file=sys.stderr)
        print(_table(kind, rows))
        results[kind] = [r.__dict__ for r in rows]
        if not a.keep:
            shutil.rmtree(runs, ignore_errors=True)
    print(f"\n{_cache_note(a.cache)}; load average after: {os.getloadavg()[0]:.1f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
