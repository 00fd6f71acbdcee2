"""A long-lived process's memory follows the live catalog, not its history (issue #20,
docs/fuzzing.md#memory): DuckDB keeps the Parquet metadata of every catalog file a view has
read until its memory_limit presses, and the catalog retires files all the time (each seal
and merge), so a worker's and an HTTP process's views held the metadata of every file the
archive ever had. catalog.reader.Catalog now starts a new connection once the files it may
hold that the manifest no longer names outnumber the live ones (and REOPEN_RETIRED)."""
from __future__ import annotations

import gc
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import psutil
from pydicom.data import get_testdata_file

from stowage.bench.harness import damage, fuzz
from stowage.catalog.reader import Catalog
from stowage.engine.lifecycle.delete import delete
from stowage.engine.runtime.config import Config
from stowage.engine.store.archive import Archive

_ROUNDS, _SEALS = 5, 10  # rounds of seals; each seal a catalog generation, and with merges some files retired
_READERS = 16  # a worker holds four views (store path, C-FIND, C-MOVE/C-GET, commitment), an HTTP process three: a long soak's worth of growth in 50 seals
_RETIRED = 16  # Catalog.REOPEN_RETIRED for the test (128 in production): reached within two rounds


def _rss() -> int:
    gc.collect()
    readings = []
    for _ in range(5):
        readings.append(psutil.Process().memory_info().rss)
        time.sleep(0.05)
    return statistics.median(readings)


def _object_cache(catalog: Catalog) -> int:
    """What DuckDB says the view's connection holds of Parquet metadata."""
    return catalog._con.execute("SELECT memory_usage_bytes FROM duckdb_memory() WHERE tag = 'OBJECT_CACHE'"
                                ).fetchall()[0][0]


def _rounds(tmp_path: Path) -> tuple[list[int], list[int]]:
    """The rounds; the resident size and the largest view's object cache after each."""
    Catalog.REOPEN_RETIRED = _RETIRED  # a process of its own: nothing to restore
    config = replace(Config(), data_dir=tmp_path, seal_interval=3600.0, compact_min_files=2)
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    dataset = ct[damage.meta_end(ct):]
    archive = Archive(config, 0)
    views = [Catalog(tmp_path / "catalog") for _ in range(_READERS)]
    rss, caches, stored = [], [], 0
    try:
        for rnd in range(_ROUNDS):
            for _ in range(_SEALS):
                uid = f"1.2.826.0.1.3680043.8.498.77.{stored + 1}"
                assert archive.store(fuzz.with_uid(dataset, uid), "1.2.840.10008.1.2.1", fuzz.CT_STORAGE,
                                     uid).status == 0
                stored += 1
                archive.sealer.seal()
                for view in views:  # every live file scanned: its metadata read
                    assert view.execute("SELECT count(*) FROM records")[1] == [(stored,)]
            if rnd == 0:  # a deletion made before the views start anew must stay seen after
                assert delete(config, "instance", ["1.2.826.0.1.3680043.8.498.77.1"]).instances == 1
            rss.append(_rss())
            caches.append(max(_object_cache(v) for v in views))
        for view in views:  # the views have started new connections since (their caches fell, below)
            assert view.execute("SELECT count(*) FROM instances")[1] == [(stored - 1,)]
            assert view.lookup("1.2.826.0.1.3680043.8.498.77.1") is None
    finally:
        for view in views:
            view.close()
        archive.close()
    return rss, caches


def test_catalog_views_hold_the_live_catalog_not_every_file_it_ever_had(tmp_path):
    """Rounds of: store an instance, seal (merging every two small files), and read the
    whole catalog from sixteen long-lived views, as C-FIND, retrieve and QIDO-RS do. Before
    the fix each view kept the metadata of every catalog file it had read, ever: measured on
    the shared 2-core machine, each view's DuckDB object cache grew by 0.77 MiB a round (0.78
    to 4.02 MiB over five rounds) and the resident size by 46.4 MiB from the second round to
    the last (292.8, 318.2, 333.9, 348.6, 364.6 MiB). Now no view's object cache may pass
    2 MiB (the 16 retired files that start a new connection, plus the live ones: 0.94 MiB
    at most, measured), the caches fall, and the resident size may grow by 20 MiB at most
    from the second round (caches and pools warm) to the last (measured +4.5 to +14.8 MiB
    with 8 views, +8.8 with 16: 292.9, 298.8, 293.7, 312.0, 307.6; the store path's and the
    allocator's ups and downs). A deletion made before the views started anew stays
    hidden after."""
    # in a fresh process: the test process's resident size carries every test it ran before
    # (under xdist, 500 MiB and its own ups and downs)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        rss, caches = pool.submit(_rounds, tmp_path).result(timeout=600)
    growth = rss[-1] - rss[1]
    print(f"resident MiB after each round: {[round(r / 2**20, 1) for r in rss]}; largest object cache of a view "
          f"(MiB): {[round(c / 2**20, 2) for c in caches]}")
    assert max(caches) < 2 << 20, caches
    assert any(b < a for a, b in zip(caches, caches[1:])), caches  # fell: the views started anew
    assert growth < 20 << 20, rss
