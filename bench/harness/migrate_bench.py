"""Migration out of a legacy archive, three ways, from the same loaded Orthanc in one run:

1. `stowage migrate --method move` into a running `stowage serve` (C-MOVE, Orthanc
   sends the instances to the archive);
2. `stowage migrate --method get` into a fresh data directory (C-GET, the migrate
   process stores what it receives), no server running;
3. the script a PACS administrator writes around DCMTK: one `movescu` per study, in
   turn, into DCMTK `storescp` writing files (no fsync, no catalog, no verification).

Each row: instances/s, MB/s, and CPU time per instance on our side (the migrate process
and, for C-MOVE, the whole server tree; movescu plus storescp for DCMTK), with the
source's (Orthanc's) CPU per instance beside it. Orthanc is loaded once, over its REST
API, before any timed run. Not a test: the figures depend on the machine.

    python -m stowage.bench.harness.migrate_bench --kind small --count 5000 [--parallel 4] [--work DIR]
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

import pydicom

from stowage.bench import corpus
from stowage.bench.harness.orthanc import Orthanc
from stowage.bench.procs import TreeMonitor, find_dcmtk, free_port, serve_stowage, stop_tree

HOST = "127.0.0.1"


@dataclass
class Row:
    name: str
    instances: int
    nbytes: int
    seconds: float
    cpu: float          # seconds, our side
    source_cpu: float   # seconds, Orthanc
    note: str = ""

    def line(self) -> str:
        n = max(self.instances, 1)
        return (f"| {self.name} | {self.instances / self.seconds:.0f} | {self.nbytes / 1e6 / self.seconds:.1f} | "
                f"{1000 * self.cpu / n:.2f} | {1000 * self.source_cpu / n:.2f} | {self.note} |")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def load_orthanc(orthanc: Orthanc, files: list[Path]) -> None:
    orthanc.upload(files)
    held = orthanc.rest("GET", "/statistics")["CountInstances"]
    if held != len(files):
        raise RuntimeError(f"Orthanc holds {held} instances, not {len(files)}")


def _timed(cmd: list[str], monitors: list[TreeMonitor]) -> tuple[float, float, list[float], str]:
    """Run `cmd`; its wall time, its CPU, the CPU each monitored tree spent meanwhile."""
    bases = [m.sample() for m in monitors]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    spent = [m.sample() - b for m, b in zip(monitors, bases)]
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return seconds, cpu, spent, r.stdout


def _migrate_cmd(data: Path, orthanc: Orthanc, method: str, parallel: int) -> list[str]:
    return [sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(data), "-q",
            "--from", f"{orthanc.aet}@{HOST}:{orthanc.dicom_port}", "--method", method,
            "--parallel", str(parallel), "--retry-delay", "1"]


def _summary(stdout: str) -> str:
    return next((x.strip() for x in stdout.splitlines() if "verified" in x), stdout.strip()[-200:])


def run_move(work: Path, orthanc: Orthanc, source: TreeMonitor, n: int, nbytes: int, parallel: int,
             stowage_port: int) -> Row:
    echoscu = find_dcmtk("echoscu")
    server = serve_stowage(work / "move", stowage_port, echoscu)
    monitor = TreeMonitor(server.pid).start()
    try:
        seconds, cpu, (server_cpu, orthanc_cpu), out = _timed(
            _migrate_cmd(work / "move", orthanc, "move", parallel), [monitor, source])
    finally:
        monitor.stop()
        stop_tree(server, monitor)
    return Row(f"stowage migrate --method move --parallel {parallel}", n, nbytes, seconds, cpu + server_cpu,
               orthanc_cpu, f"migrate {1000 * cpu / n:.2f} + server {1000 * server_cpu / n:.2f} ms/inst; "
                            f"{_summary(out)}")


def run_get(work: Path, orthanc: Orthanc, source: TreeMonitor, n: int, nbytes: int, parallel: int) -> Row:
    seconds, cpu, (orthanc_cpu,), out = _timed(_migrate_cmd(work / "get", orthanc, "get", parallel), [source])
    return Row(f"stowage migrate --method get --parallel {parallel}", n, nbytes, seconds, cpu, orthanc_cpu,
               _summary(out))


def run_dcmtk(work: Path, orthanc: Orthanc, source: TreeMonitor, studies: list[str], n: int, nbytes: int,
              port: int) -> Row:
    """movescu, one study after another, into storescp (files, no fsync)."""
    movescu, storescp = find_dcmtk("movescu"), find_dcmtk("storescp")
    out = work / "storescp"
    out.mkdir(parents=True)
    nodelay = dict(os.environ, TCP_NODELAY="1")  # DCMTK leaves Nagle on unless told: its best setting
    scp = subprocess.Popen([storescp, "-aet", "STOWAGE", "-od", str(out), "+uf", str(port)], env=nodelay,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    monitor = TreeMonitor(scp.pid).start()
    try:
        time.sleep(0.5)
        bases = [monitor.sample(), source.sample()]
        cpu0, t0 = _children_cpu(), time.perf_counter()
        for uid in studies:
            r = subprocess.run([movescu, "-S", "-aet", "STOWAGE", "-aec", orthanc.aet, "-aem", "STOWAGE",
                                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
                                HOST, str(orthanc.dicom_port)], capture_output=True, text=True, env=nodelay)
            if r.returncode != 0:
                raise RuntimeError(f"movescu failed for {uid}: {r.stderr[-1000:]}")
        seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        scp_cpu, orthanc_cpu = monitor.sample() - bases[0], source.sample() - bases[1]
    finally:
        monitor.stop()
        stop_tree(scp, monitor)
    got = sum(1 for p in out.iterdir() if p.is_file())
    if got != n:
        raise RuntimeError(f"storescp wrote {got} files, not {n}")
    return Row("DCMTK movescu per study -> storescp (files, no fsync)", n, nbytes, seconds, cpu + scp_cpu,
               orthanc_cpu, f"movescu {1000 * cpu / n:.2f} + storescp {1000 * scp_cpu / n:.2f} ms/inst")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.migrate_bench",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="small", help="corpus kind [small]")
    ap.add_argument("--count", type=int, default=5000, help="instances [5000]")
    ap.add_argument("--studies", type=int, default=50, help="studies (patients x 2) [50]")
    ap.add_argument("--parallel", type=int, default=4, help="studies pulled at once by stowage migrate [4]")
    ap.add_argument("--skip", default="", help="rows to leave out: move, get, dcmtk")
    ap.add_argument("--work", type=Path, help="working folder")
    ap.add_argument("--json", type=Path, help="write the rows here")
    a = ap.parse_args(argv)
    if not (find_dcmtk("echoscu") and find_dcmtk("movescu") and find_dcmtk("storescp")):
        sys.exit("migrate_bench: DCMTK is not installed (apt-get install dcmtk)")
    work = a.work or Path(tempfile.mkdtemp(prefix="stowage-migrate-bench-"))
    shutil.rmtree(work / "runs", ignore_errors=True)
    runs = work / "runs"
    files = corpus.generate(work / "runs" / "corpus", a.kind, a.count, patients=max(1, a.studies // 2),
                            studies_per_patient=2)
    nbytes = sum(p.stat().st_size for p in files)
    studies = sorted({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in files})
    stowage_port, dcmtk_port = free_port(), free_port()
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}; load {os.getloadavg()[0]:.1f}; "
          f"{len(files)} {a.kind} instances in {len(studies)} studies, {nbytes / 1e6:.1f} MB", file=sys.stderr)
    orthanc = Orthanc(runs / "orthanc", {"stowage": ("STOWAGE", HOST, stowage_port)}, nodelay=True)
    source = TreeMonitor(orthanc.proc.pid).start()
    rows: list[Row] = []
    skip = set(a.skip.split(","))
    try:
        load_orthanc(orthanc, files)
        if "move" not in skip:
            rows.append(run_move(runs, orthanc, source, len(files), nbytes, a.parallel, stowage_port))
            print(rows[-1].line(), file=sys.stderr)
        if "get" not in skip:
            rows.append(run_get(runs, orthanc, source, len(files), nbytes, a.parallel))
            print(rows[-1].line(), file=sys.stderr)
        if "dcmtk" not in skip:
            # The same AE title, now at storescp's port.
            orthanc.rest("PUT", "/modalities/stowage", {"AET": "STOWAGE", "Host": HOST, "Port": dcmtk_port})
            rows.append(run_dcmtk(runs, orthanc, source, studies, len(files), nbytes, dcmtk_port))
            print(rows[-1].line(), file=sys.stderr)
    finally:
        source.stop()
        orthanc.stop()
    print(f"\n{a.kind}: {len(files)} instances, {len(studies)} studies, {nbytes / 1e6:.1f} MB, from Orthanc")
    print("| path | instances/s | MB/s | CPU ms/instance (ours) | Orthanc CPU ms/instance | notes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(r.line())
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    if a.json:
        a.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
