"""Reading the catalog: sealed Parquet files named by the manifest plus every worker's
tail, as DuckDB views.

Views, for lookups and for `stowage query`:
  records      every row of every durable record (duplicates and deleted ones included:
               the raw view)
  instances    one row per SOP Instance UID, the one the duplicates policy keeps, never
               a deleted (tombstoned) record
  deleted      the records that tombstones hide, with reason, deleted_at, actor, comment
  tombstones   the tombstone log (catalog.tombstones): sop_instance_uid, received_at,
               study_instance_uid, reason, at, actor, comment
  study_parts  study summaries (catalog.studies) of the instances: one row per study per
               sealed file, plus the tails' studies; several rows of a study add up

`instances` is `records` less the records the policy hides (`shadowed`): those of the
versions table (catalog.versions_table) and those that tail rows newly duplicate, and less the
records a tombstone names (an anti-join on (sop_instance_uid, received_at); the policy
chooses among the versions that are not deleted). Filters on `instances` reach the
Parquet scan, so a lookup reads only the row groups it needs. Every refresh stats the
tombstone log, so a deletion is seen by the next call in every process.
"""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stowage.catalog import cluster_view, duckdb_spill, manifest, sealed_uids, studies, tombstones, versions_table
from stowage.catalog.schema import SCHEMA
from stowage.catalog.tail import TailReader

T = TypeVar("T")
MEMORY_LIMIT = "512MB"  # per process: a worker's memory must not grow with the archive
_VIEWS: "weakref.WeakSet[Catalog]" = weakref.WeakSet()  # this process's open views (memory_report)


def memory_report() -> list[dict[str, Any]]:
    """What DuckDB holds in each of this process's catalog views (a probe's reading,
    docs/fuzzing.md): its memory_limit, and duckdb_memory()'s bytes by tag."""
    out = []
    for view in list(_VIEWS):
        with view._lock:
            limit = view._con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
            tags = dict(view._con.execute("SELECT tag, memory_usage_bytes FROM duckdb_memory() "
                                          "WHERE memory_usage_bytes > 0").fetchall())
        out.append({"directory": str(view.directory), "memory_limit": limit, "bytes": tags,
                    "live_files": len(view._live), "cached_files": len(view._cached)})
    return out


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_COLUMNS = ", ".join(_quote(c) for c in SCHEMA.names)
_SQL_TYPE = {f.name: {"string": "VARCHAR", "int64": "BIGINT", "binary": "BLOB"}.get(str(f.type), "TIMESTAMPTZ")
             for f in SCHEMA}


class Catalog:
    """A read-only view of the catalog for one process; thread-safe, refreshed per call."""

    REOPEN_RETIRED: int | None = 128  # see _stale; None: never reopen

    def __init__(self, directory: Path, duplicates: str = "keep-newest", threads: int = 1,
                 tombstones_dir: Path | None = None, cluster: bool = False, view_deletions: bool = False) -> None:
        """`cluster`: also the other nodes' instances and deletions of the node's view
        (catalog/cluster_view.py), for the readers that answer for the whole archive
        (query, retrieval, commitment, delete); never for those that manage this node's
        own segments (verify, quota). `view_deletions`: this node's records only, hidden by
        the view's deletions too (compaction: what another node deleted is dead here)."""
        self.directory = directory
        self.view_dir = directory.parent / cluster_view.DIRECTORY if cluster or view_deletions else None
        self._deletions_only = view_deletions and not cluster
        self._view = cluster_view.View()
        self._view_stamp: tuple | None = None
        self._view_files: list[str] = []      # the view's instance files (absolute paths)
        self._view_deletions: set[str] = set()  # the view's deletion files in the tombstones table
        self._local_versions: pa.Table | None = None
        self._view_versions = versions_table.VERSIONS_SCHEMA.empty_table()  # UIDs held by several nodes
        self.tails_dir = directory / "tails"
        self._tails = TailReader(self.tails_dir)
        # Beside catalog/ in the data directory: a catalog rebuild keeps them.
        self.tombstones_dir = tombstones_dir or directory.parent / tombstones.DIRECTORY
        self.policy = duplicates
        versions_table.KEEP_NEWEST[duplicates]  # noqa: B018 - an unknown policy fails here
        self._threads = threads
        self._lock = threading.Lock()
        self._filter: sealed_uids.SealedUids | None = None
        self._file_columns: dict[str, tuple[str, ...]] = {}  # sealed file -> its columns (files never change)
        self._has_summary: dict[str, bool] = {}  # sealed file -> whether its study summary exists
        self._open()
        _VIEWS.add(self)

    def _open(self) -> None:
        """A new DuckDB connection and everything this view has built in it."""
        self._tomb_reader = tombstones.TombstoneReader(self.tombstones_dir, keep=False)  # the table below keeps them
        self._tomb_count = 0
        self._undeleted: tuple | None = None  # (versions table, tombstone stamp, the versions left)
        self._tomb_stamp: tuple | None = None
        self._tomb_generation = -1
        self._tomb_empty: bool | None = None
        # Studies holding a hidden record, and the exact summaries of their sealed rows,
        # per sealed file: computed when the hidden set or the files change, not per query.
        self._hidden_key: tuple | None = None
        self._hidden_shadow: pa.Table | None = None
        self._hidden_files: dict[str, pa.Table] = {}
        self._hidden_unknown = False
        self._views_shape: tuple | None = None
        self._con = duckdb.connect(":memory:", config={"threads": self._threads, "memory_limit": MEMORY_LIMIT,
                                                       "temp_directory": duckdb_spill.directory_for(self.directory)})
        self._con.execute("SET parquet_metadata_cache = true")
        self._cached: set[str] = set()  # sealed files the connection may hold metadata of (_stale)
        self._live: list[str] = []  # the sealed files the views read (this node's and the other nodes')
        self._generation, self._state = -1, None
        self._manifest = manifest.Manifest()
        self._sealed_versions = versions_table.VERSIONS_SCHEMA.empty_table()  # of the versions table
        self._tail_checked: dict[str, bool] = {}  # tail UID -> may be sealed too (this generation)
        self._shadow_empty: bool | None = None
        self._with_tails: bool | None = None  # whether the views include the tails
        self._con.register("tail_rows", SCHEMA.empty_table())
        self._con.register("tomb_rows", tombstones.SCHEMA.empty_table())
        self._con.execute("CREATE TEMP TABLE tombstones AS SELECT * FROM tomb_rows")  # native: faster joins
        self._no_tail_studies = self._con.sql(studies.summary_sql("tail_rows")).to_arrow_table()

    def _stale(self) -> bool:
        """DuckDB keeps the metadata of every Parquet file it has read (about 50 kB each)
        until its memory_limit presses, and the catalog retires files all the time (seals,
        merges, compaction): a long-lived view would hold the metadata of its whole history.
        Stale once the files it may hold that its views no longer read outnumber the ones
        they read (and REOPEN_RETIRED); a new connection then starts empty, so memory
        follows the live catalog. What the connection held (the tombstones table, the other
        nodes' deletions in it, the views) is built again by the next refresh, as at start."""
        retired = len(self._cached) - len(self._live)
        return self.REOPEN_RETIRED is not None and retired > max(self.REOPEN_RETIRED, len(self._live))

    def close(self) -> None:
        self._con.close()
        if self._filter is not None:
            self._filter.close()

    def _refresh(self) -> None:
        if self._stale():  # first, before the tombstones are read into the connection
            self._con.close()
            self._open()
        # Tails first, then the manifest: a row sealed in between is then found in both
        # (and the watermark drops the tail copy) rather than in neither.
        tails = self._tails.read()
        try:
            st = os.stat(self.directory / manifest.MANIFEST)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        view_changed = self._read_view()
        tomb_stamp = (tombstones.stamp_of(self.tombstones_dir), self._view.generation)
        if tomb_stamp != self._tomb_stamp:
            self._read_tombstones()
            self._tomb_stamp = tomb_stamp
        state = (stamp, tails.num_rows, tomb_stamp)
        if state == self._state and self._tails.fresh.num_rows == 0 and stamp is not None:
            return  # nothing sealed, nothing new in the tails: the views stand as they are
        m = manifest.load(self.directory)
        unsealed = _unsealed(tails, m)
        self._con.register("tail_rows", unsealed)
        # The tails' study summaries, computed once per change rather than in every query.
        tail_studies = self._con.sql(studies.summary_sql("tail_rows")).to_arrow_table() if unsealed.num_rows \
            else self._no_tail_studies
        self._con.register("tail_studies", tail_studies)
        self._state = state
        with_tails = unsealed.num_rows > 0  # views leave empty tails out: less for DuckDB to plan
        if m.generation != self._generation or with_tails != self._with_tails or view_changed:
            self._con.execute(f"CREATE OR REPLACE TEMP VIEW sealed_rows AS {self._sealed_sql(self._names(m))}")
            self._con.execute(f"CREATE OR REPLACE TEMP VIEW records AS SELECT {_COLUMNS} FROM sealed_rows" + (
                f" UNION ALL SELECT {_COLUMNS} FROM tail_rows" if with_tails else ""))
            self._con.execute(f"CREATE OR REPLACE TEMP VIEW study_rows AS {self._studies_sql(self._names(m), with_tails)}")
            self._with_tails = with_tails
            self._con.execute(
                "CREATE OR REPLACE TEMP VIEW deleted AS SELECT r.*, t.reason, t.at AS deleted_at, t.actor, t.comment "
                "FROM records r JOIN tombstones t ON t.sop_instance_uid = r.sop_instance_uid "
                "AND t.received_at = r.received_at")
        if m.generation != self._generation or view_changed:
            self._filter = sealed_uids.read_filter(self.directory, m, self._filter)
            if m.duplicates != self._manifest.duplicates or self._generation < 0 or self._local_versions is None:
                self._local_versions = versions_table.load_versions(self.directory, m)
            self._sealed_versions = self._across_nodes(self._local_versions)
            self._tail_checked = {}
            self._generation = m.generation
            self._manifest = m
            self._live = self._names(m)
            self._cached.update(self._live)
        shadow = versions_table.shadowed(self._not_deleted(self._versions(unsealed)), self.policy)
        self._con.register("shadowed", shadow)
        self._shadow_empty, self._tomb_empty = shadow.num_rows == 0, self._tomb_count == 0
        if not (self._shadow_empty and self._tomb_empty):
            self._update_hidden(shadow)
        shape = (self._shadow_empty, self._tomb_empty, self._hidden_unknown, with_tails)
        if shape != self._views_shape:
            self._views_shape = shape
            self._create_hiding_views()

    def _read_tombstones(self) -> None:
        """Follow the tombstone log: its new entries join the `tombstones` table."""
        self._tomb_reader.read()
        fresh = tombstones.hiding(self._tomb_reader.fresh)
        self._con.register("tomb_rows", fresh)
        if self._tomb_reader.generation != self._tomb_generation:  # first read, or the log was rewritten
            self._tomb_generation = self._tomb_reader.generation
            self._con.execute("CREATE OR REPLACE TEMP TABLE tombstones AS SELECT * FROM tomb_rows")
            self._tomb_count = fresh.num_rows
            self._view_deletions = set()  # the other nodes' deletions are read in again below
        elif fresh.num_rows:
            self._con.execute("INSERT INTO tombstones SELECT * FROM tomb_rows")
            self._tomb_count += fresh.num_rows
        self._con.unregister("tomb_rows")
        self._read_view_deletions()

    def _not_deleted(self, records: pa.Table) -> pa.Table:
        """The rows of a versions table that no tombstone names: the duplicates policy
        chooses among the versions left (under keep-first, a copy sent again after a
        deletion is served, not the deleted first one)."""
        if records.num_rows == 0 or self._tomb_count == 0:
            return records
        hit = self._undeleted
        if hit is not None and hit[0] is records and hit[1] == self._tomb_stamp:
            return hit[2]
        self._con.register("versions_rows", records)
        left = self._con.sql(
            "SELECT v.* FROM versions_rows v WHERE NOT EXISTS (SELECT 1 FROM tombstones t "
            "WHERE t.sop_instance_uid = v.sop_instance_uid AND t.received_at = v.received_at)").to_arrow_table()
        self._con.unregister("versions_rows")
        left = left.cast(records.schema)
        self._undeleted = (records, self._tomb_stamp, left)
        return left

    def _hiding(self) -> str:
        """The condition on a record `r` that neither the policy nor a tombstone hides it."""
        hidden = ["true"]
        if not self._shadow_empty:
            hidden.append("NOT EXISTS (SELECT 1 FROM shadowed s WHERE s.segment = r.segment "
                          "AND s.\"offset\" = r.\"offset\")")
        if not self._tomb_empty:
            hidden.append("NOT EXISTS (SELECT 1 FROM tombstones t WHERE t.sop_instance_uid = r.sop_instance_uid "
                          "AND t.received_at = r.received_at)")
        return " AND ".join(hidden)

    def _update_hidden(self, shadow: pa.Table) -> None:
        """`hidden_studies` (studies holding a record the policy or a tombstone hides) and
        `hidden_sealed` (exact summaries of those studies' visible sealed rows), kept per
        sealed file: a new file costs a summary of that file alone; a new tombstone or a
        new duplicate, all of them again."""
        key = (self._tomb_stamp, self._tomb_generation)
        if key != self._hidden_key or self._hidden_shadow is None or not shadow.equals(self._hidden_shadow):
            self._con.execute("CREATE OR REPLACE TEMP TABLE hidden_studies AS SELECT DISTINCT study_instance_uid "
                              "FROM (SELECT study_instance_uid FROM shadowed UNION ALL "
                              "SELECT study_instance_uid FROM tombstones)")
            self._hidden_unknown = self._con.execute(
                "SELECT count(*) FROM hidden_studies WHERE study_instance_uid IS NULL").fetchall()[0][0] > 0
            self._hidden_key, self._hidden_shadow, self._hidden_files = key, shadow, {}
        files = self._names(self._manifest)
        changed = not self._hidden_files or set(self._hidden_files) != set(files)
        for name in sorted(files):
            if name not in self._hidden_files:
                rows = (f"(SELECT * FROM ({self._sealed_sql([name])}) r WHERE study_instance_uid IN "
                        f"(SELECT study_instance_uid FROM hidden_studies) AND {self._hiding()})")
                self._hidden_files[name] = self._con.sql(studies.summary_sql(rows)).to_arrow_table()
        self._hidden_files = {n: t for n, t in self._hidden_files.items() if n in files}
        if changed:
            parts = [t for t in self._hidden_files.values() if t.num_rows]
            self._con.register("hidden_sealed", pa.concat_tables(parts, promote_options="default") if parts
                               else self._con.sql(studies.summary_sql("(SELECT * FROM tail_rows WHERE false)"))
                               .to_arrow_table())

    def _create_hiding_views(self) -> None:
        """`instances` and `study_parts` without what the policy or a tombstone hides
        (plain views over records and study_rows when nothing is hidden)."""
        self._con.execute(f"CREATE OR REPLACE TEMP VIEW instances AS SELECT * FROM records r WHERE {self._hiding()}")
        if self._shadow_empty and self._tomb_empty:
            self._con.execute("CREATE OR REPLACE TEMP VIEW study_parts AS SELECT * FROM study_rows")
            return
        columns = ", ".join(studies.COLUMNS)
        if self._hidden_unknown:  # a hidden record of no known study: summarise everything afresh
            self._con.execute(f"CREATE OR REPLACE TEMP VIEW study_parts AS SELECT {columns} FROM "
                              f"({studies.summary_sql('instances')})")
            return
        # Summaries count every record: studies holding a hidden one come from hidden_sealed
        # (their sealed rows, summarised when something changed) and from their tail rows.
        hidden = "(SELECT study_instance_uid FROM hidden_studies)"
        parts = [f"SELECT {columns} FROM study_rows WHERE study_instance_uid NOT IN {hidden}",
                 f"SELECT {columns} FROM hidden_sealed"]
        if self._with_tails:
            tail = f"(SELECT * FROM tail_rows r WHERE study_instance_uid IN {hidden} AND {self._hiding()})"
            parts.append(f"SELECT {columns} FROM ({studies.summary_sql(tail)})")
        self._con.execute("CREATE OR REPLACE TEMP VIEW study_parts AS " + " UNION ALL ".join(parts))

    def _studies_sql(self, names: list[str], with_tails: bool = True) -> str:
        """Study summaries: the sealed files' own, summaries made here of files without
        one, and of the tails."""
        have, lack = [], []
        for name in names:
            if name not in self._has_summary:
                self._has_summary[name] = (self.directory / studies.companion(name)).exists()
            (have if self._has_summary[name] else lack).append(name)
        held = set(names)
        self._has_summary = {n: v for n, v in self._has_summary.items() if n in held}
        self._file_columns = {n: c for n, c in self._file_columns.items() if n in held}
        columns = ", ".join(studies.COLUMNS)
        parts = [f"SELECT {columns} FROM tail_studies"] if with_tails or not names else []
        if have:
            files = [str(self.directory / studies.companion(n)) for n in have]
            parts.append(f"SELECT {columns} FROM read_parquet({files!r})")
        if lack:
            parts.append(f"SELECT {columns} FROM ({studies.summary_sql('(' + self._sealed_sql(lack) + ')')})")
        return " UNION ALL ".join(parts)

    def _sealed_sql(self, names: list[str]) -> str:
        """Sealed files as one relation of SCHEMA's columns. Files are grouped by their own
        columns (older files lack newer ones, read as NULL), so DuckDB need not unify
        schemas on every query as union_by_name would."""
        groups: dict[tuple[str, ...], list[str]] = {}
        for name in names:
            if name not in self._file_columns:
                self._file_columns[name] = tuple(pq.read_schema(self.directory / name).names)
            groups.setdefault(self._file_columns[name], []).append(str(self.directory / name))
        parts = []
        for columns, files in groups.items():
            select = ", ".join(_quote(c) if c in columns else f"CAST(NULL AS {_SQL_TYPE[c]}) AS {_quote(c)}"
                               for c in SCHEMA.names)
            parts.append(f"SELECT {select} FROM read_parquet({files!r})")
        return " UNION ALL ".join(parts) or f"SELECT {_COLUMNS} FROM tail_rows WHERE false"

    # -- the other nodes (catalog/cluster_view.py) --------------------------------------

    def _names(self, m: manifest.Manifest) -> list[str]:
        """The sealed files to read: this node's (names in `directory`), then the view's (absolute paths)."""
        return sorted(m.files) + self._view_files

    def _read_view(self) -> bool:
        """Follow the view's record; True when its files changed."""
        if self.view_dir is None:
            return False
        stamp = cluster_view.stamp(self.view_dir)
        if stamp == self._view_stamp:
            return False
        self._view_stamp = stamp
        view = cluster_view.load(self.view_dir)
        if self._deletions_only:  # the deletions only: no instances, no versions of other nodes
            view.instances, view.versions = {}, ""
        changed = view.generation != self._view.generation or sorted(view.instances) != sorted(self._view.instances)
        if view.versions != self._view.versions:
            self._view_versions = versions_table.VERSIONS_SCHEMA.empty_table() if not view.versions else \
                pq.read_table(self.view_dir / view.versions, schema=versions_table.VERSIONS_SCHEMA)
            changed = True
        self._view = view
        self._view_files = [str(self.view_dir / n) for n in sorted(view.instances)]  # absolute: `directory / name` is it
        return changed

    def _read_view_deletions(self) -> None:
        """The other nodes' deletions join the `tombstones` table: new files added; a
        file gone (the table read whole) or the local log rewritten, all of them again."""
        if self.view_dir is None:
            return
        wanted = set(self._view.deletions)
        if self._view_deletions - wanted:  # a file gone: start again from the local log
            self._tomb_reader = tombstones.TombstoneReader(self.tombstones_dir, keep=False)
            self._tomb_generation = -1
            self._view_deletions = set()
            self._read_tombstones()
            return
        fresh = sorted(wanted - self._view_deletions)
        if not fresh:
            return
        parts = []
        for name in fresh:
            try:
                parts.append(pq.read_table(self.view_dir / name, columns=tombstones.SCHEMA.names)
                             .cast(tombstones.SCHEMA))
            except FileNotFoundError:  # replaced meanwhile: the next refresh reads it
                continue
        rows = tombstones.hiding(pa.concat_tables(parts)) if parts else tombstones.SCHEMA.empty_table()
        self._con.register("tomb_rows", rows)
        self._con.execute("INSERT INTO tombstones SELECT * FROM tomb_rows")
        self._con.unregister("tomb_rows")
        self._tomb_count += rows.num_rows
        self._view_deletions |= set(fresh)

    def _across_nodes(self, local: pa.Table) -> pa.Table:
        """The versions table with the records of UIDs that another node holds too (the
        same instance received by two nodes): the duplicates policy then chooses among
        them as it does on one node (the view's refresher finds them: cluster_view.View.versions)."""
        if self._view_versions.num_rows == 0:
            return local
        return versions_table.merge(local, self._view_versions)

    def _versions(self, tail: pa.Table) -> pa.Table:
        """Every record of each UID with several: the versions table, plus tail rows that
        duplicate a sealed or another tail record (with the sealed records they duplicate)."""
        if tail.num_rows == 0:
            return self._sealed_versions
        uids = tail["sop_instance_uid"].to_pylist()
        checked, f = self._tail_checked, self._filter
        maybe, seen = set(), set()
        for uid in uids:
            sealed = checked.get(uid)
            if sealed is None:
                sealed = checked[uid] = f is None or uid in f
            if sealed or uid in seen:
                maybe.add(uid)
            seen.add(uid)
        if not maybe:
            return self._sealed_versions
        wanted = pa.array(sorted(maybe), pa.string())
        mine = tail.filter(pc.is_in(tail["sop_instance_uid"], value_set=wanted))
        sealed = self._con.sql(
            "SELECT sop_instance_uid, received_at, segment, \"offset\", study_instance_uid FROM sealed_rows "
            "WHERE sop_instance_uid IN (SELECT unnest(?))", params=[wanted.to_pylist()]).to_arrow_table()
        return versions_table.merge(self._sealed_versions, sealed, mine)

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
                    self._generation, self._state = -1, None
        raise AssertionError("unreachable")

    def version(self) -> tuple:
        """A value that changes whenever a query could answer otherwise (rows appended or
        sealed, deletions, compaction, other nodes' view): a result may be kept while it holds."""
        with self._lock:
            self._refresh()
            return self._state, self._generation

    def snapshot(self, work: Callable[[Callable[..., tuple[list[str], list[tuple]]]], T]) -> T:
        """work(execute): several statements over one fresh view of the catalog (one
        refresh, the lock held throughout); execute(sql, params) returns (columns, rows)."""
        def execute(sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple]]:
            cur = self._con.execute(sql, list(params))
            return [d[0] for d in cur.description or ()], cur.fetchall()
        with self._lock:
            for attempt in (1, 2):
                self._refresh()
                try:
                    return work(execute)
                except duckdb.IOException:
                    if attempt == 2:
                        raise
                    self._generation, self._state = -1, None
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
