"""Where an instance's record is now.

A send, a C-MOVE, a C-GET or an export looks its records up once, when it starts, and
may then run for hours. A compaction meanwhile copies live records into a new segment
and unlinks the old one `compact_grace` seconds later (engine/lifecycle/compaction.py): a record
looked up before that is then in a file that no longer exists. The reader asks here
again, once, and reads the record where the catalog has it now.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from stowage.catalog.reader import Catalog


@dataclass(frozen=True)
class Location:
    segment: str
    offset: int
    dataset_length: int | None
    dataset_crc32: int | None


GONE = ("no longer in the archive: deleted, rejected or replaced by a newer copy "
        "after this transfer looked it up")


class RecordGone(Exception):
    """The record cannot be read anywhere; the message says why, for the transfer's report."""


class Locator:
    """Looks records up in a catalog of its own, opened at the first question (a
    compaction under a transfer is rare); thread-safe."""

    def __init__(self, data_dir: Path, duplicates: str = "keep-newest", cluster: bool = False) -> None:
        self.catalog_dir = data_dir / "catalog"
        self.duplicates = duplicates
        self.cluster = cluster  # the other nodes' records too (catalog/cluster_view.py)
        self._catalog: Catalog | None = None
        self._lock = threading.Lock()

    def now(self, sop_instance_uid: str) -> Location | None:
        """Where the record the archive serves for this instance is now; None if it
        serves none (deleted, rejected)."""
        with self._lock:
            if self._catalog is None:
                self._catalog = Catalog(self.catalog_dir, self.duplicates, cluster=self.cluster)
            _cols, rows = self._catalog.execute(
                'SELECT segment, "offset", dataset_length, dataset_crc32 FROM instances '
                "WHERE sop_instance_uid = ?", [sop_instance_uid])
        return Location(*rows[0]) if rows else None

    def elsewhere(self, sop_instance_uid: str, segment: str, offset: int, error: Exception) -> Location:
        """Where the instance's record is now, reading it at (segment, offset) having
        failed with `error` (no such segment); raises RecordGone if the archive no longer
        serves the instance, or still names that very place."""
        where = self.now(sop_instance_uid)
        if where is None:
            raise RecordGone(GONE)
        if (where.segment, where.offset) == (segment, offset):
            raise RecordGone(f"its segment is missing: {error}")
        return where

    def close(self) -> None:
        with self._lock:
            if self._catalog is not None:
                self._catalog.close()
                self._catalog = None
