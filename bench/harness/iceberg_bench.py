"""What committing the catalog to Iceberg costs (a benchmark: it reports, it asserts nothing).

``python -m stowage.bench.harness.iceberg_bench [--catalog sqlite|rest|URI] [--publishers 1,2,4]
[--commits 40] [--rows 2000]``

Each publisher is a process with a data directory of its own (a node), holding `--commits`
sealed catalog files of `--rows` rows written by the real sealer; it publishes them one file
per commit (iceberg_batch_files = 1) through engine/iceberg/publisher.py to one shared
catalog, all publishers at once. Reported per run: the commit latency (add_files until
the catalog has swapped the table's metadata pointer: median and 95th percentile, first
and last quarter apart, since every commit lengthens the table's history), the copy of
each file into the warehouse, commits per second landed by all publishers together, and
the conflicts (a commit that lost the race and was made again on the new head).

`--catalog sqlite` (default): a SQL catalog on SQLite, warehouse on local disk.
`--catalog rest`: SeaweedFS's Iceberg REST catalog with the warehouse in its S3 table
bucket (started here, on loopback, with tests/s3_server.py). Any other value is used as
the iceberg_catalog URI as is (e.g. postgresql://...).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from stowage.catalog.schema import SCHEMA
from stowage.catalog.sealer import seal_rows


def _seal(data_dir: Path, files: int, rows: int) -> None:
    (data_dir / "catalog").mkdir(parents=True, exist_ok=True)
    base = abs(hash(data_dir.name)) % 10**8
    for f in range(files):
        n = range(rows)
        table = pa.table({
            "sop_instance_uid": [f"2.25.{base}.{f}.{r}" for r in n],
            "study_instance_uid": [f"2.25.{base}.{f}.{r // 100}" for r in n],
            "series_instance_uid": [f"2.25.{base}.{f}.{r // 50}.1" for r in n],
            "patient_id": [f"P{base}-{f}-{r // 200}" for r in n],
            "modality": ["CT"] * rows,
            "segment": [f"{data_dir.name}-{f:04d}.seg"] * rows,
            "offset": [r * 600_000 for r in n],
            "record_length": [600_000] * rows,
            "received_at": pa.array([1_700_000_000_000_000 + f * rows + r for r in n], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")),
        })
        seal_rows(data_dir / "catalog", _full(table))


def _full(table: pa.Table) -> pa.Table:
    """`table` with every catalog column (the missing ones null), in the catalog's types."""
    cols = [table[c].cast(SCHEMA.field(c).type) if c in table.column_names
            else pa.nulls(table.num_rows, SCHEMA.field(c).type) for c in SCHEMA.names]
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def _publisher(args: tuple) -> dict:
    data_dir, overrides, env, start_at = args
    os.environ.update(env)
    from stowage.engine.iceberg import ledger
    from stowage.engine.iceberg.publisher import Publisher
    from stowage.engine.runtime.config import load
    config = load(overrides={**overrides, "data_dir": data_dir, "node_name": Path(data_dir).name,
                             "iceberg_batch_files": 1})
    publisher = Publisher(config)
    publisher.start()
    copies: list[float] = []
    upload = publisher._upload

    def timed_upload(batch):
        t0 = time.perf_counter()
        upload(batch)
        copies.append(time.perf_counter() - t0)
    publisher._upload = timed_upload
    while time.time() < start_at:
        time.sleep(0.005)
    t0 = time.perf_counter()
    done = publisher.run_once()
    wall = time.perf_counter() - t0
    led = ledger.load(Path(data_dir) / "iceberg")
    return {"latencies": done.commit_seconds, "copies": copies, "wall": wall, "conflicts": led.conflicts,
            "commits": led.commits}


def _ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


def run(uri: str, overrides: dict, env: dict, publishers: int, commits: int, rows: int, base: Path) -> dict:
    dirs = [base / f"node-{publishers}-{i}" for i in range(publishers)]
    for d in dirs:
        _seal(d, commits, rows)
    start_at = time.time() + 3.0  # every process has opened the catalog by then
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(publishers) as pool:
        results = pool.map(_publisher, [(str(d), {**overrides, "iceberg_catalog": uri}, env, start_at) for d in dirs])
    latencies = [x for r in results for x in r["latencies"]]
    quarter = max(1, commits // 4)
    first = [x for r in results for x in r["latencies"][:quarter]]
    last = [x for r in results for x in r["latencies"][-quarter:]]
    wall = max(r["wall"] for r in results)
    landed = sum(len(r["latencies"]) for r in results)
    return {"publishers": publishers, "commits": landed, "wall_s": wall, "commits_per_s": landed / wall,
            "commit_p50_ms": _ms(latencies, 0.5), "commit_p95_ms": _ms(latencies, 0.95),
            "first_quarter_p50_ms": _ms(first, 0.5), "last_quarter_p50_ms": _ms(last, 0.5),
            "copy_p50_ms": _ms([x for r in results for x in r["copies"]], 0.5),
            "conflicts": sum(r["conflicts"] for r in results)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", default="sqlite")
    ap.add_argument("--publishers", default="1,2,4")
    ap.add_argument("--commits", type=int, default=40, help="commits per publisher (one sealed file each)")
    ap.add_argument("--rows", type=int, default=2000, help="rows per sealed file")
    ap.add_argument("--data-dir", type=Path, help="work here (default: a temporary folder, removed)")
    a = ap.parse_args(argv)
    base = a.data_dir or Path(tempfile.mkdtemp(prefix="iceberg-bench-"))
    weed = None
    try:
        env: dict[str, str] = {}
        for n in map(int, a.publishers.split(",")):
            overrides: dict = {}
            work = base / f"run-{n}"
            if a.catalog == "sqlite":
                uri = f"sqlite:///{work / 'catalog.db'}"
                overrides["iceberg_warehouse"] = (work / "warehouse").as_uri()
            elif a.catalog == "rest":
                if weed is None:
                    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
                    import boto3
                    import s3_server
                    weed, server = s3_server.start(base / "seaweedfs")
                    env = {**server.env(), "PYICEBERG_CATALOG__STOWAGE__CREDENTIAL":
                           f"{server.access_key}:{server.secret_key}"}
                bucket = f"bench-{n}-{os.getpid()}"
                boto3.client("s3tables", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                             aws_secret_access_key=server.secret_key, region_name=server.region
                             ).create_table_bucket(name=bucket)
                uri = server.iceberg_url
                overrides["iceberg_warehouse"] = f"s3://{bucket}"
            else:
                uri = a.catalog
                overrides["iceberg_namespace"] = f"bench{n}_{os.getpid()}"
            r = run(uri, overrides, env, n, a.commits, a.rows, work)
            print(f"{a.catalog}: {r['publishers']} publisher(s), {r['commits']} commits of one {a.rows}-row file "
                  f"in {r['wall_s']:.1f} s = {r['commits_per_s']:.1f} commits/s landed; commit p50 "
                  f"{r['commit_p50_ms']:.0f} ms, p95 {r['commit_p95_ms']:.0f} ms (first quarter p50 "
                  f"{r['first_quarter_p50_ms']:.0f} ms, last {r['last_quarter_p50_ms']:.0f} ms); copy p50 "
                  f"{r['copy_p50_ms']:.0f} ms; {r['conflicts']} conflict(s) retried", flush=True)
    finally:
        if weed is not None:
            import s3_server
            s3_server.stop(weed)
        if a.data_dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
