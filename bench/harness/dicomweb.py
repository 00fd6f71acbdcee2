"""stowage's DICOMweb against Orthanc's DICOMweb plugin, on the same corpus, in one run:
STOW-RS ingest (and stowage's own C-STORE rate beside it), series metadata (first time,
from a cold page cache, and asked again; and of the last run's series first asked once it has
been stable for stowage's metadata_stable_seconds, so made ahead), WADO-RS retrieval of each series as stored (cold,
then warm), and with --qido N QIDO-RS latency at N instances (the query benchmark's corpus,
bench/harness/query_corpus.py, sent to both with storescu), each with the target's CPU per
request and per MB.

    python -m stowage.bench.harness.dicomweb --count 500 -k 4 --batch 10 --qido 100000

"Cold": every file of the receiver's data directory dropped from the page cache first
(sync, then posix_fadvise DONTNEED), so the request reads the disk as after a restart.
Each receiver's start-up is over (its process tree quiet) before the first run is timed.
`PatientName=SM*` answers one study more on Orthanc (21, stowage 20): Orthanc matches
Patient's Name case-insensitively whatever its `CaseSensitivePN` says (tried: /dicom-web and
/tools/find alike), so it also finds the STOW-RS corpus's "Smith^Anna"; stowage matches
case-sensitively unless asked (`fuzzymatching=true`, `pn_case_insensitive`). PS3.4
C.2.2.2.1 allows either for PN.

Each receiver is started fresh on an empty data directory; every run stores a corpus of its
own (new UIDs), so nothing is a duplicate. Orthanc runs with its default storage (fsync on).
"""
from __future__ import annotations

import argparse
import calendar
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from stowage.bench.command import CorpusSpec
from stowage.bench.dicomweb import WebTarget, run_stow, run_wado, series_of
from stowage.bench.harness.dicomweb_lean import run_lean
from stowage.bench.harness.orthanc import Orthanc
from stowage.bench.loadgen import Target, load_corpus, run
from stowage.engine.runtime.config import Config
from stowage.engine.store.series_cache import SeriesCache
from stowage.bench.procs import TreeMonitor, find_dcmtk, free_port, serve_stowage, stop_tree

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STABLE_S = Config().metadata_stable_seconds  # stowage's default, which the bench runs with


def _row(name: str, r, requests: int) -> dict:
    cpu, machine = r.target_cpu_s, r.machine_cpu_s
    moved = r.mb_per_s * r.wall_s
    return {"what": name, "inst_per_s": r.inst_per_s, "mb_per_s": r.mb_per_s, "p50_ms": r.latency_ms.get("p50"),
            "cpu_ms_per_request": round(cpu / requests * 1e3, 2) if cpu and requests else None,
            "cpu_ms_per_instance": round(cpu / r.completed * 1e3, 3) if cpu and r.completed else None,
            "cpu_s_per_mb": round(cpu / moved, 4) if cpu and moved else None,
            # every core's busy time over the run: clients, receiver and the kernel
            "machine_ms_per_instance": round(machine / r.completed * 1e3, 3) if machine and r.completed else None,
            "machine_s_per_mb": round(machine / moved, 4) if machine and moved else None, "failed": r.failed}


def evict(root: Path) -> None:
    """Drop every file under `root` from the page cache (written back first)."""
    os.sync()
    for path in root.rglob("*"):
        try:
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        except OSError:
            pass


def _measure(target: WebTarget, pid: int, corpora: list, k: int, batch: int, data: Path) -> list[dict]:
    rows = []
    for n, items in enumerate(corpora):
        r = run_stow(target, items, k, batch, pid)
        rows.append(_row(f"STOW-RS run {n + 1}", r, -(-len(items) // batch)))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    stored = time.monotonic()
    series = len(series_of(corpora[0]))
    for what, label, cold in (("metadata", "series metadata, first (cold)", True),
                              ("metadata", "series metadata, again", False),
                              ("retrieve", "WADO-RS retrieve (cold)", True),
                              ("retrieve", "WADO-RS retrieve (warm)", False)):
        if cold:
            evict(data)
        rows.append(_row(label, run_wado(target, corpora[0], 1, what, pid), series))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    # The same retrieves by the lean client (http.client's read() costs the client up to 1.7
    # ms/MB on Orthanc's chunked answer, more than the server: bench/harness/dicomweb_lean.py):
    # cold, then warm alone and two at once.
    listed, nbytes = series_of(corpora[0]), sum(it.length for it in corpora[0])
    for clients, cold in ((1, True), (1, False), (2, False)):
        label = f"WADO-RS retrieve ({'cold' if cold else 'warm'}, lean)" + (f" x{clients}" if clients > 1 else "")
        if cold:
            evict(data)
        rows.append(_row(label, run_lean(target, listed, clients, nbytes, pid), series * clients))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    # The last run's series, asked for the first time once it has been stable a while: stowage
    # has made its metadata ahead by then (metadata_stable_seconds, engine/web/stable_series.py);
    # Orthanc 1.10's plugin makes it on request, as in the first row.
    time.sleep(max(0.0, STABLE_S + 5 - (time.monotonic() - stored)))
    TreeMonitor(pid).settle()
    evict(data)
    last = corpora[-1]
    last_series = series_of(last)  # (each call reads every file's header)
    ahead = [SeriesCache(data).path(uid).exists() for _study, uid, _n in last_series]
    rows.append(_row("series metadata, first, stable (cold)", run_wado(target, last, 1, "metadata", pid),
                     len(last_series)))
    rows[-1]["made_ahead"] = sum(ahead)  # stowage's kept files found before the request (Orthanc: none)
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# --- QIDO-RS at 10^5 instances ----------------------------------------------------------------

QIDO_KINDS = ("patient_id", "name_sm", "month", "uid_list", "series")


def qido_request(kind: str, patients: int, rng: random.Random) -> str:
    """The path and query of one QIDO-RS request of `kind` (the C-FIND benchmark's five)."""
    from stowage.bench.harness import query_corpus as qc
    p = rng.randrange(patients)
    if kind == "patient_id":
        return f"/studies?PatientID=PID{p:07d}"
    if kind == "name_sm":
        return "/studies?PatientName=SM*"
    if kind == "month":
        y, m = rng.randrange(2015, 2025), rng.randrange(1, 13)
        return f"/studies?StudyDate={y}{m:02d}01-{y}{m:02d}{calendar.monthrange(y, m)[1]:02d}"
    if kind == "uid_list":
        picks = set()
        while len(picks) < min(50, patients * qc.STUDIES_PER_PATIENT):
            picks.add((rng.randrange(patients), rng.randrange(qc.STUDIES_PER_PATIENT)))
        return "/studies?StudyInstanceUID=" + ",".join(qc.uid("study", a, b) for a, b in sorted(picks))
    s, r = rng.randrange(qc.STUDIES_PER_PATIENT), rng.randrange(qc.SERIES_PER_STUDY)
    return f"/studies/{qc.uid('study', p, s)}/series/{qc.uid('series', p, s, r)}/instances"


def time_qido(target: WebTarget, pid: int, patients: int, repeat: int) -> list[dict]:
    """p50/p90 round trip of each kind on one kept-alive connection (5 warm-up requests
    first), the matches per answer and the receiver's CPU per request."""
    out = []
    conn = target.connection()
    try:
        for kind in QIDO_KINDS:
            rng = random.Random(f"1-{kind}")
            times, matches, failed = [], [], 0
            for _ in range(5):
                conn.request("GET", target.path(qido_request(kind, patients, rng)),
                             headers=target.headers(Accept="application/dicom+json"))
                conn.getresponse().read()
            monitor = TreeMonitor(pid)
            cpu0 = monitor.sample()
            monitor.start()
            for _ in range(repeat):
                path = target.path(qido_request(kind, patients, rng))
                t0 = time.perf_counter()
                conn.request("GET", path, headers=target.headers(Accept="application/dicom+json"))
                resp = conn.getresponse()
                body = resp.read()
                times.append((time.perf_counter() - t0) * 1e3)
                if resp.status not in (200, 204):
                    failed += 1
                matches.append(len(json.loads(body)) if resp.status == 200 else 0)
            monitor.stop()
            times.sort()
            out.append({"what": f"QIDO-RS {kind}", "p50_ms": round(statistics.median(times), 2),
                        "p90_ms": round(times[int(len(times) * 0.9)], 2), "matches": round(statistics.mean(matches), 1),
                        "cpu_ms_per_request": round((monitor.cpu - cpu0) / repeat * 1e3, 2), "failed": failed})
            print(f"  {out[-1]}", file=sys.stderr, flush=True)
    finally:
        conn.close()
    return out


def _write_share(patients: int, out: Path, k: int, n: int) -> list[Path]:
    from stowage.bench.harness import query_corpus as qc
    paths = []
    for series in itertools.islice(qc.series_list(patients), k, None, n):
        for i in series.instances:
            p = out / f"{series.patient:07d}-{series.study}-{series.series}-{i:03d}.dcm"
            if not p.exists():
                qc.dataset(series, i).save_as(p, enforce_file_format=True)
            paths.append(p)
    return paths


def write_qido_files(patients: int, out: Path, processes: int = os.cpu_count() or 1) -> list[Path]:
    """query_corpus's files of `patients` patients in `out` (kept ones reused), written by
    several processes."""
    import multiprocessing as mp
    out.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(processes) as pool:
        shares = pool.starmap(_write_share, [(patients, out, k, processes) for k in range(processes)])
    return sorted(p for share in shares for p in share)


def _load_qido(port: int, aet: str, files: list[Path]) -> float:
    from stowage.bench.harness.find import store_files
    took = store_files(port, aet, files)
    time.sleep(5)  # the last tails seal (stowage), the index settles (Orthanc)
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="ct")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("-k", type=int, default=4, help="concurrent HTTP clients (and DICOM associations)")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--qido", type=int, default=0, help="instances to load for the QIDO-RS latency (0: none)")
    ap.add_argument("--repeat", type=int, default=30, help="timed QIDO-RS requests per query kind")
    ap.add_argument("--qido-dir", type=Path, help="keep the QIDO-RS corpus files here (reused by the next run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not Path(PLUGIN).exists():
        print("needs Orthanc and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="stowage-dicomweb-bench-"))
    machine = [os.getloadavg()[0]]  # the load average at each phase's end

    def say(msg: str) -> None:
        machine.append(os.getloadavg()[0])
        print(msg, file=sys.stderr, flush=True)

    loads = {}
    measured = False
    try:
        corpora = []
        for n in range(args.runs + 1):  # one more: stowage's C-STORE run
            spec = CorpusSpec([args.kind], ["explicit"], args.count, 1, 1, 1, None, seed=100 + n)
            corpora.append(load_corpus(spec.generate(work / f"corpus{n}", lambda m: None)))
        qido_files, patients = [], 0
        if args.qido:
            from stowage.bench.harness import query_corpus as qc
            patients = max(1, args.qido // qc.PER_PATIENT)
            say(f"writing {patients * qc.PER_PATIENT} files for QIDO-RS")
            qido_files = write_qido_files(patients, args.qido_dir or work / "qido")
        results = {}
        port, http_port = free_port(), free_port()
        server = serve_stowage(work / "stowage", port, find_dcmtk("echoscu"), "--http-port", str(http_port))
        try:
            TreeMonitor(server.pid).settle()  # done starting (HTTP processes import, open their store path)
            target = WebTarget(f"http://127.0.0.1:{http_port}/dicom-web")
            say("stowage: STOW-RS, metadata, WADO-RS")
            results["stowage"] = _measure(target, server.pid, corpora[:args.runs], args.k, args.batch,
                                          work / "stowage")
            c_store = run(Target("127.0.0.1", port, "STOWAGE"), corpora[-1], args.k, pid=server.pid, progress=False)
            results["stowage"].append(_row("C-STORE (same archive)", c_store, c_store.completed))
            if qido_files:
                say("stowage: loading the QIDO-RS corpus")
                loads["stowage"] = round(_load_qido(port, "STOWAGE", qido_files), 1)
                results["stowage"] += time_qido(target, server.pid, patients, args.repeat)
        finally:
            stop_tree(server, None)
        orthanc = Orthanc(work / "orthanc", {"bench": ("BENCHSCU", "127.0.0.1", 1)}, nodelay=True, timeout=120,
                          Plugins=[PLUGIN], DicomWeb={"Enable": True, "Root": "/dicom-web/"},
                          DicomCheckCalledAet=False, DicomAlwaysAllowStore=True, DicomThreadsCount=4, SaveJobs=False)
        try:
            TreeMonitor(orthanc.proc.pid).settle()
            target = WebTarget(f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
            say("Orthanc: STOW-RS, metadata, WADO-RS")
            results["orthanc"] = _measure(target, orthanc.proc.pid, corpora[:args.runs], args.k, args.batch,
                                          work / "orthanc")
            if qido_files:
                say("Orthanc: loading the QIDO-RS corpus")
                loads["orthanc"] = round(_load_qido(orthanc.dicom_port, "ORTHANC", qido_files), 1)
                results["orthanc"] += time_qido(target, orthanc.proc.pid, patients, args.repeat)
        finally:
            orthanc.stop()
        measured = True
    finally:
        if not measured:
            shutil.rmtree(work, ignore_errors=True)
    machine.append(os.getloadavg()[0])
    print(f"{args.count} {args.kind} instances per corpus, {args.k} clients, {args.batch} instances per STOW-RS "
          f"request; load average {min(machine):.1f}-{max(machine):.1f} (1-minute, at each phase's end)")
    print("CPU: the receiver's process tree; machine: every core's busy time over the run (clients, receiver, kernel)")
    print(f"{'what':38} {'receiver':9} {'inst/s':>8} {'MB/s':>7} {'p50 ms':>8} {'CPU ms/req':>10} "
          f"{'CPU ms/inst':>11} {'CPU s/MB':>9} {'mach ms/inst':>12} {'mach s/MB':>9}")
    for name, rows in results.items():
        for r in rows:
            if r["what"].startswith("QIDO"):
                continue
            print(f"{r['what']:38} {name:9} {r['inst_per_s']:8.1f} {r['mb_per_s']:7.1f} {r['p50_ms'] or 0:8.1f} "
                  f"{r['cpu_ms_per_request'] or 0:10.2f} {r['cpu_ms_per_instance'] or 0:11.2f} "
                  f"{r['cpu_s_per_mb'] or 0:9.4f} {r.get('machine_ms_per_instance') or 0:12.2f} "
                  f"{r.get('machine_s_per_mb') or 0:9.4f}")
    if args.qido:
        print(f"QIDO-RS at {args.qido} instances (loaded with storescu in {loads}), {args.repeat} requests each")
        print(f"{'query':22} {'receiver':9} {'p50 ms':>8} {'p90 ms':>8} {'matches':>8} {'CPU ms/req':>10}")
        for name, rows in results.items():
            for r in rows:
                if r["what"].startswith("QIDO"):
                    print(f"{r['what']:22} {name:9} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} {r['matches']:8.1f} "
                          f"{r['cpu_ms_per_request']:10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "qido_loads_s": loads,
                                         "load_average": [min(machine), max(machine)]}, indent=1))
    shutil.rmtree(work, ignore_errors=True)  # after the report: removing 10^5 files takes minutes on a busy disk
    return 0


if __name__ == "__main__":
    sys.exit(main())
