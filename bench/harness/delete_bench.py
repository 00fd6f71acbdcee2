"""What tombstones cost catalog lookups (a benchmark: it reports, it asserts nothing).

``python -m stowage.bench.harness.delete_bench [--patients 1000] [--data-dir DIR]``

Seals a query corpus (bench/harness/query_corpus.py: 200 instances per patient, 100 per study)
straight into a catalog, then times the lookups C-FIND, C-MOVE/C-GET, commitment and the
store path's duplicate check run (median of 15, in this process, through
catalog.reader.Catalog) with no tombstones, then after deleting 1, 100 and 1000 studies
(tombstones written with catalog.tombstones.append, as `stowage delete` does). Also
reports how long each append takes (fsync'd) and the first refresh after it (every
process pays it once per deletion: the studies holding a hidden record are summarised
again).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from stowage.bench.harness.find import build_catalog
from stowage.catalog import tombstones
from stowage.catalog.reader import Catalog

QUERIES = {
    "lookup by SOP Instance UID": "SELECT * FROM instances WHERE sop_instance_uid = ?",
    "images of one study": "SELECT sop_instance_uid FROM instances WHERE study_instance_uid = ?",
    "STUDY level, PatientName=SM*": "SELECT study_instance_uid, sum(instances) FROM study_parts "
                                    "WHERE patient_name LIKE 'SM%' GROUP BY 1",
    "STUDY level, one study": "SELECT study_instance_uid, sum(instances) FROM study_parts "
                              "WHERE study_instance_uid = ? GROUP BY 1",
}


def _median_ms(catalog: Catalog, sql: str, params: list) -> float:
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        catalog.execute(sql, params)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _row(catalog: Catalog, sample: list[tuple]) -> dict[str, float]:
    params = {"lookup by SOP Instance UID": [sample[0][0]], "images of one study": [sample[1][1]],
              "STUDY level, PatientName=SM*": [], "STUDY level, one study": [sample[2][1]]}
    return {name: _median_ms(catalog, sql, params[name]) for name, sql in QUERIES.items()}


def run(data_dir: Path, patients: int) -> None:
    if not (data_dir / "catalog").exists():
        print(f"sealing {patients * 200} instances: {build_catalog(data_dir, patients):.1f} s")
    shutil.rmtree(data_dir / "tombstones", ignore_errors=True)
    catalog = Catalog(data_dir / "catalog")
    try:
        _cols, rows = catalog.execute("SELECT DISTINCT study_instance_uid FROM records ORDER BY 1")
        studies = [r[0] for r in rows]
        _cols, sample = catalog.execute("SELECT sop_instance_uid, study_instance_uid FROM records "
                                        "USING SAMPLE 10 ROWS (reservoir, 7)")
        print(f"{'':34s}" + "".join(f"{name:>30s}" for name in QUERIES))
        print(f"{'no tombstones':34s}" + "".join(f"{v:27.1f} ms" for v in _row(catalog, sample).values()))
        done = 0
        for n in (1, 100, 1000):
            targets = studies[done:n] if n > done else []
            done = n
            _cols, recs = catalog.execute(
                "SELECT sop_instance_uid, epoch_us(received_at), study_instance_uid FROM records "
                "WHERE study_instance_uid IN (SELECT unnest(?))", [targets])
            t0 = time.perf_counter()
            tombstones.append(data_dir, [tombstones.Tombstone(u, r, "deleted", s) for u, r, s in recs])
            append_ms = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            catalog.execute("SELECT 1")
            refresh_ms = (time.perf_counter() - t0) * 1000
            total = tombstones.load(data_dir).num_rows
            label = f"{n} studies deleted ({total} tomb.)"
            print(f"{label:34s}" + "".join(f"{v:27.1f} ms" for v in _row(catalog, sample).values())
                  + f"   append {len(recs)}: {append_ms:.0f} ms, first refresh {refresh_ms:.0f} ms")
    finally:
        catalog.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--data-dir", type=Path, help="Keep the sealed corpus here (reused when present).")
    args = ap.parse_args()
    if args.data_dir:
        run(args.data_dir, args.patients)
        return
    with tempfile.TemporaryDirectory(prefix="stowage-delete-bench-") as tmp:
        run(Path(tmp), args.patients)


if __name__ == "__main__":
    main()
