"""Relocation: the catalog side of a segment compaction (engine.lifecycle.compaction).

Sealed Parquet files are immutable, so the rows of a compacted segment are moved by
writing new files: every sealed file that holds rows of a replaced segment is written
again, with the rows of records that were copied pointing at their new (segment,
offset) and the rows of dropped (dead) records left out; then one manifest swap names
the new files, retires the old ones, remaps the versions table (catalog.versions_table) the
same way, marks the new segment sealed to its end and retires the replaced segments.
Readers need no change: they see the catalog before the swap or after it, never half.

Files written here carry a name prefix chosen by the caller, so that a compaction
killed before its swap can find and remove them (`orphans`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stowage.catalog import manifest, versions_table
from stowage.catalog.schema import SCHEMA
from stowage.catalog.sealer import _write_parquet

Moves = dict[tuple[str, int], int]  # (old segment, old offset) -> offset in the new segment


class RelocationError(RuntimeError):
    """The catalog changed under a compaction in a way it cannot apply to; nothing was
    swapped (the caller rolls back)."""


@dataclass
class Rewritten:
    old: str            # sealed file replaced
    new: str            # its replacement ("" when every row of it was dropped)
    rows: int


def holding(directory: Path, files: list[str], segments: list[str]) -> list[str]:
    """The sealed files among `files` that hold at least one row of `segments`."""
    if not files or not segments:
        return []
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        rows = con.execute(
            "SELECT DISTINCT filename FROM read_parquet(?, filename=true, union_by_name=true) "
            "WHERE segment IN (SELECT unnest(?))", [[str(directory / n) for n in files], segments]).fetchall()
    finally:
        con.close()
    return sorted(Path(r[0]).name for r in rows)


def _relocated(table: pa.Table, segments: list[str], new_segment: str, moves: Moves) -> pa.Table:
    """`table` with the rows of `segments` pointing at `new_segment` (moved records) or
    left out (records not in `moves`: dead)."""
    mask = pc.is_in(table["segment"], value_set=pa.array(segments, pa.string()))
    kept = table.filter(pc.invert(mask))
    old = table.filter(mask)
    take, offsets = [], []
    for i, (seg, off) in enumerate(zip(old["segment"].to_pylist(), old["offset"].to_pylist())):
        new = moves.get((seg, off))
        if new is not None:
            take.append(i)
            offsets.append(new)
    if not take:
        return kept
    moved = old.take(pa.array(take, pa.int64()))
    s, o = moved.schema.get_field_index("segment"), moved.schema.get_field_index("offset")
    moved = moved.set_column(s, moved.schema.field(s), pa.array([new_segment] * len(take), moved.schema.field(s).type))
    moved = moved.set_column(o, moved.schema.field(o), pa.array(offsets, moved.schema.field(o).type))
    return pa.concat_tables([kept, moved])


def rewrite(directory: Path, files: list[str], segments: list[str], new_segment: str, moves: Moves,
            prefix: str) -> list[Rewritten]:
    """New sealed files for `files` (those holding rows of `segments`), not yet named by
    the manifest. Call while holding the sealer's merge lock (`compact.lock`), so that no
    merge retires these files meanwhile."""
    out = []
    for i, name in enumerate(files):
        table = pq.read_table(directory / name, schema=SCHEMA)  # an older file's missing columns: null
        table = _relocated(table, segments, new_segment, moves)
        new = _write_parquet(directory, table, f"{prefix}{i:05d}.parquet") if table.num_rows else ""
        out.append(Rewritten(name, new, table.num_rows))
    return out


def _remap_versions(directory: Path, m: manifest.Manifest, segments: list[str], new_segment: str,
                    moves: Moves, prefix: str) -> None:
    """Point the versions table's records of `segments` at their new places (dropping the
    dead ones); mutates m."""
    if not m.duplicates:
        return
    table = versions_table.load_versions(directory, m)
    if not pc.any(pc.is_in(table["segment"], value_set=pa.array(segments, pa.string()))).as_py():
        return
    table = versions_table.merge(_relocated(table, segments, new_segment, moves))
    m.retired[m.duplicates] = time.time()
    m.duplicates = ""
    if table.num_rows:
        m.duplicates = versions_table.write_versions(directory, table, f"{prefix}versions.parquet")


def commit(directory: Path, rewritten: list[Rewritten], segments: list[str], new_segment: str,
           new_size: int, moves: Moves, prefix: str, journal: bool = False) -> None:
    """The one manifest swap that makes a compaction happen (or, if it raises, not).
    `journal`: segments in a bucket, record what the output replaced (engine/storage/compactions.py)."""
    with manifest.update(directory) as m:
        missing = [r.old for r in rewritten if r.old not in m.files]
        if missing:
            raise RelocationError(f"catalog files {', '.join(missing)} were replaced meanwhile")
        now = time.time()
        for r in rewritten:
            del m.files[r.old]
            m.retired[r.old] = now
            if r.new:
                m.files[r.new] = r.rows
        _remap_versions(directory, m, segments, new_segment, moves, prefix)
        if new_segment:
            m.watermarks[new_segment] = new_size
            if journal:
                m.compactions[new_segment] = list(segments)
        for seg in segments:
            m.retired_segments[seg] = now
            if m.outbox is not None:  # published to Iceberg: its rows there must follow (engine/iceberg)
                m.relocations[seg] = 0.0


def orphans(directory: Path, prefix: str, m: manifest.Manifest) -> list[Path]:
    """Files a compaction wrote under `prefix` that the manifest does not name."""
    named = set(m.files) | set(m.retired) | {m.duplicates}
    found = []
    for p in [*directory.glob(f"{prefix}*"), *directory.glob(f".{prefix}*")]:
        name = p.name
        if name.startswith("."):  # a temporary file, never named by a manifest
            found.append(p)
            continue
        base = name[:-len(".studies.parquet")] + ".parquet" if name.endswith(".studies.parquet") else name
        if base not in named:
            found.append(p)
    return found

