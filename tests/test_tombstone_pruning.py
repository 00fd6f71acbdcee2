"""Tombstones are pruned once compaction has removed every record they hide, and kept while
one may still be read (catalog/tombstones.py `prune`, engine/lifecycle/tombstone_pruning.py):
what a long-lived process holds of them follows the live archive, not every instance ever
deleted; a deleted instance never comes back (rebuild-catalog included); a rejected UID
stays rejected."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom

from conftest import MR, copies
from stowage.catalog import tombstones
from stowage.catalog.reader import Catalog


def test_prune_keeps_rejections_and_what_is_not_gone(tmp_path):
    tombstones.append(tmp_path, [tombstones.Tombstone("1.1", 10), tombstones.Tombstone("1.2", 20),
                                 tombstones.Tombstone("1.3", 30, reason="rejected:113001"),
                                 tombstones.Tombstone("1.4", None, reason="rejected:113001")])
    reader = tombstones.TombstoneReader(tombstones.directory(tmp_path))
    assert reader.read().num_rows == 4
    assert tombstones.prune(tmp_path, {("1.1", 10), ("1.3", 30), ("9.9", 1)}) == 2
    table = reader.read()
    assert reader.generation == 2  # the log was replaced: read afresh
    assert sorted(zip(table["sop_instance_uid"].to_pylist(), [t and t.value for t in table["received_at"]])) == \
        [("1.2", 20), ("1.3", None), ("1.4", None)]
    assert tombstones.rejected_uids(table) == {"1.3", "1.4"}  # still rejected, hiding nothing
    assert tombstones.prune(tmp_path, {("1.1", 10)}) == 0
    tombstones.append(tmp_path, [tombstones.Tombstone("1.5", 50)])  # appends go on after a prune
    assert tombstones.load(tmp_path)["sop_instance_uid"].to_pylist() == ["1.2", "1.5"]


def _cli(data_dir: Path, *args: str) -> str:
    env = dict(os.environ, STOWAGE_SEGMENT_SIZE="50000", STOWAGE_COMPACT_GRACE="0")
    r = subprocess.run([sys.executable, "-m", "stowage.cli", *args, "--data-dir", str(data_dir)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_delete_and_compact_in_a_loop_holds_tombstones_of_the_live_archive_only(tmp_path):
    data = tmp_path / "data"
    catalog = None
    held, logged = [], []
    try:
        for rnd in range(3):
            files = copies(MR, tmp_path / f"r{rnd}", 24, f"r{rnd}")
            _cli(data, "import", "-q", "--processes", "1", str(files[0].parent))
            uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
            _cli(data, "delete", "--yes", "--instance", ",".join(uids))
            _cli(data, "compact")
            if catalog is None:  # a long-lived reader, as every serving process holds one
                catalog = Catalog(data / "catalog")
            held.append(catalog.execute("SELECT count(*) FROM tombstones")[1][0][0])
            logged.append(tombstones.load(data).num_rows)
            assert catalog.execute("SELECT count(*) FROM instances")[1][0][0] == 0
        # 72 instances deleted; only those still in the active segment (50 kB: a few MR)
        # keep a tombstone, round after round
        assert all(n <= 8 for n in held) and held == logged, (held, logged)
        print("tombstones held after each round:", held)
        assert _cli(data, "verify").count("all intact") == 1
        _cli(data, "rebuild-catalog")
        assert _cli(data, "query", "--format", "csv", "SELECT count(*) AS n FROM instances").split()[1:] == ["0"]
    finally:
        if catalog is not None:
            catalog.close()
