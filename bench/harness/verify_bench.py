"""How fast `stowage verify` re-reads an archive, against the disk's sequential read rate
(a benchmark: it reports, it asserts nothing).

``python -m stowage.bench.harness.verify_bench [--data-dir DIR] [--kind ct,mr] [--count 1000] [--rate 50] [--json FILE]``

Without ``--data-dir``, fills a fresh archive first: ``stowage serve`` (2 workers, fsync,
scrub off) on a free 127.0.0.1 port, loaded by ``stowage bench`` with ``--count``
instances of each ``--kind`` (bench/corpus.py), then stopped. Then, on the segment files:

1. disk     every segment file read sequentially in 8 MiB reads, its pages dropped from
            the page cache first (posix_fadvise DONTNEED): the cold sequential read rate.
2. cold     the verifier (engine/lifecycle/verify.py, what `stowage verify` runs) over the whole
            archive, unpaced, pages dropped first: both checksums of every record and
            the catalog cross-check. Its MB/s (bytes on disk) ÷ the disk's is the figure.
3. warm     the same with every page cached: the CPU-bound rate (decompression, CRCs).
   jobs     cold again, ``--jobs`` segments at once (`stowage verify --jobs`; one per core by
            default): with one segment per worker, an archive has at least that many.
4. paced    the verifier at ``--rate`` MB/s for about 10 s: the rate it keeps, and the
            slowest and fastest whole second (steady pacing, no bursts).

CPU seconds are this process's (user + system, all threads) over each run; MB per CPU
second is the rate one free core would give, whatever else shares the machine. The temporary archive is
removed at the end; the server is stopped by PID.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stowage.bench.procs import find_dcmtk, free_port, serve_stowage, stop_tree
from stowage.engine.lifecycle.verify import Pacer, Stopped, Tally, Verifier, verify_all


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _segments(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "segments").glob("*.seg"))


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_rate(paths: list[Path]) -> dict:
    drop_cache(paths)
    total, started = 0, time.monotonic()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while chunk := os.read(fd, 8 << 20):
                total += len(chunk)
        finally:
            os.close(fd)
    seconds = time.monotonic() - started
    return {"bytes": total, "seconds": round(seconds, 3), "mb_s": round(total / seconds / 1e6, 1)}


def verify_rate(data_dir: Path, rate_mb: float | None = None, limit_s: float | None = None,
                cold: bool = True, jobs: int = 1) -> dict:
    paths = _segments(data_dir)
    if cold:
        drop_cache(paths)
    else:
        for p in paths:
            with open(p, "rb") as f:
                while f.read(8 << 20):
                    pass
    seconds_seen: dict[int, int] = {}
    started = time.monotonic()

    def on_progress(_segment: str, _offset: int, n: int) -> None:
        second = int(time.monotonic() - started)
        seconds_seen[second] = seconds_seen.get(second, 0) + n
        if limit_s is not None and time.monotonic() - started > limit_s:
            verifier.pacer.stop.set()

    pacer = Pacer(rate_mb * 1e6 if rate_mb else None)
    verifiers = [Verifier(data_dir, pacer, by="bench", on_progress=on_progress) for _ in range(jobs)]
    verifier = verifiers[0]
    cpu0 = _cpu()
    try:
        verify_all(verifiers, verifier.plan())
    except Stopped:
        pass
    finally:
        for v in verifiers:
            v.close()
    seconds = time.monotonic() - started
    t = Tally()
    for v in verifiers:
        t.add(v.tally)
    out = {"records": t.records, "bytes": t.bytes, "seconds": round(seconds, 3),
           "mb_s": round(t.bytes / seconds / 1e6, 1), "cpu_s": round(_cpu() - cpu0, 2), "problems": len(t.problems)}
    out["mb_per_cpu_s"] = round(t.bytes / 1e6 / out["cpu_s"], 1) if out["cpu_s"] else 0.0
    whole = [n for s, n in seconds_seen.items() if s < int(seconds)]
    if rate_mb and whole:
        out["slowest_second_mb"] = round(min(whole) / 1e6, 1)
        out["fastest_second_mb"] = round(max(whole) / 1e6, 1)
    return out


def fill(work: Path, kinds: str, count: int) -> Path:
    echoscu = find_dcmtk("echoscu")
    if echoscu is None:
        raise SystemExit("DCMTK's echoscu is needed to start the archive: apt-get install dcmtk")
    data, port = work / "data", free_port()
    os.environ["STOWAGE_SCRUB_RATE"] = "0"
    server = serve_stowage(data, port, echoscu, "--workers", "2")
    try:
        r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "--port", str(port), "--kind", kinds,
                            "--count", str(count), "-k", "2", "-q"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"loading the archive failed:\n{r.stdout}\n{r.stderr}")
    finally:
        stop_tree(server, None)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, help="An existing archive (left as it is) instead of a fresh one.")
    ap.add_argument("--kind", default="ct,mr", help="Corpus kinds to fill a fresh archive with [ct,mr].")
    ap.add_argument("--count", type=int, default=1000, help="Instances per kind [1000].")
    ap.add_argument("--rate", type=float, default=50.0, help="MB/s of the paced run [50].")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Threads of the parallel run [cores].")
    ap.add_argument("--json", type=Path, help="Write the results here as JSON.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    try:
        data = args.data_dir or fill(work, args.kind, args.count)
        segments = _segments(data)
        results = {"archive_bytes": sum(p.stat().st_size for p in segments), "segments": len(segments),
                   "disk": disk_rate(segments), "cold": verify_rate(data), "warm": verify_rate(data, cold=False),
                   "cold_jobs": verify_rate(data, jobs=args.jobs),
                   "paced": verify_rate(data, args.rate, limit_s=10.0)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    d, c, w, p = results["disk"], results["cold"], results["warm"], results["paced"]
    print(f"archive: {results['archive_bytes'] / 1e6:.0f} MB in {results['segments']} segment(s), "
          f"{c['records']} record(s)")
    print(f"disk, cold sequential read   {d['mb_s']:8.1f} MB/s")
    print(f"verify, cold cache           {c['mb_s']:8.1f} MB/s  ({c['mb_s'] / d['mb_s']:.2f}x the disk; "
          f"{c['mb_per_cpu_s']:.0f} MB per CPU second, {c['problems']} problem(s))")
    print(f"verify, warm cache           {w['mb_s']:8.1f} MB/s  (CPU-bound; {w['mb_per_cpu_s']:.0f} MB per CPU second)")
    j = results["cold_jobs"]
    print(f"verify --jobs {args.jobs:<2d} cold cache   {j['mb_s']:8.1f} MB/s  ({j['mb_s'] / d['mb_s']:.2f}x the disk; "
          f"{j['mb_per_cpu_s']:.0f} MB per CPU second)")
    print(f"verify --rate {args.rate:g}            {p['mb_s']:8.1f} MB/s  (whole seconds from "
          f"{p.get('slowest_second_mb', 0):.1f} to {p.get('fastest_second_mb', 0):.1f} MB)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
