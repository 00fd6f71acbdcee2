"""Which load grows which process (issue #20, docs/fuzzing.md#memory): one kind of load at a
time against a `stowage serve` of its own, in rounds, with every worker's and HTTP process's
resident memory after each round.

    python -m stowage.bench.harness.fuzz_memory --kind store,find,http,valid --rounds 8 --per-round 400

Kinds: the fuzzer's own (assoc, sequence, echo, store, find, import, http), well-formed ones
(cstore and stow: a new instance each; cfind and qido: STUDY-level C-FIND, QIDO-RS at each
level; wado: instance, metadata, frames, rendered of the warm-up's instances), one HTTP
request kind alone (wado-instance, wado-series, wado-metadata, wado-frames, wado-rendered,
wado-thumbnail, wado-bulkdata, wado-uri, dashboard, qido-all: `instances?includefield=all`),
`qido-growing` (cstore and qido-all in turn: the answer grows with the archive), and `mixed`
(cstore, cfind, qido in turn: stores sealed while queries read the catalog). Each kind gets
a new server; the result is resident MiB per process after the warm-up and each round.
`STOWAGE_SEAL_MAX_AGE=1` in the environment seals as often as the soak's pauses did.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from stowage.bench.harness import damage, fuzz, fuzz_http


_QIDO = ("/studies?PatientName=*", "/series?limit=5", "/instances?includefield=all")
_WADO = (("", 'multipart/related; type="application/dicom"; transfer-syntax=*'), ("/metadata", "application/dicom+json"),
         ("/frames/1", 'multipart/related; type="application/octet-stream"'), ("/rendered", "image/jpeg"))
# One request kind alone (issue #20: which one grows an HTTP process): {instance}, {series},
# {study} are the warm-up's; each target with the Accept it is asked with.
_GETS = {
    "wado-instance": ("{instance}", 'multipart/related; type="application/dicom"; transfer-syntax=*'),
    "wado-series": ("{series}", 'multipart/related; type="application/dicom"; transfer-syntax=*'),
    "wado-metadata": ("{study}/metadata", "application/dicom+json"),
    "wado-frames": ("{instance}/frames/1", 'multipart/related; type="application/octet-stream"'),
    "wado-rendered": ("{instance}/rendered", "image/jpeg"),
    "wado-thumbnail": ("{series}/thumbnail", "image/png"),
    "wado-bulkdata": ("{instance}/bulkdata/7FE00010", "application/octet-stream"),
    "wado-uri": ("/wado?requestType=WADO&studyUID={s}&seriesUID={se}&objectUID={i}", "application/dicom"),
    "dashboard": ("/dashboard/status.json", "application/json"),
    "qido-all": ("{base}/instances?includefield=all", "application/dicom+json"),
}


def _case(archive: fuzz.Archive, kind: str, i: int, ct: bytes, rq: bytes, batch: Path) -> str | None:
    """One case of `kind`; for the single HTTP request kinds, the answer's status."""
    rng = random.Random(f"memory-{kind}-{i}")
    ds = pydicom.dcmread(BytesIO(ct), stop_before_pixels=True)
    study, series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    if kind == "cstore":  # a new instance each time
        uid = f"2.25.{rng.getrandbits(100)}"
        fuzz.Case(archive.port, rng, rq)._on_association([
            fuzz.pdata(3, 3, fuzz.command(0x0001, fuzz.CT_STORAGE, 7, True, fuzz._element(0, 0x1000, fuzz._pad(uid)))),
            fuzz.pdata(3, 2, fuzz.with_uid(ct[damage.meta_end(ct):], uid))])
    elif kind == "cfind":
        fuzz.Case(archive.port, rng, rq)._on_association([
            fuzz.pdata(5, 3, fuzz.command(0x0020, fuzz.STUDY_FIND, 9, True, fuzz._element(0, 0x0700, bytes(2)))),
            fuzz.pdata(5, 2, fuzz._element(0x0008, 0x0052, b"STUDY ") + fuzz._element(0x0010, 0x0010, b"* "))])
    elif kind == "stow":  # a new instance each time
        fuzz.stow(archive, ct, 1_000_000 + i)
    elif kind == "qido":
        fuzz_http.exchange(archive.http_port, "GET", fuzz_http.BASE + rng.choice(_QIDO), "Accept: application/dicom+json")
    elif kind == "wado":  # one of the warm-up's instances
        sop = f"2.25.{random.Random(rng.randrange(16)).getrandbits(100)}"
        path, accept = rng.choice(_WADO)
        target = f"{fuzz_http.BASE}/studies/{study}/series/{series}/instances/{sop}{path}"
        fuzz_http.exchange(archive.http_port, "GET", target, f"Accept: {accept}")
    elif kind in _GETS:
        sop = f"2.25.{random.Random(rng.randrange(16)).getrandbits(100)}"
        target, accept = _GETS[kind]
        in_study = f"{fuzz_http.BASE}/studies/{study}"
        target = target.format(base=fuzz_http.BASE, study=in_study, series=f"{in_study}/series/{series}",
                               instance=f"{in_study}/series/{series}/instances/{sop}", s=study, se=series, i=sop)
        return fuzz_http._status(fuzz_http.exchange(archive.http_port, "GET", target, f"Accept: {accept}"))
    elif kind == "qido-growing":  # what `mixed` asks of the HTTP processes, without C-FIND
        for part in ("cstore", "qido-all"):
            _case(archive, part, i, ct, rq, batch)
    elif kind == "mixed":  # stores, and queries that read what they sealed
        for part in ("cstore", "cfind", "qido"):
            _case(archive, part, i, ct, rq, batch)
    elif kind == "import":
        name, damaged = fuzz._damaged_file(ct, rng)
        (batch / f"{i:08d}-{name}.dcm").write_bytes(damaged)
    elif kind == "http":
        fuzz_http.case(archive.http_port, rng, ct)
    else:
        case = fuzz.Case(archive.port, rng, rq)
        base = ct[damage.meta_end(ct):]
        getattr(case, kind)(*((base,) if kind in ("store", "sequence") else ()))


def _snapshots(archive: fuzz.Archive, where: Path, taken: int) -> dict[int, "tracemalloc.Snapshot"]:
    """Each serving process's tracemalloc snapshot number `taken` (SIGUSR2: engine/web/process.py,
    workers/worker.py); each writes what DuckDB holds in its catalog views beside it."""
    out = {}
    roles = {pid: "http" for pid in archive.http_pids} | {pid: "worker" for pid in archive.pids}
    for pid in sorted(roles):
        os.kill(pid, signal.SIGUSR2)
    for pid, role in sorted(roles.items()):
        path = where / f"{role}-{pid}-{taken}.tm"
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if path.exists():
            out[pid] = tracemalloc.Snapshot.load(str(path))
        duck = path.with_suffix(".json")
        if duck.exists():
            for view in json.loads(duck.read_text()):
                held = sum(view["bytes"].values()) >> 10
                print(f"  {role} {pid} view: memory_limit {view['memory_limit']}, DuckDB {held} KiB "
                      f"{view['bytes']}, files live {view['live_files']}, cached {view['cached_files']}",
                      file=sys.stderr, flush=True)
    return out


def _grown(before: dict, after: dict) -> str:
    """Where Python's allocations grew between two rounds, per process: the top lines."""
    lines = []
    for pid, snap in after.items():
        if pid not in before:
            continue
        stats = snap.compare_to(before[pid], "lineno")
        total = sum(s.size_diff for s in stats)
        lines.append(f"  pid {pid}: traced {sum(s.size for s in stats) >> 10} KiB, {total / 1024:+.0f} KiB")
        lines += [f"    {s.size_diff / 1024:+8.0f} KiB {s.count_diff:+6d} {s.traceback[0].filename}:{s.traceback[0].lineno}"
                  for s in stats[:8]]
    return "\n".join(lines)


def _warm_up_dimse(archive: fuzz.Archive, ct: bytes, rq: bytes) -> None:
    """The warm-up's DICOM half only (C-STORE, C-FIND on 8 connections, 12 rounds): over an
    archive grown beforehand the HTTP half's QIDO-RS and WADO-RS keep the HTTP processes
    busy for minutes, and the DIMSE kinds do not need them."""
    with ThreadPoolExecutor(8) as pool:
        for r in range(12):
            list(pool.map(lambda i: fuzz.valid_dimse(archive, ct, rq, i), range(r * 8, r * 8 + 8)))
    time.sleep(1.0)


def probe(kind: str, rounds: int, per_round: int, work: Path, parallel: int = 4,
          trace: bool = False, dimse_warm_up: bool = False) -> dict[str, list[int]]:
    """Resident MiB of each serving process after the warm-up and after each round, its
    own (uss: without the shared file pages that rss counts once per mapping), its
    anonymous pages and the sealed-UID filter's mapped pages (fuzz.memory)."""
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    rq = fuzz.association_request()
    (work / kind).mkdir(parents=True, exist_ok=True)
    traces = work / kind / "tracemalloc"
    if trace:  # the serving processes trace Python's allocations (read once, at their start)
        traces.mkdir(exist_ok=True)
        os.environ["STOWAGE_TRACEMALLOC"] = str(traces)
    try:
        archive = fuzz.Archive(work / kind, 2)
    finally:
        os.environ.pop("STOWAGE_TRACEMALLOC", None)
    snaps: dict = {}
    series: dict[str, list[int]] = {}
    batch = work / kind / "import"

    def sample() -> None:
        time.sleep(1.0)
        for pid, u in sorted(archive.usage().items()):
            role = "http" if pid in archive.http_pids else "worker"
            series.setdefault(f"{role} {pid}", []).append(u["rss"] >> 20)
            for part in ("uss", "anon", "filter"):
                series.setdefault(f"{role} {pid} {part}", []).append(u[part] >> 20)

    try:
        if dimse_warm_up:
            _warm_up_dimse(archive, ct, rq)
        else:
            fuzz.warm_up(archive, ct, rq)
        sample()
        if trace:
            snaps = _snapshots(archive, traces, 0)
        with ThreadPoolExecutor(parallel) as pool:
            for r in range(rounds):
                began = time.monotonic()
                batch.mkdir(exist_ok=True)
                outcomes = Counter(pool.map(lambda i: _case(archive, kind, i, ct, rq, batch),
                                            range(r * per_round, (r + 1) * per_round)))
                if kind == "import":
                    fuzz._import_batch(archive, batch, fuzz._good_copy(batch, ct), fuzz.Report())
                sample()
                print(f"{kind} round {r + 1} ({time.monotonic() - began:.0f} s): " + " ".join(f"{k}={v[-1]}" for k, v in series.items())
                      + "".join(f" [{o}: {n}]" for o, n in outcomes.items() if o),
                      file=sys.stderr, flush=True)
                if trace:
                    before, snaps = snaps, _snapshots(archive, traces, r + 1)
                    print(_grown(before, snaps), file=sys.stderr, flush=True)
    finally:
        archive.stop()
    return series


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="cstore,cfind,stow,qido,wado,store,find,http,assoc,echo,sequence,import")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=400)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="the workers and HTTP processes trace Python's allocations: the lines that grew, "
                         "each round, and the workers' DuckDB memory per catalog view")
    ap.add_argument("--dimse-warm-up", action="store_true",
                    help="warm up the DICOM paths only (an archive grown beforehand in --work/KIND/data)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="stowage-memory-"))
    out = {kind: probe(kind, args.rounds, args.per_round, work, args.parallel, args.tracemalloc,
                        args.dimse_warm_up) for kind in args.kind.split(",")}
    print(json.dumps(out, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
