"""Sealing: turning tail rows into immutable Parquet files named by the manifest, and
merging small Parquet files in the background so that reads stay fast.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stowage.catalog import manifest, studies, versions_table
from stowage.catalog.schema import SCHEMA
from stowage.catalog.tail import SUFFIX, TailWriter

log = logging.getLogger("stowage.catalog")
# Rows of a study, and of a series, sit together: a study or series lookup reads one row
# group per file, found from min/max statistics. Other identifiers are found through
# per-row-group Bloom filters (DuckDB skips row groups whose filter rules a value out) and
# dictionary pages.
SORT_KEYS = [("study_instance_uid", "ascending"), ("series_instance_uid", "ascending"),
             ("sop_instance_uid", "ascending")]
ROW_GROUP_ROWS = 32768
_BLOOM = {"sop_instance_uid": 1, "series_instance_uid": 8, "study_instance_uid": 32, "patient_id": 32,
          "accession_number": 32}  # column -> rows per distinct value, roughly
COMPACT_MAX_ROWS = 4_000_000  # files at least this big are left alone


def _write_parquet(directory: Path, table: pa.Table, name: str = "") -> str:
    """Write `table` as a new Parquet file (and its study summary); `name` if given (a
    compaction names its files so that a crash can find them), else a fresh one."""
    name = name or f"part-{time.time_ns():020d}-{os.getpid()}.parquet"
    tmp = directory / f".{name}.tmp"
    try:
        studies.write(directory, name, table)  # first: a file in the manifest always has its summary
        rows = min(ROW_GROUP_ROWS, max(table.num_rows, 1))
        pq.write_table(table.sort_by(SORT_KEYS), tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                       write_statistics=True, write_page_index=True,
                       bloom_filter_options={col: {"ndv": max(rows // per, 64), "fpp": 0.01}
                                             for col, per in _BLOOM.items()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _discard_unnamed(directory, name)
        raise
    return name


def _discard_unnamed(directory: Path, name: str) -> None:
    """Remove sealed file `name` and its summary when the manifest does not name them: a
    seal or merge that failed (a full disk, typically) would otherwise leave them for
    ever, holding the very space its next try needs. Left alone when the manifest cannot
    be read: a file it names is never removed here."""
    try:
        if name in manifest.load(directory).files:
            return
        (directory / name).unlink(missing_ok=True)
        (directory / studies.companion(name)).unlink(missing_ok=True)
    except (OSError, ValueError) as e:
        log.warning("could not remove %s, written by a failed seal: %s", name, e)


def seal_rows(directory: Path, rows: pa.Table | list[dict[str, Any]]) -> str | None:
    """Write `rows` as a Parquet file and advance the watermarks of their segments."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=SCHEMA)
    if table.num_rows == 0:
        return None
    ends: dict[str, int] = {}
    for seg, off, length in zip(table["segment"].to_pylist(), table["offset"].to_pylist(),
                                table["record_length"].to_pylist()):
        ends[seg] = max(ends.get(seg, 0), off + length)
    name = _write_parquet(directory, table)
    try:
        with manifest.update(directory) as m:
            versions_table.note_sealed(directory, m, table)
            m.files[name] = table.num_rows
            if m.outbox is not None:  # fresh rows, for the Iceberg publisher (engine/iceberg)
                m.outbox.append(name)
            for seg, end in ends.items():
                m.watermarks[seg] = max(m.watermarks.get(seg, 0), end)
    except BaseException:
        _discard_unnamed(directory, name)
        raise
    return name


def advance_watermark(directory: Path, segment: str, end: int) -> None:
    """Record that `segment` holds nothing to seal before `end` (e.g. an empty or cut tail)."""
    with manifest.update(directory) as m:
        m.watermarks[segment] = max(m.watermarks.get(segment, 0), end)


def _tier(rows: int, fan_in: int) -> int:
    tier = 0
    while rows >= fan_in:
        rows //= fan_in
        tier += 1
    return tier


def _pick(files: dict[str, int], min_files: int) -> list[str]:
    """Size-tiered: the smallest tier holding `min_files` files of similar size, so each
    row is rewritten about log(rows) times in all, never once per sealing."""
    tiers: dict[int, list[str]] = {}
    for name, rows in files.items():
        if rows < COMPACT_MAX_ROWS:
            tiers.setdefault(_tier(rows, min_files), []).append(name)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= min_files:
            return sorted(tiers[tier])
    return []


def _give_back() -> None:
    """Return the merge's memory to the system. A merge holds its eight files whole in
    Arrow, twice (read, then sorted): 10,000 rows of CT headers are about 60 MB, and
    Arrow's default pool (mimalloc) kept every page of that peak after the tables were
    freed, a worker's resident size rising by each merge larger than the last (+156 MiB
    for 10,000 rows, +13 MiB with this; docs/fuzzing.md). Called in the merging thread:
    mimalloc collects the calling thread's heap."""
    pa.default_memory_pool().release_unused()


def compact(directory: Path, min_files: int) -> str | None:
    """Merge small Parquet files of similar size into one, when there are enough of them."""
    with manifest.lock(directory, "compact.lock", blocking=False) as got:
        if not got:
            return None
        small = _pick(manifest.load(directory).files, max(2, min_files))
        if not small:
            return None
        merged = pa.concat_tables(pq.read_table(directory / n, schema=SCHEMA) for n in small)
        name = _write_parquet(directory, merged)
        rows = merged.num_rows
        del merged
        _give_back()
        try:
            with manifest.update(directory) as m:
                now = time.time()
                for n in small:
                    m.files.pop(n, None)
                    m.retired[n] = now
                m.files[name] = rows
        except BaseException:
            _discard_unnamed(directory, name)
            raise
        log.info("compacted %d catalog files (%d rows) into %s", len(small), rows, name)
        return name


QUIET_S = 0.2  # no rows for this long: the worker has gone quiet, seal at the next look


class Sealer:
    """One worker's tail: rows of committed batches go to the tail file at once, and to
    Parquet on `seal()`."""

    def __init__(self, directory: Path, slot: int, compact_min_files: int = 8) -> None:
        self.directory = directory
        self.tails = directory / "tails"
        self.slot = slot
        self.compact_min_files = compact_min_files
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        self._first_at = 0.0   # when the oldest unsealed row arrived (monotonic)
        self._last_at = 0.0    # when the newest did
        self._generation = 0
        self._retired: list[Path] = []  # tail files whose rows wait for the next seal
        self._tail: TailWriter | None = self._new_tail()

    def _new_tail(self) -> TailWriter:
        self._generation += 1
        return TailWriter(self.tails / f"{self.slot:03d}-{os.getpid()}-{self._generation:08d}{SUFFIX}")

    def commit(self, rows: list[dict[str, Any]]) -> None:
        """Make the rows of a durable batch visible to every process; raises OSError if
        they could not be (e.g. disk full), leaving the tail readable."""
        with self._lock:
            if self._tail is None:
                self._tail = self._new_tail()
            try:
                self._tail.append(rows)
            except OSError:
                self._set_aside_broken_tail()
                raise
            self._last_at = time.monotonic()
            if not self._rows:
                self._first_at = self._last_at
            self._rows.extend(rows)

    def due(self, max_rows: int, max_age: float, quiet: float = QUIET_S) -> bool:
        """Whether to seal now: no rows came for `quiet` seconds (a worker that has gone
        quiet seals at once), or the unsealed rows reached `max_rows` or waited `max_age`
        seconds. A busy worker so seals in large batches: each seal costs a Parquet file, a
        study summary and, every few, a compaction, whatever its size (docs/benchmarks.md)."""
        with self._lock:
            if not self._rows:
                return False
            now = time.monotonic()
            return now - self._last_at >= quiet or len(self._rows) >= max_rows or now - self._first_at >= max_age

    def _set_aside_broken_tail(self) -> None:
        """A failed append may leave half a batch at the end of the tail file: readers stop
        there, so the batches before it stay readable, but nothing more may be appended."""
        broken, self._tail = self._tail, None
        try:
            broken.close()
        except OSError:
            pass
        self._retired.append(broken.path)

    def seal(self) -> None:
        with self._lock:
            if not self._rows:
                return
            rows, self._rows = self._rows, []
            old, self._tail = self._tail, None
            done, self._retired = self._retired + ([old.path] if old else []), []
        if old is not None:
            old.close()
        try:
            seal_rows(self.directory, rows)
        except BaseException:  # keep them for the next try; the tail files still serve them
            with self._lock:
                self._rows[:0] = rows
                self._retired[:0] = done
            raise
        for path in done:
            path.unlink(missing_ok=True)
        compact(self.directory, self.compact_min_files)

    def close(self) -> None:
        self.seal()
        with self._lock:
            tail, self._tail = self._tail, None
        if tail is None:
            return
        tail.close()
        try:
            tail.path.unlink(missing_ok=True)
        except OSError as e:  # e.g. a read-only file system: it holds no unsealed row, the next start drops it
            log.warning("could not remove the empty catalog tail %s (%s)", tail.path.name, e.strerror or e)
