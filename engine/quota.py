"""The storage quota (`max_storage_bytes`, Orthanc's MaximumStorageSize): what the archive
does once its segment files hold that many bytes.

Usage is the bytes of the segment files the archive still needs (segments a compaction
replaced and keeps only for readers' grace are not counted): what the archive takes on
disk, dead records included until compaction reclaims them. The store path asks the file
system at most every 0.25 s and adds what it stored since, as engine.freespace does;
within 256 MB of the quota, before every store.

- `refuse`: a store that would take usage past the quota gets 0xA700 (Out of Resources)
  with an Error Comment that says so. Stores resume once space comes back (delete, then
  compaction).
- `delete-oldest`: `stowage serve` (engine.compaction.Background) deletes the studies
  received first (by the received_at of their first instance: StudyDate is often empty
  or wrong, and a migration brings old studies last) with reason "quota", until the live
  bytes are at most QUOTA_LOW of the quota, then compacts to reclaim their space. Studies
  of `protected_patients` are never deleted; when only they would be left over the
  quota, it writes `quota.exhausted` in the data directory and stores are refused as in
  `refuse` until usage is under the quota again.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from stowage.catalog import manifest

log = logging.getLogger("stowage.quota")
QUOTA_LOW = 0.9          # delete-oldest deletes down to this fraction of the quota
EXHAUSTED = "quota.exhausted"
# Within this many bytes of the quota the store path asks the file system before each
# store: the figure may be 0.25 s old, and other workers store meanwhile.
_NEAR = 256 << 20
REFUSAL = "storage quota (max_storage_bytes) reached; not stored"


_retired_cache: dict[Path, tuple[tuple, frozenset[str]]] = {}


def _retired(catalog_dir: Path) -> frozenset[str]:
    """The manifest's retired segments, read again only when the manifest changes."""
    try:
        st = os.stat(catalog_dir / manifest.MANIFEST)
    except FileNotFoundError:
        return frozenset()
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _retired_cache.get(catalog_dir)
    if hit is None or hit[0] != stamp:
        hit = _retired_cache[catalog_dir] = (stamp, frozenset(manifest.load(catalog_dir).retired_segments))
    return hit[1]


def segment_bytes(data_dir: Path) -> int:
    """Bytes of the segment files the archive needs (not the retired ones)."""
    retired = _retired(data_dir / "catalog")
    total = 0
    try:
        with os.scandir(data_dir / "segments") as it:
            for e in it:
                if e.name.endswith(".seg") and e.name not in retired:
                    total += e.stat().st_size
    except FileNotFoundError:
        pass
    return total


class Usage:
    """The archive's usage against its quota, for the store path: cheap to ask often."""

    def __init__(self, data_dir: Path, limit: int, policy: str, interval: float = 0.25) -> None:
        self.data_dir = data_dir
        self.limit = limit
        self.policy = policy
        self.interval = interval
        self._bytes = 0
        self._exhausted = False
        self._at = float("-inf")

    def _refresh(self, now: float) -> None:
        self._bytes = segment_bytes(self.data_dir)
        self._exhausted = self.policy == "refuse" or (self.data_dir / EXHAUSTED).exists()
        self._at = now

    def refusal(self, incoming: int) -> str:
        """The Error Comment refusing a store of `incoming` bytes, or "" to store it."""
        if not self.limit:
            return ""
        now = time.monotonic()
        near = self._exhausted and self._bytes + incoming > self.limit - _NEAR
        if near or now - self._at > self.interval:  # near the quota: a fresh figure for every store
            self._refresh(now)
        return REFUSAL if self._bytes + incoming > self.limit and self._exhausted else ""

    def used(self, nbytes: int) -> None:
        self._bytes += nbytes


def _oldest_studies(catalog, protected: list[str]) -> list[tuple[str, int]]:
    """(study, live bytes) of every study without a protected patient, first received first."""
    _cols, rows = catalog.execute(
        "SELECT study_instance_uid, sum(record_length) FROM instances GROUP BY study_instance_uid "
        "HAVING NOT bool_or(coalesce(patient_id, '') IN (SELECT unnest(?))) "
        "ORDER BY min(received_at), study_instance_uid", [protected or [""]])
    return [(s, int(b)) for s, b in rows]


def enforce(config, stop=None) -> bool:
    """delete-oldest: if usage is over the quota, delete the oldest unprotected studies
    until live bytes are at most QUOTA_LOW of it, and reclaim space; returns whether it
    deleted anything. Runs in one process (the compactor's)."""
    from stowage.catalog.reader import Catalog
    from stowage.engine.compaction import CompactionBusy, compact
    from stowage.engine.delete import delete
    limit, data_dir = config.max_storage_bytes, config.data_dir
    flag = data_dir / EXHAUSTED
    if segment_bytes(data_dir) <= limit:
        flag.unlink(missing_ok=True)
        return False
    catalog = Catalog(data_dir / "catalog", config.duplicates)
    try:
        _cols, rows = catalog.execute("SELECT coalesce(sum(record_length), 0) FROM instances")
        live = int(rows[0][0])
        chosen: list[str] = []
        target = int(limit * QUOTA_LOW)
        for study, nbytes in _oldest_studies(catalog, list(config.protected_patients)):
            if live <= target:
                break
            chosen.append(study)
            live -= nbytes
    finally:
        catalog.close()
    if chosen:
        result = delete(config, "study", chosen, reason="quota", actor="quota")
        log.warning("quota: %d byte(s) over max_storage_bytes; deleted the %d oldest study(ies) (%s)",
                    segment_bytes(data_dir) - limit, len(chosen), result.summary())
    if live > limit:  # what is left is protected: nothing more may go
        if not flag.exists():
            flag.write_text("only protected patients' studies are left over the quota\n")
            log.error("quota: only protected patients' studies are left and they exceed max_storage_bytes; "
                      "stores are refused until space is freed")
    else:
        flag.unlink(missing_ok=True)
    try:  # reclaim now, not at the next compaction check: any segment with dead bytes
        compact(config, ratio=1.0, stop=stop)
    except CompactionBusy:
        pass
    return bool(chosen)
