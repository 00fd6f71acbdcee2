"""The versions table: which SOP Instance UIDs the catalog holds more than one record of,
so that readers can serve the one the duplicates policy keeps without a window over
every row.

Almost every instance is stored once. Under the manifest lock, each sealing checks its
rows against the sealed-UID filter (catalog.sealed_uids) and looks up the few that may be
sealed already. What it finds goes to the versions table: every record (SOP Instance UID,
received_at, segment, offset) of each UID with more than one, a small Parquet file named
by the manifest (`duplicates`). Readers take the versions table plus the tails (whose rows
they check against the filter themselves) and hide the records the policy does not keep.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Iterable

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stowage.catalog.manifest import Manifest
from stowage.catalog.sealed_uids import open_filter

VERSION_COLUMNS = ("sop_instance_uid", "received_at", "segment", "offset", "study_instance_uid")
VERSIONS_SCHEMA = pa.schema([("sop_instance_uid", pa.string()), ("received_at", pa.timestamp("us", tz="UTC")),
                             ("segment", pa.string()), ("offset", pa.int64()), ("study_instance_uid", pa.string())])
# Which duplicate a policy keeps: the newest record, or the first one received.
KEEP_NEWEST = {"keep-newest": True, "keep-first": False, "reject": False}


def load_versions(directory: Path, m: Manifest) -> pa.Table:
    if not m.duplicates:
        return VERSIONS_SCHEMA.empty_table()
    return pq.read_table(directory / m.duplicates, schema=VERSIONS_SCHEMA)  # a missing column reads as null


def sealed_versions(directory: Path, files: Iterable[str], uids: list[str]) -> pa.Table:
    """Every sealed record of `uids` in `files` (values bound, never SQL text)."""
    paths = [str(directory / n) for n in files]
    if not paths or not uids:
        return VERSIONS_SCHEMA.empty_table()
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        return con.sql(
            "SELECT sop_instance_uid, received_at, segment, \"offset\", study_instance_uid "
            "FROM read_parquet(?, union_by_name=true) "
            "WHERE sop_instance_uid IN (SELECT unnest(?))", params=[paths, uids]).to_arrow_table().cast(VERSIONS_SCHEMA)
    finally:
        con.close()


def merge(*tables: pa.Table) -> pa.Table:
    """The union of version tables, one row per record, only UIDs with several records."""
    t = pa.concat_tables([x.select(VERSION_COLUMNS).cast(VERSIONS_SCHEMA) for x in tables])
    if t.num_rows == 0:
        return t
    t = t.group_by(["segment", "offset"], use_threads=False).aggregate(
        [("sop_instance_uid", "min"), ("received_at", "min"), ("study_instance_uid", "min")]).rename_columns(
        ["segment", "offset", "sop_instance_uid", "received_at", "study_instance_uid"]).select(VERSION_COLUMNS)
    counts = t.group_by("sop_instance_uid", use_threads=False).aggregate([("segment", "count")])
    several = counts.filter(pc.greater(counts["segment_count"], 1))["sop_instance_uid"]
    return t.filter(pc.is_in(t["sop_instance_uid"], value_set=several))


def note_sealed(directory: Path, m: Manifest, table: pa.Table) -> None:
    """Account for `table` (rows about to be sealed into a file not yet in m.files): find
    the UIDs it duplicates, update the versions table and the filter. Mutates m; call
    under the manifest lock, before the manifest is stored."""
    f = open_filter(directory, m)
    try:
        # bits first, then the lookups: a failure in between leaves extra bits (allowed),
        # never missing ones; each UID hashed once for both
        maybe = set(f.update(table["sop_instance_uid"].to_pylist()))
        if maybe:
            candidates = sorted(maybe)
            mine = table.filter(pc.is_in(table["sop_instance_uid"], value_set=pa.array(candidates, pa.string())))
            known = load_versions(directory, m)
            versions = merge(known, sealed_versions(directory, m.files, candidates), mine)
            if versions.num_rows != known.num_rows:  # merging only ever adds records
                if m.duplicates:
                    m.retired[m.duplicates] = time.time()
                m.duplicates = write_versions(directory, versions)
        f.sync()
    finally:
        f.close()


def write_versions(directory: Path, versions: pa.Table, name: str = "") -> str:
    """Write `versions` durably (a temporary file, fsync, rename) as `name`, by default a
    new unique one; returns the name for the manifest."""
    name = name or f"versions-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{name}.tmp"
    pq.write_table(versions, tmp, compression="zstd")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / name)
    return name


def shadowed(versions: pa.Table, policy: str) -> pa.Table:
    """(segment, offset, study_instance_uid) of every record in `versions` that policy does
    not serve."""
    if versions.num_rows == 0:
        return pa.table({"segment": pa.array([], pa.string()), "offset": pa.array([], pa.int64()),
                         "study_instance_uid": pa.array([], pa.string())})
    order = "descending" if KEEP_NEWEST[policy] else "ascending"
    t = versions.sort_by([("sop_instance_uid", "ascending"), ("received_at", order), ("segment", order),
                          ("offset", order)])
    uids = t["sop_instance_uid"]
    first = pc.not_equal(uids.slice(1), uids.slice(0, len(uids) - 1))  # row i+1 starts a new UID
    keep = pa.concat_arrays([pa.array([True]), first.combine_chunks()])
    return t.filter(pc.invert(keep)).select(["segment", "offset", "study_instance_uid"])
