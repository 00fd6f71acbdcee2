"""The storage quota (`max_storage_bytes`, Orthanc's MaximumStorageSize): what the archive
does once its segment files hold that many bytes.

The store reports usage and refuses stores over the quota when told to
(engine/store/usage.py); this module is the policy above it.

- `refuse`: a store that would take usage past the quota gets 0xA700 (Out of Resources)
  with an Error Comment that says so. Stores resume once space comes back (delete, then
  compaction).
- `delete-oldest`: `stowage serve` (engine.lifecycle.background) deletes the studies
  received first (by the received_at of their first instance: StudyDate is often empty
  or wrong, and a migration brings old studies last) with reason "quota", until the live
  bytes are at most QUOTA_LOW of the quota, then compacts to reclaim their space. Studies
  of `protected_patients` are never deleted; when only they would be left over the
  quota, it writes `quota.exhausted` in the data directory and stores are refused as in
  `refuse` until usage is under the quota again.
"""
from __future__ import annotations

import logging

from stowage.engine.store.usage import EXHAUSTED, segment_bytes

log = logging.getLogger("stowage.quota")
QUOTA_LOW = 0.9          # delete-oldest deletes down to this fraction of the quota


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
    from stowage.engine.lifecycle.compaction import CompactionBusy, compact
    from stowage.engine.lifecycle.delete import delete
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
