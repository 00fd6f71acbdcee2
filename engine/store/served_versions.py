"""What the catalog serves for each SOP Instance UID of a study (CRC-32 and length of
the version the duplicates policy keeps), fetched a study at a time and kept briefly:
the store path's duplicate check.

Checking one UID is a DuckDB query (its cost: docs/benchmarks.md). A resumed
migration re-sends whole studies it already sent; with this, the first instance of each
study pays one query for the study and the others a dictionary lookup. Entries expire
after `ttl` seconds, so what another worker stored meanwhile is seen within that time
(until then a copy it holds may be stored again: the catalog still serves one).
A deletion (a tombstone added, catalog.tombstones, or another node's deletions folded into
this node's view, catalog.cluster_view) empties the cache at once: a copy of a deleted
instance sent again must be stored again, not answered "already held".
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from stowage.catalog import cluster_view, tombstones
from stowage.catalog.reader import Catalog

_SQL = ("SELECT sop_instance_uid, dataset_crc32, dataset_length FROM instances "
        "WHERE study_instance_uid = ? LIMIT ?")


class ServedVersions:
    def __init__(self, catalog: Catalog, ttl: float = 30.0, max_studies: int = 64,
                 max_rows: int = 50_000) -> None:
        self.catalog = catalog
        self.ttl, self.max_studies, self.max_rows = ttl, max_studies, max_rows
        self._studies: OrderedDict[str, tuple[float, dict[str, tuple[int, int]]]] = OrderedDict()
        self._lock = threading.Lock()
        self._tomb_stamp = self._deletions_stamp()

    def get(self, study: str, uid: str) -> tuple[int, int] | None:
        """(CRC-32, length) of the version served for `uid`, or None if none is."""
        if not study:
            return self._one(uid)
        now = time.monotonic()
        tomb_stamp = self._deletions_stamp()  # one or two stat()s: deleted since, here or on another node?
        with self._lock:
            if tomb_stamp != self._tomb_stamp:
                self._studies.clear()
                self._tomb_stamp = tomb_stamp
            hit = self._studies.get(study)
            if hit is not None and now - hit[0] < self.ttl:
                self._studies.move_to_end(study)
                return hit[1].get(uid)
        _cols, rows = self.catalog.execute(_SQL, [study, self.max_rows + 1])
        if len(rows) > self.max_rows:  # too big to keep: ask for this one only
            return self._one(uid)
        served = {u: (crc, length) for u, crc, length in rows}
        with self._lock:
            if tomb_stamp != self._tomb_stamp:  # a deletion came meanwhile: this answer may be stale
                return served.get(uid)
            self._studies[study] = (now, served)
            self._studies.move_to_end(study)
            while len(self._studies) > self.max_studies:
                self._studies.popitem(last=False)
        return served.get(uid)

    def _deletions_stamp(self) -> tuple:
        return (tombstones.stamp_of(self.catalog.tombstones_dir), cluster_view.deletions_stamp(self.catalog.view_dir))

    def _one(self, uid: str) -> tuple[int, int] | None:
        _cols, rows = self.catalog.execute(
            "SELECT dataset_crc32, dataset_length FROM instances WHERE sop_instance_uid = ?", [uid])
        return (rows[0][0], rows[0][1]) if rows else None

    def stored(self, study: str, uid: str, crc: int, length: int) -> None:
        """This worker stored a version of `uid` that the catalog now serves."""
        with self._lock:
            hit = self._studies.get(study)
            if hit is not None:
                hit[1][uid] = (crc, length)
