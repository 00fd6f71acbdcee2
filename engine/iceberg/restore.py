"""What a node whose data directory was lost finds again in the Iceberg tables
(docs/scale-out.md, "A lost disk"); engine/storage/restore.py finds its segments.

- **Its deletions.** The tombstone log lived on the lost disk; every deletion the node
  published is a row of the `deletions` table with its node name. Before the restored
  node serves, they are written back into a new tombstone log (with their original time,
  actor, reason and comment), and the publisher's ledger records the log as published,
  so instances deleted before the loss stay deleted and their rows are not published twice.
- **Its published rows.** Recovery indexes the adopted segments again into new catalog
  files, which the outbox queues; the rows of adopted segments that the `instances` table
  already holds for this node (by segment and offset) are left out of what is published
  (`unpublished`), so the table counts each record once. Rows the table holds at the
  places of segments a compaction replaced (left out by the restore) count as held too:
  the publisher's relocation points them at the compaction's output.

What was deleted or sealed in the last `iceberg_interval` before the loss, and not yet
published, is not in the tables: those deletions are lost with the disk.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stowage.catalog import manifest, tombstones
from stowage.engine.iceberg import ledger as ledgers
from stowage.engine.iceberg import relocations
from stowage.engine.iceberg.tables import DELETIONS, INSTANCES, open_catalog
from stowage.engine.runtime.config import Config

log = logging.getLogger("stowage.iceberg")


class DeletionsUnknown(RuntimeError):
    """A lost data directory whose deletions cannot be read from the catalog now."""


def lost(data_dir: Path) -> bool:
    """Whether this data directory holds neither a tombstone log nor a publisher's ledger
    (it is new, or it was lost)."""
    return not (tombstones.directory(data_dir) / tombstones.LOG).exists() and \
        not (Path(data_dir) / "iceberg" / ledgers.LEDGER).exists()


def restore_if_lost(config: Config) -> int:
    """At start-up (serve, rebuild-catalog), after engine/storage/restore.adopt: the
    deletions of a node whose data directory was lost (segments adopted from the bucket,
    no tombstone log, no ledger) written back; returns how many. Raises DeletionsUnknown."""
    if not (config.iceberg_catalog and config.storage) or not lost(config.data_dir):
        return 0
    if not any(e.get("adopted") for e in manifest.load(Path(config.data_dir) / "catalog").uploaded.values()):
        return 0
    rewritten = forget_lost_segments(config)[1]
    restored = restore_deletions(config)
    if rewritten:  # after the deletions: a ledger on disk says "not lost" at the next start
        home = Path(config.data_dir) / "iceberg"
        ledger = ledgers.load(home)
        ledger.rewritten = sorted(set(ledger.rewritten) | set(rewritten))
        ledgers.save(home, ledger)
    return restored


def forget_lost_segments(config: Config) -> tuple[list[str], list[str]]:
    """This node's segments that the instances table has rows of but that neither the
    bucket nor this data directory holds: sealed and published, then lost with the disk
    before their upload (the active segment, say). Their names are recorded as used (the
    segment writer numbers after them: a new segment of the same name would put other
    records where those rows point), and their rows are to be taken out of the table: a
    relocation of them (engine/iceberg/relocations.py) finds none of their records in the
    local catalog and drops every row, so no node lists instances no node holds.
    Returns (those, the segments the table has rows of that are on local disk but not in
    the bucket: written back from write-ahead objects, engine/storage/wal.py, whose rows
    the publisher must not add again). Raises DeletionsUnknown when the table cannot be read."""
    from pyiceberg.exceptions import NoSuchTableError
    catalog_dir, segments_dir = Path(config.data_dir) / "catalog", Path(config.data_dir) / "segments"
    try:
        table = open_catalog(config).load_table(f"{config.iceberg_namespace}.{INSTANCES}")
        named = _segments_named(table, config.node)
    except NoSuchTableError:
        return [], []
    except Exception as e:  # noqa: BLE001 - the catalog away: the caller decides
        raise DeletionsUnknown(f"cannot read {config.iceberg_namespace}.{INSTANCES} from {config.iceberg_catalog} "
                               f"({type(e).__name__}: {e})") from None
    try:
        local = set(os.listdir(segments_dir))
    except FileNotFoundError:
        local = set()
    m = manifest.load(catalog_dir)
    rewritten = sorted(n for n in named if n in local and n not in m.uploaded)
    lost = sorted(n for n in named if n not in local and n not in m.uploaded and n not in m.watermarks
                  and n not in m.retired_segments)
    if not lost:
        return [], rewritten
    with manifest.update(catalog_dir) as m:
        for name in lost:
            m.watermarks.setdefault(name, 0)      # its name stays used
            m.relocations.setdefault(name, 0.0)   # its rows leave the table at the publisher's next pass
    log.warning("%d segment(s) of node %s that %s.%s has rows of are neither in the bucket nor in this data "
                "directory (lost before their upload: %s); their instances are gone, and their rows are taken "
                "out of the table", len(lost), config.node, config.iceberg_namespace, INSTANCES, ", ".join(lost))
    return lost, rewritten


def _segments_named(table, node: str) -> set[str]:
    """Every `segment` value of `node`'s rows in the instances table (its files under
    `data/<node>/`; only that column is read)."""
    if table.current_snapshot() is None:
        return set()
    mine = f"/data/{node}/"
    out: set[str] = set()
    for task in table.scan(selected_fields=("segment",)).plan_files():
        if mine not in task.file.file_path:
            continue
        with table.io.new_input(task.file.file_path).open() as f:
            data = pq.read_table(pa.BufferReader(f.read()), columns=["segment"])
        out.update(v for v in pc.unique(data["segment"]).to_pylist() if v)
    return out


def restore_deletions(config: Config) -> int:
    """Write this node's published deletions back into its (missing) tombstone log and
    record them as published; returns how many. Call before the node serves, only for a
    data directory `lost` says is empty of both."""
    from pyiceberg.exceptions import NoSuchTableError
    from pyiceberg.expressions import EqualTo
    try:
        table = open_catalog(config).load_table(f"{config.iceberg_namespace}.{DELETIONS}")
        rows = table.scan(row_filter=EqualTo("node", config.node)).to_arrow() \
            if table.current_snapshot() is not None else None
    except NoSuchTableError:
        return 0
    except Exception as e:  # noqa: BLE001 - the catalog away: the caller decides
        raise DeletionsUnknown(f"cannot read {config.iceberg_namespace}.{DELETIONS} from {config.iceberg_catalog} "
                               f"({type(e).__name__}: {e})") from None
    if rows is None or rows.num_rows == 0:
        return 0
    rows = rows.sort_by("at")
    us = {c: pc.cast(rows[c], pa.int64()).to_pylist() for c in ("received_at", "at")}
    entries = [tombstones.Tombstone(uid, received, reason or "deleted", study or "", at or 0, actor or "",
                                    comment or "")
               for uid, received, reason, study, at, actor, comment in zip(
                   rows["sop_instance_uid"].to_pylist(), us["received_at"], rows["reason"].to_pylist(),
                   rows["study_instance_uid"].to_pylist(), us["at"], rows["actor"].to_pylist(),
                   rows["comment"].to_pylist())]
    tombstones.append(config.data_dir, entries)
    st = os.stat(tombstones.directory(config.data_dir) / tombstones.LOG)
    home = Path(config.data_dir) / "iceberg"
    ledger = ledgers.load(home)
    ledger.log_ino, ledger.log_offset, ledger.deletion_rows = st.st_ino, st.st_size, len(entries)
    ledgers.save(home, ledger)
    log.warning("found %d deletion(s) of node %s in %s.%s that this data directory did not hold; they hide "
                "their instances again", len(entries), config.node, config.iceberg_namespace, DELETIONS)
    return len(entries)


def published(table, node: str, segments: set[str]) -> set[tuple[str, int]]:
    """(segment, offset) of every row of `segments` that `table` holds for `node`."""
    out: set[tuple[str, int]] = set()
    for path in relocations.affected(table, node, sorted(segments)):
        with table.io.new_input(path).open() as f:
            data = pq.read_table(pa.BufferReader(f.read()), columns=["segment", "offset"])
        data = data.filter(relocations.rows_in(data, sorted(segments)))
        out.update(zip(data["segment"].to_pylist(), data["offset"].to_pylist()))
    return out


def relocating(table, node: str, segments: set[str]) -> set[tuple[str, int]]:
    """(SOP Instance UID, received_at in µs) of every row of `segments` that `table` holds
    for `node`: rows the publisher's relocation will point at their records' places now."""
    out: set[tuple[str, int]] = set()
    for path in relocations.affected(table, node, sorted(segments)):
        with table.io.new_input(path).open() as f:
            data = pq.read_table(pa.BufferReader(f.read()), columns=["segment", "sop_instance_uid", "received_at"])
        data = data.filter(relocations.rows_in(data, sorted(segments)))
        out.update(zip(data["sop_instance_uid"].to_pylist(), pc.cast(data["received_at"], pa.int64()).to_pylist()))
    return out


def unpublished(data: pa.Table, adopted: set[str], table, node: str, replaced: set[str] = frozenset()) -> pa.Table:
    """`data` (a sealed file's rows) without the rows of `adopted` segments that `table`
    already holds for `node`: at the same place, or (a compaction's output adopted with the
    segments it `replaced` left out, engine/storage/compactions.py) at a replaced segment's
    place, which the relocation of `replaced` rewrites."""
    segs = set(pc.unique(data["segment"]).to_pylist()) & adopted
    if not segs:
        return data
    held = published(table, node, segs)
    moved = relocating(table, node, set(replaced)) if replaced else set()
    keep = [(s, o) not in held and (u, r) not in moved for s, o, u, r in zip(
        data["segment"].to_pylist(), data["offset"].to_pylist(), data["sop_instance_uid"].to_pylist(),
        pc.cast(data["received_at"], pa.int64()).to_pylist())]
    return data.filter(pa.array(keep, pa.bool_()))
