"""Several nodes as one archive: C-FIND on a node whose view of the other node comes from
Iceberg, against one node holding everything, and the refresh lag (a benchmark: it
reports, it asserts nothing).

``python -m stowage.bench.harness.nodes_bench [--instances 100000] [--repeat 50] [--rounds 3] [--lag-samples 8] [--json FILE]``

1. single   the query corpus (bench/harness/query_corpus.py) sealed into one node's
            catalog; `stowage serve`; the five C-FIND queries of bench/harness/find.py.
2. view     the same corpus split by patient over node A and node B, each half sealed into
            its own catalog and published to one SQLite Iceberg catalog (local warehouse);
            node B's view refreshed from it (timed: the fold of A's files); `stowage serve`
            on B with the view on; the same queries, which must find as many matches.
            Both servers run at once and are queried in `--rounds` interleaved rounds; the
            median of the rounds' p50 and p99 is reported.
3. lag      A and B both serving with the default intervals (seal_interval, iceberg_interval,
            cluster_refresh): one instance stored on A, then C-FIND on B every 0.1 s until it
            is found; seconds from A's acknowledgement to B's first match, `--lag-samples`
            times.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from stowage.bench.harness import query_corpus as qc
from stowage.bench.harness.find import STUDY_ROOT_FIND, Stowage, build_catalog, time_queries
from stowage.bench.harness.find_client import FindClient


def _env(work: Path, node: str, **more: str) -> dict[str, str]:
    return {"STOWAGE_ICEBERG_CATALOG": f"sqlite:///{work / 'iceberg.db'}",
            "STOWAGE_ICEBERG_WAREHOUSE": (work / "warehouse").as_uri(), "STOWAGE_NODE_NAME": node,
            "STOWAGE_SCRUB_RATE": "0", "STOWAGE_COMPACT_INTERVAL": "0", **more}


def _with_env(env: dict[str, str], fn):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return fn()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _config(env: dict[str, str], data_dir: Path):
    from stowage.engine.runtime.config import load
    return _with_env(env, lambda: load(None, overrides={"data_dir": data_dir}))


def _publish(env: dict[str, str], data_dir: Path) -> float:
    from stowage.engine.iceberg.publisher import Publisher
    config = _config(env, data_dir)
    started = time.perf_counter()
    p = Publisher(config)
    p.start()
    p.run_once()
    return time.perf_counter() - started


def _store_one(port: int) -> str:
    """One small CT instance of a new study stored on `port` (pynetdicom); its SOP Instance UID."""
    from pynetdicom import AE
    from pydicom.data import get_testdata_file
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ae = AE("LAGBENCH")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="STOWAGE")
    try:
        status = assoc.send_c_store(ds)
        if getattr(status, "Status", None) != 0:
            raise SystemExit(f"the store on A failed: {status}")
    finally:
        assoc.release()
    return str(ds.SOPInstanceUID)


def _image(uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = ""
    ds.SeriesInstanceUID = ""
    ds.SOPInstanceUID = uid
    return ds


def lag(work: Path, samples: int) -> dict:
    """A and B serving with the default intervals; seconds from a store on A to B finding it."""
    nodes = {}
    for name in ("a", "b"):
        data = work / f"lag-{name}" / "data"
        nodes[name] = _with_env(_env(work / "lag", f"lag-{name}"), lambda data=data: Stowage(data, workers=1))
    out = []
    try:
        client = FindClient("127.0.0.1", nodes["b"].port, "STOWAGE", STUDY_ROOT_FIND)
        try:
            for n in range(samples):
                uid = _store_one(nodes["a"].port)
                acked = time.monotonic()
                while time.monotonic() - acked < 300:
                    _final, count = client.find(_image(uid))
                    if count:
                        break
                    time.sleep(0.1)
                out.append(round(time.monotonic() - acked, 2))
                print(f"  lag sample {n + 1}: {out[-1]} s", flush=True)
        finally:
            client.close()
    finally:
        for node in nodes.values():
            node.stop()
    return {"samples_s": out, "min_s": min(out), "median_s": statistics.median(out), "max_s": max(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=100_000, help="Corpus size [100000].")
    ap.add_argument("--repeat", type=int, default=50, help="Repetitions of each query [50].")
    ap.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of single and view [3].")
    ap.add_argument("--lag-samples", type=int, default=8, help="Stores on A timed until B finds them [8].")
    ap.add_argument("--json", type=Path, help="Write the results here as JSON.")
    args = ap.parse_args()
    patients = max(2, args.instances // qc.PER_PATIENT)
    n = patients * qc.PER_PATIENT
    work = Path(tempfile.mkdtemp(prefix="nodes-bench-"))
    report: dict = {"instances": n, "cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        print(f"single node: {n} instances; node B: half of them, its view of node A the other half", flush=True)
        single = work / "single" / "data"
        build_catalog(single, patients)
        half = patients // 2
        a, b = work / "a" / "data", work / "b" / "data"
        build_catalog(a, half)
        build_catalog(b, patients, first=half)
        report["publish_a_s"] = round(_publish(_env(work, "a"), a), 2)
        report["publish_b_s"] = round(_publish(_env(work, "b"), b), 2)
        from stowage.engine.iceberg.view import Refresher
        started = time.perf_counter()
        folded = Refresher(_config(_env(work, "b"), b)).refresh()
        report["fold_s"] = round(time.perf_counter() - started, 2)
        report["folded_rows"] = folded.instance_rows
        servers = {"single": Stowage(single), "view": _with_env(_env(work, "b"), lambda: Stowage(b))}
        runs: dict[str, list] = {"single": [], "view": []}
        try:  # interleaved rounds: the shared machine's load falls on both alike
            for r in range(args.rounds):
                for name, label in (("single", "single node"), ("view", "node B (view of A)")):
                    runs[name].append(time_queries(servers[name].port, "STOWAGE", patients, n, label, args.repeat,
                                                   seed=r + 1))
        finally:
            for server in servers.values():
                server.stop()
        for name in runs:
            report[name] = [{"query": ts[0].query, "p50_ms": round(statistics.median(t.p50_ms for t in ts), 2),
                             "p99_ms": round(statistics.median(t.p99_ms for t in ts), 2),
                             "mean_matches": ts[0].mean_matches, "rounds": [t.p50_ms for t in ts]}
                            for ts in zip(*runs[name])]
        for one, other in zip(report["single"], report["view"]):
            one["ratio_view_to_single_p50"] = round(other["p50_ms"] / one["p50_ms"], 2) if one["p50_ms"] else None
            if one["mean_matches"] != other["mean_matches"]:
                print(f"  !! {one['query']}: {one['mean_matches']} matches on one node, {other['mean_matches']} "
                      "on node B", flush=True)
        print("refresh lag, default intervals", flush=True)
        report["lag"] = lag(work, args.lag_samples)
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in report.items() if k not in ("single", "view")}, indent=1))
    for one in report["single"]:
        print(f"  {one['query']:11s} single p50 {one['p50_ms']:8.2f} ms, view/single {one['ratio_view_to_single_p50']}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
