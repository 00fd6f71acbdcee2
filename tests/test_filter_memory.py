"""A process maps the sealed-UID filter once, whatever the number of catalog views that
read it (issue #20, docs/fuzzing.md#memory): rss counts a shared file's page once per
mapping that touched it, so with a map per view an HTTP process (five views) or a worker
(four, and the seal's) grew towards 32 MiB per view as the archive's UIDs reached the
filter's pages: 115 MiB of an HTTP process's rss at the end of the 100,000-case soak."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from pydicom.data import get_testdata_file

from stowage.bench.harness import damage, fuzz
from stowage.catalog import sealed_uids
from stowage.catalog.reader import Catalog
from stowage.engine.runtime.config import Config
from stowage.engine.store.archive import Archive

from conftest import wait_for

_VIEWS = 8
_PROBES = 40_000  # four bits each: nearly every page of the 32 MiB filter touched


def _filter_mappings(directory: Path) -> dict[str, int]:
    """Resident KiB of each mapping of a filter file under `directory` in this process
    (smaps), by its line."""
    out: dict[str, int] = {}
    name = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            name = line if f"{directory}/" in line and sealed_uids.FILTER in line else None
        elif name and head[0] == "Rss:":
            out[name] = int(head[1])
    return out


def _store_and_seal(archive: Archive, dataset: bytes, uid: str) -> None:
    assert archive.store(fuzz.with_uid(dataset, uid), "1.2.840.10008.1.2.1", fuzz.CT_STORAGE, uid).status == 0
    archive.sealer.seal()


def test_catalog_views_share_one_map_of_the_filter_and_let_a_replaced_one_go(tmp_path):
    """Eight views, each asked about 40,000 UIDs that the archive does not hold: the
    filter's pages are mapped once (at most 32 MiB of rss, one mapping), where before each
    view mapped the file itself (eight mappings, about 256 MiB of rss). A filter rebuilt
    (a new file) is mapped by the views that read it after, and the replaced file's map
    is gone once no view reads it: no deleted filter stays in the process (the store
    path's 0.2 s later at most)."""
    config = replace(Config(), data_dir=tmp_path, seal_interval=3600.0)
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    dataset = ct[damage.meta_end(ct):]
    archive = Archive(config, 0)
    views = [Catalog(tmp_path / "catalog") for _ in range(_VIEWS)]
    try:
        _store_and_seal(archive, dataset, "1.2.826.0.1.3680043.8.498.78.1")
        for view in views:
            assert view.execute("SELECT count(*) FROM instances")[1] == [(1,)]
        rng = random.Random(20)
        probes = [f"2.25.{rng.getrandbits(100)}" for _ in range(_PROBES)]
        for view in views:  # what a view asks of its filter for each tail UID (reader._versions)
            f = view._filter
            assert f is not None
            assert sum(uid in f for uid in probes) < _PROBES // 100  # false positives only: ~0
        maps = _filter_mappings(tmp_path)
        assert len(maps) == 1, maps
        assert sum(maps.values()) <= (32 << 10) + 4, maps  # the file's bit array, once

        (tmp_path / "catalog" / sealed_uids.FILTER).unlink()  # the next seal rebuilds it: a new file
        _store_and_seal(archive, dataset, "1.2.826.0.1.3680043.8.498.78.2")
        for view in views:
            assert view.execute("SELECT count(*) FROM instances")[1] == [(2,)]
            assert "1.2.826.0.1.3680043.8.498.78.1" in view._filter  # the rebuilt filter holds the sealed UIDs
        # the store path follows the filter every 0.1 s, and closes the one it replaced
        # a refresh later (a store may still be reading it)
        wait_for(lambda: len(_filter_mappings(tmp_path)) == 1, timeout=10, what="the replaced filter's map let go")
        maps = _filter_mappings(tmp_path)
        assert not any("(deleted)" in m for m in maps), maps
    finally:
        for view in views:
            view.close()
        archive.close()
    assert not _filter_mappings(tmp_path)
