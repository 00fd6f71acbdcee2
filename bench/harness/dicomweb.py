"""stowage's DICOMweb against Orthanc's DICOMweb plugin, on the same corpus, in one run:
STOW-RS ingest (and stowage's own C-STORE rate beside it), WADO-RS retrieval of each series
as stored, and series metadata (first and repeated), each with the target's CPU.

    python -m stowage.bench.harness.dicomweb --count 500 -k 4 --batch 10

Each receiver is started fresh on an empty data directory; every run stores a corpus of its
own (new UIDs), so nothing is a duplicate. Orthanc runs with its default storage (fsync on).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from stowage.bench.command import CorpusSpec
from stowage.bench.dicomweb import WebTarget, run_stow, run_wado
from stowage.bench.harness.orthanc import Orthanc
from stowage.bench.loadgen import Target, load_corpus, run
from stowage.bench.procs import find_dcmtk, free_port, serve_stowage, stop_tree

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def _row(name: str, r) -> dict:
    cpu = r.target_cpu_s
    moved = r.mb_per_s * r.wall_s
    return {"what": name, "inst_per_s": r.inst_per_s, "mb_per_s": r.mb_per_s, "p50_ms": r.latency_ms.get("p50"),
            "cpu_ms_per_instance": round(cpu / r.completed * 1e3, 3) if cpu and r.completed else None,
            "cpu_s_per_mb": round(cpu / moved, 4) if cpu and moved else None, "failed": r.failed}


def _measure(target: WebTarget, pid: int, corpora: list, k: int, batch: int) -> list[dict]:
    rows = []
    for n, items in enumerate(corpora):
        rows.append(_row(f"STOW-RS run {n + 1}", run_stow(target, items, k, batch, pid)))
    for what in ("retrieve", "metadata", "metadata"):
        rows.append(_row(f"WADO-RS {what}", run_wado(target, corpora[0], 1, what, pid)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="ct")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("-k", type=int, default=4, help="concurrent HTTP clients (and DICOM associations)")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not Path(PLUGIN).exists():
        print("needs Orthanc and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="stowage-dicomweb-bench-"))
    try:
        corpora = []
        for n in range(args.runs + 1):  # one more: stowage's C-STORE run
            spec = CorpusSpec([args.kind], ["explicit"], args.count, 1, 1, 1, None, seed=100 + n)
            corpora.append(load_corpus(spec.generate(work / f"corpus{n}", lambda m: None)))
        results = {}
        port, http_port = free_port(), free_port()
        server = serve_stowage(work / "stowage", port, find_dcmtk("echoscu"), "--http-port", str(http_port))
        try:
            time.sleep(2)  # the HTTP processes start after the workers answer
            results["stowage"] = _measure(WebTarget(f"http://127.0.0.1:{http_port}/dicom-web"), server.pid,
                                          corpora[:args.runs], args.k, args.batch)
            c_store = run(Target("127.0.0.1", port, "STOWAGE"), corpora[-1], args.k, pid=server.pid, progress=False)
            results["stowage"].append(_row("C-STORE (same archive)", c_store))
        finally:
            stop_tree(server, None)
        orthanc = Orthanc(work / "orthanc", {}, Plugins=[PLUGIN], DicomWeb={"Enable": True, "Root": "/dicom-web/"})
        try:
            results["orthanc"] = _measure(WebTarget(f"http://127.0.0.1:{orthanc.http_port}/dicom-web"),
                                          orthanc.proc.pid, corpora[:args.runs], args.k, args.batch)
        finally:
            orthanc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.count} {args.kind} instances per corpus, {args.k} clients, {args.batch} instances per STOW-RS request")
    print(f"{'what':26} {'receiver':9} {'inst/s':>8} {'MB/s':>7} {'p50 ms':>8} {'CPU ms/inst':>11} {'CPU s/MB':>9}")
    for name, rows in results.items():
        for r in rows:
            print(f"{r['what']:26} {name:9} {r['inst_per_s']:8.1f} {r['mb_per_s']:7.1f} {r['p50_ms'] or 0:8.1f} "
                  f"{r['cpu_ms_per_instance'] or 0:11.2f} {r['cpu_s_per_mb'] or 0:9.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
