"""Compaction benchmark: how fast `stowage compact` reclaims space, and what it costs a
concurrent ingest.

    python -m stowage.bench.harness.compaction_bench [--kind ct --count 1500] [--ingest-count 3000] [-k 4] [--json out.json]

One run, on a fresh data directory with a `stowage serve` on a free loopback port:
1. fill: `stowage bench` stores the corpus (--kind/--count), then `stowage delete` removes
   every other study;
2. baseline: `stowage bench` ingests --ingest-count new small instances, no compaction;
3. compaction alone: `stowage compact` (unlimited rate) reclaims that: MB/s of segment
   bytes processed, bytes reclaimed;
4. during compaction, for each R of --rates (0: unlimited): two thirds of the studies
   left are deleted; a long `stowage bench` ingest starts; its rate is read from the
   catalog (records per second) over 3 s, then over the whole of a `stowage compact
   --rate R`, then over 3 s after: ingest rate during compaction ÷ before (and ÷ after).
Figures are printed and, with --json, written out. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stowage.bench.procs import echo, find_dcmtk, free_port, stop_tree

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True,
                       env=env, cwd=REPO)
    if check and r.returncode != 0:
        raise SystemExit(f"stowage {args[0]} failed: {r.stderr[-2000:]}")
    return r


def _bench(port: int, kind: str, count: int, k: int, seed: int, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stowage.cli", "bench", "--port", str(port), "--kind", kind,
                             "--count", str(count), "-k", str(k), "--seed", str(seed), "--json", str(out), "-q",
                             "--patients", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=REPO)


def _ingest_rate(proc: subprocess.Popen, out: Path) -> tuple[float, float, float]:
    """(inst/s, MB/s, wall seconds) of a finished `stowage bench` run."""
    _out, err = proc.communicate(timeout=3600)
    if not out.exists():
        raise SystemExit(f"stowage bench wrote no results: {err[-2000:]}")
    run = json.loads(out.read_text())["runs"][0]
    return float(run["inst_per_s"]), float(run["mb_per_s"]), float(run["wall_s"])


def _studies(data: Path, env: dict) -> list[str]:
    r = _cli("query", "--data-dir", str(data), "--format", "json",
             "SELECT DISTINCT study_instance_uid AS s FROM instances ORDER BY 1", env=env)
    return [row["s"] for row in json.loads(r.stdout or "[]")]


def _seg_bytes(data: Path) -> int:
    return sum(p.stat().st_size for p in (data / "segments").glob("*.seg"))


def _compact(data: Path, env: dict, rate: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stowage.cli", "compact", "--data-dir", str(data), "--rate",
                             str(rate)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _parse_compact(out: str) -> dict:
    """The figures `stowage compact` prints on its last line."""
    import re
    m = re.search(r"rewrote (\d+) segment\(s\).*?([\d.]+) MB reclaimed, ([\d.]+) MB/s", out)
    return {"segments": int(m[1]), "reclaimed_mb": float(m[2]), "mb_per_s": float(m[3])} if m else {"raw": out}


def _counter(data: Path):
    """count() -> how many records received since now the catalog holds (a few ms, read
    in-process; records received before are left out: compaction drops dead ones)."""
    from stowage.catalog.reader import Catalog
    catalog = Catalog(data / "catalog")
    since = time.time()
    return lambda: catalog.execute("SELECT count(*) FROM records WHERE received_at >= to_timestamp(?)",
                                   [since])[1][0][0]


def _window(count, seconds: float) -> tuple[float, float]:
    """(records per second over `seconds`, seconds measured)."""
    t0, n0 = time.monotonic(), count()
    time.sleep(seconds)
    return (count() - n0) / (time.monotonic() - t0), time.monotonic() - t0


def _during(data: Path, port: int, env: dict, args, rate: float, base_rate: float, out: Path) -> dict:
    """One long ingest run; its rate over a window before the compaction and over the
    compaction itself (adjacent windows of the same run, read from the catalog)."""
    count = _counter(data)
    ingest = _bench(port, args.ingest_kind, max(2000, int(base_rate * 40)), args.associations, 300 + int(rate),
                    out, env)
    start, deadline = count(), time.monotonic() + 120
    while count() == start and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # past the senders' start
    before, _ = _window(count, 3.0)
    t0, n0 = time.monotonic(), count()
    printed = _compact(data, env, rate).communicate()[0]
    c_s = time.monotonic() - t0
    during = (count() - n0) / c_s
    after, _ = _window(count, 3.0)
    ingest.wait(3600)
    return {"rate_limit_mb_s": rate, "compaction": _parse_compact(printed), "compaction_s": round(c_s, 2),
            "ingest_before_inst_per_s": round(before, 1), "ingest_during_inst_per_s": round(during, 1),
            "ingest_after_inst_per_s": round(after, 1),
            "ratio_during_to_before": round(during / before, 3) if before else None,
            "ratio_during_to_after": round(during / after, 3) if after else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="ct")
    ap.add_argument("--count", type=int, default=1500, help="instances stored before deleting")
    ap.add_argument("--ingest-kind", default="small")
    ap.add_argument("--ingest-count", type=int, default=3000)
    ap.add_argument("-k", "--associations", type=int, default=4)
    ap.add_argument("--rates", default="0,50", help="compaction MB/s during the ingest run (0: unlimited)")
    ap.add_argument("--segment-size", type=int, default=16 << 20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="stowage-compaction-bench-"))
    data, port = tmp / "data", free_port()
    env = dict(os.environ, STOWAGE_SEGMENT_SIZE=str(args.segment_size), STOWAGE_COMPACT_INTERVAL="0",
               STOWAGE_COMPACT_GRACE="0", STOWAGE_DATA_DIR=str(data))
    serve = subprocess.Popen([sys.executable, "-m", "stowage.cli", "serve", "--port", str(port), "--bind",
                              "127.0.0.1", "--workers", str(args.workers)], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=(tmp / "serve.log").open("wb"), start_new_session=True)
    results: dict = {"kind": args.kind, "count": args.count, "ingest_kind": args.ingest_kind,
                     "ingest_count": args.ingest_count, "associations": args.associations, "during": []}
    try:
        deadline = time.monotonic() + 60
        echoscu = find_dcmtk("echoscu")
        while not echo(echoscu, port, "STOWAGE") and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"filling: {args.count} {args.kind} instances", file=sys.stderr)
        _ingest_rate(_bench(port, args.kind, args.count, args.associations, 1, tmp / "fill.json", env),
                     tmp / "fill.json")
        studies = _studies(data, env)
        _cli("delete", "--data-dir", str(data), "--study", ",".join(studies[0::2]), "--yes", env=env)
        time.sleep(2)

        print("baseline ingest", file=sys.stderr)
        base = _ingest_rate(_bench(port, args.ingest_kind, args.ingest_count, args.associations, 100,
                                   tmp / "base.json", env), tmp / "base.json")
        results["baseline_inst_per_s"], results["baseline_mb_per_s"] = base[0], base[1]

        before = _seg_bytes(data)
        t0 = time.monotonic()
        out = _compact(data, env, 0).communicate()[0]
        alone = _parse_compact(out)
        alone.update(seconds=round(time.monotonic() - t0, 2), bytes_before=before, bytes_after=_seg_bytes(data))
        results["alone"] = alone
        print(f"compaction alone: {alone}", file=sys.stderr)

        for i, rate in enumerate(rates):
            left = _studies(data, env)  # fresh dead space: two thirds of the studies left
            _cli("delete", "--data-dir", str(data), "--study", ",".join(left[0::3] + left[1::3]), "--yes", env=env)
            time.sleep(2)
            row = _during(data, port, env, args, rate, base[0], tmp / f"during{i}.json")
            results["during"].append(row)
            print(f"during compaction (rate {rate or 'unlimited'}): {row}", file=sys.stderr)
    finally:
        stop_tree(serve, None)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
