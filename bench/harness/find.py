"""C-FIND latency benchmark: stowage at 10^5 and 10^6 instances, and stowage against
Orthanc loaded with the same files.

    python -m stowage.bench.harness.find [--sizes 100000 1000000] [--realistic 100000] [--repeat 200]
                         [--orthanc/--no-orthanc] [--tmp DIR] [--json out.json]

Two ways to load stowage:
  catalog    rows of the bench corpus (bench/harness/query_corpus.py) sealed straight into the
             catalog, with the same tiered compaction a live archive does (for 10^6
             instances in minutes; no segments, so nothing to retrieve, only to find);
  realistic  the corpus as Part-10 files, sent with DCMTK storescu (4 associations) to a
             running stowage, and the same files to Orthanc, queried in the same run.

Five queries, each timed as the round trip of one C-FIND (request to final response) on
an open association with a pynetdicom SCU, with fresh values each repetition:
  patient_id   STUDY level, exact Patient ID
  name_sm      STUDY level, Patient's Name SM*
  month        STUDY level, Study Date range over one month
  uid_list     STUDY level, a list of 50 Study Instance UIDs
  series       IMAGE level, every instance of one series
STUDY queries ask for the keys a viewer asks for (date, time, accession, description,
name, ID, Modalities in Study, Number of Study Related Instances).
"""
from __future__ import annotations

import argparse
import calendar
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from pydicom.dataset import Dataset

from stowage.bench.harness import query_corpus as qc
from stowage.bench.harness.find_client import FindClient
from stowage.bench.harness.orthanc import Orthanc, executable
from stowage.bench.procs import echo, find_dcmtk, free_port, tail
from stowage.engine.runtime.stop_process import stop_process

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
REPO = Path(__file__).resolve().parents[2]
QUERIES = ("patient_id", "name_sm", "month", "uid_list", "series")


# --- the queries ----------------------------------------------------------------------------


def _study(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for kw in ("StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "PatientName", "PatientID",
               "StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):
        setattr(ds, kw, "")
    for kw, v in keys.items():
        setattr(ds, kw, v)
    return ds


def make_query(kind: str, patients: int, rng: random.Random) -> Dataset:
    p = rng.randrange(patients)
    if kind == "patient_id":
        return _study(PatientID=f"PID{p:07d}")
    if kind == "name_sm":
        return _study(PatientName="SM*")
    if kind == "month":
        y, m = rng.randrange(2015, 2025), rng.randrange(1, 13)
        return _study(StudyDate=f"{y}{m:02d}01-{y}{m:02d}{calendar.monthrange(y, m)[1]:02d}")
    if kind == "uid_list":
        picks = {(rng.randrange(patients), rng.randrange(qc.STUDIES_PER_PATIENT)) for _ in range(50)}
        while len(picks) < min(50, patients * qc.STUDIES_PER_PATIENT):
            picks.add((rng.randrange(patients), rng.randrange(qc.STUDIES_PER_PATIENT)))
        return _study(StudyInstanceUID="\\".join(qc.uid("study", a, b) for a, b in sorted(picks)))
    if kind == "series":
        s, r = rng.randrange(qc.STUDIES_PER_PATIENT), rng.randrange(qc.SERIES_PER_STUDY)
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = qc.uid("study", p, s), qc.uid("series", p, s, r)
        ds.SOPInstanceUID = ds.SOPClassUID = ds.InstanceNumber = ""
        return ds
    raise ValueError(kind)


@dataclass
class Timing:
    target: str
    instances: int
    query: str
    p50_ms: float
    p99_ms: float
    mean_matches: float
    repeat: int
    errors: int = 0


def time_queries(port: int, aet: str, patients: int, instances: int, target: str, repeat: int,
                 seed: int = 1) -> list[Timing]:
    """p50/p99 of each query's round trip, on one association, after a warm-up. The SCU is
    bench.harness.find_client (blocking reads): pynetdicom as the SCU would time its own polling."""
    client = FindClient("127.0.0.1", port, aet, STUDY_ROOT_FIND)
    out = []
    try:
        for kind in QUERIES:
            rng = random.Random(f"{seed}-{kind}")
            times, matches, errors = [], [], 0
            for n in range(repeat + 5):
                ds = make_query(kind, patients, rng)
                t0 = time.perf_counter()
                final, count = client.find(ds)
                elapsed = time.perf_counter() - t0
                if final != 0:
                    errors += 1
                if n >= 5:  # the first five warm caches up
                    times.append(elapsed * 1000)
                    matches.append(count)
            times.sort()
            out.append(Timing(target, instances, kind, round(statistics.median(times), 2),
                              round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
                              round(statistics.mean(matches), 1), repeat, errors))
            print(f"  {target:28s} {instances:>8d} {kind:11s} p50 {out[-1].p50_ms:8.2f} ms  "
                  f"p99 {out[-1].p99_ms:8.2f} ms  ({out[-1].mean_matches:.0f} matches)", flush=True)
    finally:
        client.close()
    return out


# --- stowage ----------------------------------------------------------------------------------


def build_catalog(data_dir: Path, patients: int, batch: int = 25_600, first: int = 0) -> float:
    """Seal the corpus rows of patients [first, patients) straight into data_dir/catalog,
    compacting as a live archive does; returns seconds taken."""
    from stowage.catalog.sealer import compact, seal_rows
    catalog = data_dir / "catalog"
    catalog.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for row in qc.rows(patients, first):
        rows.append(row)
        if len(rows) == batch:
            seal_rows(catalog, rows)
            rows = []
            while compact(catalog, 8):
                pass
    if rows:
        seal_rows(catalog, rows)
    while compact(catalog, 8):
        pass
    return time.perf_counter() - t0


class Stowage:
    def __init__(self, data_dir: Path, workers: int = 2) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = data_dir.parent / f"stowage-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(data_dir),
                                          "--port", str(self.port), "--bind", "127.0.0.1", "--http-port", "0",
                                          "--workers", str(workers)],
                                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: echo(find_dcmtk("echoscu"), self.port, "STOWAGE"), self.proc, self.log, 600)

    def stop(self) -> None:
        _stop(self.proc)


# --- Orthanc ----------------------------------------------------------------------------------


def start_orthanc(workdir: Path) -> Orthanc:
    """Orthanc set up to answer any C-FIND and take any C-STORE, with no limit on matches."""
    return Orthanc(workdir, {"bench": ("BENCHSCU", "127.0.0.1", 1)}, nodelay=True, new_session=True, timeout=120,
                   DicomCheckCalledAet=False, DicomAlwaysAllowFind=True, DicomAlwaysAllowStore=True,
                   LimitFindResults=0, LimitFindInstances=0, DicomThreadsCount=4, SaveJobs=False)


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"did not start; log tail:\n{tail(log)}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    stop_process(proc, 60, kill_wait=10)


def store_files(port: int, aet: str, files: list[Path], associations: int = 4) -> float:
    """C-STORE files with DCMTK storescu over `associations` associations; seconds taken."""
    storescu = find_dcmtk("storescu")
    shares = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, share in enumerate(shares):
            d = Path(tmp) / f"share{i}"
            d.mkdir()
            for f in share:
                (d / f.name).symlink_to(f.resolve())
            procs.append(subprocess.Popen([storescu, "-aet", "BENCHSCU", "-aec", aet, "+sd", "-ta", "600",
                                           "127.0.0.1", str(port), str(d)], env=dict(os.environ, TCP_NODELAY="1"),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for p in procs:
            _out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"storescu to {aet} failed: {err[-500:]}")
    return time.perf_counter() - t0


# --- the runs --------------------------------------------------------------------------------------


@dataclass
class Report:
    machine: dict
    loads: list[dict] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)


def run(args: argparse.Namespace) -> Report:
    report = Report({"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                     "load_average_at_start": [round(x, 2) for x in os.getloadavg()]})
    base = Path(tempfile.mkdtemp(prefix="stowage-bench-find-", dir=args.tmp))
    try:
        for size in args.sizes:
            patients = max(1, size // qc.PER_PATIENT)
            data = base / f"catalog-{size}" / "data"
            print(f"catalog load: {patients * qc.PER_PATIENT} instances", flush=True)
            took = build_catalog(data, patients)
            report.loads.append({"target": "stowage (catalog load)", "instances": patients * qc.PER_PATIENT,
                                 "seconds": round(took, 1)})
            s = Stowage(data)
            try:
                report.timings += time_queries(s.port, "STOWAGE", patients, patients * qc.PER_PATIENT,
                                               "stowage (catalog load)", args.repeat)
            finally:
                s.stop()
            if not args.keep:
                shutil.rmtree(data.parent, ignore_errors=True)
        if args.realistic:
            patients = max(1, args.realistic // qc.PER_PATIENT)
            n = patients * qc.PER_PATIENT
            print(f"realistic load: {n} instances as files", flush=True)
            files = qc.write_files(patients, base / "files")
            s = Stowage(base / "realistic" / "data")
            try:
                took = store_files(s.port, "STOWAGE", files)
                report.loads.append({"target": "stowage (C-STORE)", "instances": n, "seconds": round(took, 1)})
                time.sleep(5)  # let the last tails seal and compaction settle, as Orthanc gets its own pause
                report.timings += time_queries(s.port, "STOWAGE", patients, n, "stowage (C-STORE)", args.repeat)
            finally:
                s.stop()
            if args.orthanc and executable():
                o = start_orthanc(base / "orthanc")
                try:
                    took = store_files(o.dicom_port, "ORTHANC", files)
                    time.sleep(5)
                    stats = o.rest("GET", "/statistics")
                    target = f"Orthanc {o.rest('GET', '/system').get('Version', '?')}"
                    report.loads.append({"target": target, "instances": int(stats["CountInstances"]),
                                         "seconds": round(took, 1)})
                    report.timings += time_queries(o.dicom_port, "ORTHANC", patients, n, target, args.repeat)
                finally:
                    o.stop(60)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        report.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def table(report: Report) -> str:
    lines = ["| target | instances | query | p50 ms | p99 ms | matches |", "|---|---:|---|---:|---:|---:|"]
    for t in report.timings:
        lines.append(f"| {t.target} | {t.instances:,} | {t.query} | {t.p50_ms:.2f} | {t.p99_ms:.2f} | "
                     f"{t.mean_matches:g} |" + (f" {t.errors} errors" if t.errors else ""))
    ours = {t.query: t for t in report.timings if t.target == "stowage (C-STORE)"}
    theirs = {t.query: t for t in report.timings if t.target.startswith("Orthanc")}
    if ours and theirs:
        lines += ["", "| query | stowage p50 | Orthanc p50 | Orthanc/stowage p50 | Orthanc/stowage p99 |",
                  "|---|---:|---:|---:|---:|"]
        for q in QUERIES:
            if q in ours and q in theirs:
                a, b = ours[q], theirs[q]
                lines.append(f"| {q} | {a.p50_ms:.2f} | {b.p50_ms:.2f} | {b.p50_ms / a.p50_ms:.2f}x | "
                             f"{b.p99_ms / a.p99_ms:.2f}x |")
    lines += ["", f"machine: {report.machine}"]
    lines += ["", "| load | instances | seconds |", "|---|---:|---:|"]
    lines += [f"| {x['target']} | {x['instances']:,} | {x['seconds']} |" for x in report.loads]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.find", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                    help="catalog-load sizes (instances)")
    ap.add_argument("--realistic", type=int, default=100_000, help="instances sent as files to stowage and Orthanc")
    ap.add_argument("--repeat", type=int, default=200, help="timed repetitions per query")
    ap.add_argument("--orthanc", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tmp", type=Path, default=None, help="where to put the archives")
    ap.add_argument("--keep", action="store_true", help="keep the archives and files")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    report = run(args)
    print()
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps({"machine": report.machine, "loads": report.loads,
                                         "timings": [asdict(t) for t in report.timings]}, indent=1))


if __name__ == "__main__":
    main()
