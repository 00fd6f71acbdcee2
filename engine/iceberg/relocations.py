"""Relocations: the instances table follows a compaction of this node's segments.

`stowage compact` moves a segment's live records to a new segment and rewrites this
node's sealed files (catalog/relocate.py); the rows it published to the `instances`
table still name the old segment and offset. The compaction's manifest swap records each
replaced segment in `Manifest.relocations`; the publisher then rewrites every data file
of this node in the table that holds rows of those segments (each row pointed at its
record's place now, found in the local catalog by (SOP Instance UID, received_at); the
rows of records the compaction dropped, deleted or superseded, left out) and commits the
rewritten files in place of the old ones as one Iceberg overwrite snapshot. Any reader of
the table (pyiceberg, Spark, another node's view) sees each record where it is now, with
no relocation table of stowage's own to fold in.

Order, so that no reader is ever pointed at bytes that are not in the bucket:
- the overwrite waits until no queued (unpublished) file holds rows of the segments, and
  until the new segments are uploaded (`waiting`);
- the old segments' objects are deleted `compact_grace` after the overwrite landed
  (engine/storage/uploader.delete_gone), time for every node's view to follow it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from stowage.catalog import manifest, relocate

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

Places = dict[tuple[str, int], tuple[str, int]]  # (uid, received_at µs) -> (segment, offset) now


def pending(m: manifest.Manifest) -> list[str]:
    """Replaced segments whose relocation is not committed to the table yet."""
    return sorted(s for s, at in m.relocations.items() if not at)


def waiting(catalog_dir: Path, m: manifest.Manifest, segments: list[str]) -> str:
    """Why the relocation of `segments` must wait ("" if it need not): a queued file
    still holds rows of them (it would be published after the overwrite, with the old
    places)."""
    queued = [n for n in (m.outbox or ()) if (catalog_dir / n).exists()]
    if relocate.holding(catalog_dir, queued, segments):
        return "sealed files holding their rows are not published yet"
    return ""


def affected(table: "Table", node: str, segments: list[str]) -> dict[str, "DataFile"]:
    """This node's data files in `table` that may hold rows of `segments` (the files'
    column bounds prune the others), by path."""
    from pyiceberg.expressions import In
    if table.current_snapshot() is None:
        return {}
    mine = f"/data/{node}/"
    return {t.file.file_path: t.file for t in table.scan(row_filter=In("segment", segments)).plan_files()
            if mine in t.file.file_path}


def places(catalog_dir: Path, uids: list[str]) -> Places:
    """Where the local catalog has each record of `uids` now."""
    m = manifest.load(catalog_dir)
    files = [str(catalog_dir / n) for n in sorted(m.files)]
    if not files or not uids:
        return {}
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        rows = con.execute(
            "SELECT sop_instance_uid, epoch_us(received_at), segment, \"offset\" "
            "FROM read_parquet(?, union_by_name=true) WHERE sop_instance_uid IN (SELECT unnest(?))",
            [files, sorted(set(uids))]).fetchall()
    finally:
        con.close()
    return {(u, int(r)): (s, int(o)) for u, r, s, o in rows if r is not None}


def rows_in(data: pa.Table, segments: list[str]) -> pa.Array:
    """The mask of `data`'s rows that name one of `segments`."""
    return pc.fill_null(pc.is_in(data["segment"], value_set=pa.array(segments, pa.string())), False)


def relocated(data: pa.Table, segments: list[str], now: Places) -> tuple[pa.Table, set[str]]:
    """`data` with its rows of `segments` at their places `now` (rows of records the local
    catalog no longer holds, dropped by the compaction, left out), and the segments the
    moved rows name now."""
    mask = rows_in(data, segments)
    kept, old = data.filter(pc.invert(mask)), data.filter(mask)
    take, segs, offsets = [], [], []
    received = pc.cast(old["received_at"], pa.int64()).to_pylist()
    for i, (uid, at) in enumerate(zip(old["sop_instance_uid"].to_pylist(), received)):
        place = now.get((uid, at)) if at is not None else None
        if place is not None:
            take.append(i)
            segs.append(place[0])
            offsets.append(place[1])
    if not take:
        return kept, set()
    moved = old.take(pa.array(take, pa.int64()))
    s, o = moved.schema.get_field_index("segment"), moved.schema.get_field_index("offset")
    moved = moved.set_column(s, moved.schema.field(s), pa.array(segs, moved.schema.field(s).type))
    moved = moved.set_column(o, moved.schema.field(o), pa.array(offsets, moved.schema.field(o).type))
    return pa.concat_tables([kept, moved]), set(segs)
