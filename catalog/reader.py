"""Reading the catalog: sealed Parquet files named by the manifest plus every worker's
tail, as DuckDB views.

Views, for lookups and for `stowage query`:
  records    every row of every durable record (duplicates included)
  instances  one row per SOP Instance UID, the one the duplicates policy keeps
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from catalog import manifest
from catalog.tail import read_tails

# Which duplicate a policy keeps: the newest, or the first one received.
_ORDER = {"keep-newest": "DESC", "keep-first": "ASC", "reject": "ASC"}


class Catalog:
    """A read-only view of the catalog for one process; thread-safe, refreshed per call."""

    def __init__(self, directory: Path, duplicates: str = "keep-newest") -> None:
        self.directory = directory
        self.tails_dir = directory / "tails"
        self._order = _ORDER[duplicates]
        self._con = duckdb.connect(":memory:", config={"threads": 1})
        self._lock = threading.Lock()
        self._generation = -1
        self._manifest = manifest.Manifest()

    def close(self) -> None:
        self._con.close()

    def _refresh(self) -> None:
        # Tails first, then the manifest: a row sealed in between is then found in both
        # (and the watermark drops the tail copy) rather than in neither.
        tails = read_tails(self.tails_dir)
        m = manifest.load(self.directory)
        self._con.register("tail_rows", _unsealed(tails, m))
        if m.generation != self._generation:
            files = [str(self.directory / n) for n in sorted(m.files)]
            sealed = (f"SELECT * FROM read_parquet({files!r})" if files
                      else "SELECT * FROM tail_rows WHERE false")
            self._con.execute(f"CREATE OR REPLACE TEMP VIEW sealed_rows AS {sealed}")
            self._con.execute("CREATE OR REPLACE TEMP VIEW records AS "
                              "SELECT * FROM sealed_rows UNION ALL BY NAME SELECT * FROM tail_rows")
            self._con.execute(
                "CREATE OR REPLACE TEMP VIEW instances AS SELECT * FROM records QUALIFY "
                "row_number() OVER (PARTITION BY sop_instance_uid ORDER BY received_at "
                f"{self._order}, segment {self._order}, \"offset\" {self._order}) = 1")
            self._generation = m.generation
            self._manifest = m

    def execute(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple]]:
        """Run `sql` (values bound as parameters) over fresh views; returns (columns, rows)."""
        with self._lock:
            for attempt in (1, 2):
                self._refresh()
                try:
                    cur = self._con.execute(sql, list(params))
                    return [d[0] for d in cur.description or ()], cur.fetchall()
                except duckdb.IOException:
                    if attempt == 2:  # a file was compacted away under us: reload the manifest
                        raise
                    self._generation = -1
        raise AssertionError("unreachable")

    def lookup(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """The kept row for a SOP Instance UID, or None."""
        cols, rows = self.execute("SELECT * FROM instances WHERE sop_instance_uid = ?", [sop_instance_uid])
        return dict(zip(cols, rows[0])) if rows else None

    def versions(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        """Every durable record of a SOP Instance UID, oldest first."""
        cols, rows = self.execute(
            "SELECT * FROM records WHERE sop_instance_uid = ? ORDER BY received_at, segment, \"offset\"",
            [sop_instance_uid])
        return [dict(zip(cols, r)) for r in rows]


def _unsealed(tails: pa.Table, m: manifest.Manifest) -> pa.Table:
    """Tail rows past their segment's sealed watermark."""
    if tails.num_rows == 0:
        return tails
    segments = pc.unique(tails["segment"])
    marks = pa.array([m.sealed_upto(s) for s in segments.to_pylist()], pa.int64())
    per_row = pc.take(marks, pc.index_in(tails["segment"], value_set=segments))
    return tails.filter(pc.greater_equal(tails["offset"], per_row))
