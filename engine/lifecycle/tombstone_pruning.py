"""Pruning tombstones (catalog/tombstones.py) that hide nothing any more, so that what every
process holds of them follows the live archive, not every instance ever deleted.

A tombstone must stay while the record it hides may still be read: while a catalog row
(sealed or in a tail) names it, and while a segment file that may hold it is on disk, where
`rebuild-catalog` or recovery would find the record again. Compaction removes a deleted
record from the catalog when it rewrites the record's segment, and retires the old segment;
`purge` unlinks retired segments after `compact_grace`. So a tombstone is pruned when no
catalog row holds its (SOP Instance UID, received_at) and no retired segment is left on disk
(we do not know which retired segment held it; with none left, none does).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from stowage.catalog import manifest, tombstones
from stowage.catalog.reader import Catalog

log = logging.getLogger("stowage.compaction")

_GONE_SQL = ("SELECT sop_instance_uid, epoch_us(received_at) FROM tombstones "
             "EXCEPT SELECT sop_instance_uid, epoch_us(received_at) FROM deleted")


def prune(data_dir: Path, catalog: Catalog, uncatalogued: Callable[[], list[str]] = lambda: []) -> int:
    """Prune the tombstones no record needs; returns how many went (0 while a retired
    segment is still on disk, or while `uncatalogued` names a segment holding records the
    catalog lacks: a deleted record whose row was lost would look gone, and come back with
    the next `rebuild-catalog` once its tombstone went)."""
    if tombstones.stamp(data_dir) is None or manifest.load(data_dir / "catalog").retired_segments:
        return 0
    _cols, rows = catalog.execute(_GONE_SQL)
    gone = {(str(uid), int(at)) for uid, at in rows}
    if manifest.load(data_dir / "catalog").retired_segments:  # a compaction retired one meanwhile
        return 0
    if gone and (lacking := uncatalogued()):
        log.error("tombstones not pruned: %s hold(s) records the catalog lacks (stowage verify, then "
                  "stowage rebuild-catalog)", ", ".join(lacking[:5]))
        return 0
    removed = tombstones.prune(data_dir, gone)
    if removed:
        log.info("pruned %d tombstone(s) whose records compaction has removed", removed)
    return removed
