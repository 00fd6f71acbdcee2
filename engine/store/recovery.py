"""Recovery: index every segment record the catalog lacks, cut off torn tails.

The same path serves a restart after a crash (records past each segment's sealed
watermark) and `rebuild-catalog` (every record, into an empty catalog).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from stowage.catalog import manifest
from stowage.catalog.sealer import advance_watermark, seal_rows
from stowage.catalog.tail import SUFFIX
from stowage.engine.store.segment import MAGIC, Record, iter_records, open_segment, valid_end
from stowage.engine.store.slots import slots_present, try_claim

log = logging.getLogger("stowage.recovery")
_ROW_BATCH = 100_000


def row_of(segment: str, rec: Record) -> dict[str, Any]:
    row = {k: v for k, v in rec.header.items() if k != "meta_length"}
    row.update(segment=segment, offset=rec.offset, record_length=rec.length)
    return row


def _magic_offsets(path: Path, start: int, window: int = 8 << 20):
    """Offsets of the record magic at or after `start`, scanning in bounded windows."""
    with open_segment(path) as f:
        base = start
        while True:
            f.seek(base)
            data = f.read(window + len(MAGIC) - 1)
            if len(data) < len(MAGIC):
                return
            pos = data.find(MAGIC)
            while pos != -1 and pos < window:
                yield base + pos
                pos = data.find(MAGIC, pos + 1)
            base += window


def _next_good(path: Path, after: int) -> int | None:
    """Offset of the next verifiable record after a bad one, if any."""
    for pos in _magic_offsets(path, after + 1):
        if valid_end(path, pos) > pos:
            return pos
    return None


def _cut_torn_tail(path: Path, end: int, size: int) -> None:
    """Keep the unverifiable bytes aside in lost+found, then truncate the segment."""
    lost = path.parent / "lost+found"
    lost.mkdir(exist_ok=True)
    with open(path, "rb") as src, open(lost / f"{path.name}.{end}.torn", "wb") as dst:
        src.seek(end)
        shutil.copyfileobj(src, dst)
    with open(path, "rb+") as f:
        f.truncate(end)
        os.fsync(f.fileno())
    log.warning("segment %s: cut a torn record at byte %d (%d bytes kept in lost+found)", path.name, end, size - end)


def recover_segment(catalog_dir: Path, path: Path, start: int, size: int | None = None) -> int:
    """Seal the rows of every record of `path` from `start`; returns how many. `size`: of a
    segment read from the bucket (engine/storage), whose local copy is not there."""
    rows: list[dict[str, Any]] = []
    count, offset, size = 0, start, path.stat().st_size if size is None else size
    while offset < size:
        for rec in iter_records(path, offset):
            rows.append(row_of(path.name, rec))
            offset = rec.offset + rec.length
            if len(rows) >= _ROW_BATCH:
                count += len(rows)
                seal_rows(catalog_dir, rows)
                rows = []
        if offset >= size:
            break
        good = _next_good(path, offset)
        if good is None and not path.exists():  # an uploaded copy was verified: never cut, only said
            log.error("segment %s in the bucket: bytes %d-%d do not verify; not indexed", path.name, offset, size)
            break
        if good is None:
            _cut_torn_tail(path, offset, size)
            break
        log.error("segment %s: corrupt bytes %d-%d skipped; the records after them are kept",
                  path.name, offset, good)
        offset = good
    count += len(rows)
    if rows:
        seal_rows(catalog_dir, rows)
    else:
        advance_watermark(catalog_dir, path.name, offset)
    return count


def recover(data_dir: Path, slot: int | None = None) -> int:
    """Index what the catalog lacks from the segments of `slot`, and drop its stale tails.

    With a slot number, the caller holds that slot's claim (engine/store/slots.py). With None,
    every slot present is recovered under a claim taken here, except the slots another
    live process holds (a running `stowage import`, say): those are left alone.
    """
    (data_dir / "catalog").mkdir(parents=True, exist_ok=True)
    if slot is not None:
        return _recover_slot(data_dir, f"{slot:03d}-")
    total = 0
    uploaded = {int(n[:3]) for n, e in manifest.load(data_dir / "catalog").uploaded.items() if not e.get("gone")}
    for number in sorted(slots_present(data_dir) | uploaded):
        claim = try_claim(data_dir, number)
        if claim is None:
            log.info("slot %03d is being written by another live process; left to it", number)
            continue
        try:
            total += _recover_slot(data_dir, claim.prefix)
        finally:
            claim.release()
    return total


def _recover_slot(data_dir: Path, prefix: str) -> int:
    segments, catalog_dir = data_dir / "segments", data_dir / "catalog"
    m = manifest.load(catalog_dir)
    total = 0
    # Segments uploaded whose local copy is gone (evicted, or a data directory lost and
    # found again in the bucket: engine/storage/restore.py) are read from the bucket.
    remote = {n: int(e["size"]) for n, e in m.uploaded.items() if n.startswith(prefix) and not e.get("gone")
              and n not in m.retired_segments}
    for path in sorted({*segments.glob(f"{prefix}*.seg"), *(segments / n for n in remote)}):
        start = m.sealed_upto(path.name)
        try:
            size, known = path.stat().st_size, None
        except FileNotFoundError:  # a compaction's grace ended meanwhile (engine.lifecycle.compaction.purge)
            if path.name not in remote:
                continue
            size = known = remote[path.name]
        if start < size:
            total += recover_segment(catalog_dir, path, start, known)
    for tail in (catalog_dir / "tails").glob(f"{prefix}*{SUFFIX}"):
        tail.unlink(missing_ok=True)
    if total:
        log.info("recovered %d record(s) of slot %s into the catalog", total, prefix[:3])
    return total
