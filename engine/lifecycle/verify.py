"""Verification: re-read every record of every segment, check both of its checksums
(engine/store/integrity.py), and cross-check the segments with the catalog. Shared by
`stowage verify` and the background scrub (engine/lifecycle/scrub.py).

What is found, as a `Problem` (segment, offset, SOP Instance UID, what):
  corrupt   the record's CRC fails or its framing is broken; its dataset's CRC-32 or length
            differs from its catalog row or its own header; a catalog row points at no
            record (a missing segment, a cut one, an offset inside another record); a row
            names another instance than the record at its offset
  catalog   a record the catalog lacks, in the range the catalog covers (`stowage
            rebuild-catalog` indexes it again); the record itself is intact
Corrupt records are marked (engine/store/integrity.py); a marked record that reads back intact
again has its mark lifted.

Read-only on segments, so it runs beside `stowage serve`: each segment is verified up to
the end of what the catalog knows of it (its sealed watermark, or the last tail row's
record), never into the active segment's unacknowledged tail.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from stowage.catalog import manifest, tombstones
from stowage.catalog.reader import Catalog
from stowage.engine.lifecycle.compaction import RESERVED
from stowage.engine.store.integrity import CorruptMarks, dataset_problem, record_dataset
from stowage.engine.store.segment import MAGIC, CorruptRecord, open_record, open_segment

_SCAN_WINDOW = 8 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")  # POSIX_FADV_DONTNEED leaves a partial page at either end


class Stopped(Exception):
    """The pass was asked to stop (the scrub on SIGTERM)."""


class Pacer:
    """Spends bytes at a steady `rate` (bytes/s; None: unlimited): sleeps as soon as the
    bytes read run ahead of the rate, so reads are spread evenly, never in bursts. After a
    stall (a slow disk, a suspended process) it does not race to catch up. Shared by the
    threads of a parallel verify: the rate is theirs together."""

    def __init__(self, rate: float | None, stop: threading.Event | None = None) -> None:
        self.rate = rate
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._spent = 0

    def set_rate(self, rate: float | None) -> None:
        with self._lock:
            self.rate, self._t0, self._spent = rate, time.monotonic(), 0

    def spend(self, n: int) -> None:
        if self.stop.is_set():
            raise Stopped
        if not self.rate:
            return
        with self._lock:
            self._spent += n
            due = self._t0 + self._spent / self.rate
            now = time.monotonic()
            if now - due > 1.0:
                self._t0, self._spent = now, 0
        if due > now and self.stop.wait(due - now):
            raise Stopped


@dataclass(frozen=True)
class Problem:
    segment: str
    offset: int
    sop_instance_uid: str
    problem: str
    corrupt: bool = True  # False: the record is intact, the catalog is not


@dataclass(frozen=True)
class Row:
    offset: int
    record_length: int
    sop_instance_uid: str
    dataset_crc32: int | None
    dataset_length: int | None


@dataclass(frozen=True)
class Span:
    """One segment, to be verified up to `end` (what the catalog knows of it)."""

    segment: str
    end: int
    rows: int


@dataclass
class Tally:
    records: int = 0
    bytes: int = 0
    segments: int = 0
    problems: list[Problem] = field(default_factory=list)
    marked: int = 0   # corrupt records marked by this run (not marked before)
    cleared: int = 0  # marks lifted: the record reads back intact again

    @property
    def corrupt(self) -> int:
        return sum(p.corrupt for p in self.problems)

    def add(self, other: "Tally") -> None:
        self.records += other.records
        self.bytes += other.bytes
        self.segments += other.segments
        self.problems += other.problems
        self.marked += other.marked
        self.cleared += other.cleared


class _ReadableCatalog(Catalog):
    """The catalog less the sealed files that cannot be read: one damaged file must not
    stop the whole pass. Their records are then verified without rows, and reported as
    records the catalog lacks, with the UIDs from their own headers."""

    def __init__(self, directory: Path, duplicates: str, leave_out: frozenset[str]) -> None:
        self.leave_out = leave_out
        super().__init__(directory, duplicates)

    def _names(self, m: manifest.Manifest) -> list[str]:
        return [n for n in super()._names(m) if n not in self.leave_out]


def damaged_catalog_files(catalog_dir: Path, names: list[str]) -> dict[str, str]:
    """The sealed catalog files (and their study summaries) that cannot be read to their
    end, each with why. Read batch by batch: memory stays bounded whatever a file's size."""
    damaged: dict[str, str] = {}
    for name in names:
        for path in (catalog_dir / name, catalog_dir / name.replace(".parquet", ".studies.parquet")):
            if path.name != name and not path.exists():
                continue  # an older file without a study summary
            try:
                for _batch in pq.ParquetFile(path).iter_batches(batch_size=16384):
                    pass
            except FileNotFoundError:
                if path.name == name and name in manifest.load(catalog_dir).files:  # not merged away meanwhile
                    damaged[name] = f"{path.name} is missing"
                break
            except (OSError, pa.ArrowException, ValueError) as e:
                damaged[name] = f"{path.name}: {str(e)[:120]}"
                break
    return damaged


def catalog_unreadable(e: Exception) -> str:
    """What to tell a person whose command met a catalog file it cannot read."""
    return (f"the catalog cannot be read ({str(e).splitlines()[0][:160]}): stowage verify names the damaged "
            "file and its instances; stowage rebuild-catalog (archive stopped) writes the catalog again "
            "from the segments")


class Verifier:
    """Verifies spans of one data directory, reporting problems to `on_problem` and
    marking corrupt records as found by `by`."""

    def __init__(self, data_dir: Path, pacer: Pacer, *, by: str, duplicates: str = "keep-newest",
                 on_problem: Callable[[Problem], None] = lambda _p: None,
                 on_progress: Callable[[str, int, int], None] = lambda _s, _o, _n: None,
                 drop_cache: bool = False) -> None:
        self.data_dir = data_dir
        self.segments_dir = data_dir / "segments"
        self.catalog_dir = data_dir / "catalog"
        self.duplicates = duplicates
        self.catalog: Catalog = _ReadableCatalog(self.catalog_dir, duplicates, frozenset())
        self.damaged: dict[str, str] = {}  # catalog file -> why it cannot be read (the last plan's)
        self.marks = CorruptMarks(data_dir)
        self.pacer = pacer
        self.by = by
        self.on_problem = on_problem
        self.on_progress = on_progress  # (segment, offset reached, bytes read since the last call)
        self.drop_cache = drop_cache  # leave the page cache to the archive's readers (the scrub)
        self.tally = Tally()
        self._unindexed: list[Problem] = []

    def close(self) -> None:
        self.catalog.close()

    def leave_out(self, damaged: dict[str, str]) -> None:
        """Read the catalog without these files from now on (a new view when they change)."""
        if set(damaged) != set(self.damaged):
            self.catalog.close()
            self.catalog = _ReadableCatalog(self.catalog_dir, self.duplicates, frozenset(damaged))
        self.damaged = dict(damaged)

    def plan(self) -> list[Span]:
        """Every segment on disk or named by a catalog row, in name order, with how far to
        verify it. First the catalog files are read through: a damaged one is reported and
        left out of the pass."""
        self.leave_out(damaged_catalog_files(self.catalog_dir, sorted(manifest.load(self.catalog_dir).files)))
        for name, why in sorted(self.damaged.items()):
            self._tell(Problem(f"catalog/{name}", 0, "", f"catalog file cannot be read ({why}); the records it "
                               "indexes are reported as not in the catalog: stowage rebuild-catalog (archive "
                               "stopped) writes the catalog again", corrupt=False))
        self._tell_damaged_tombstones()
        _cols, rows = self.catalog.execute(
            "SELECT segment, max(\"offset\" + record_length), count(*) FROM records GROUP BY segment")
        known = {seg: (int(end or 0), int(n)) for seg, end, n in rows}
        m = manifest.load(self.catalog_dir)
        try:
            on_disk = {n for n in os.listdir(self.segments_dir) if n.endswith(".seg")}
        except FileNotFoundError:
            on_disk = set()
        spans = []
        for seg in sorted(on_disk | set(known)):
            if _left_out(m, seg):
                continue
            end, n = known.get(seg, (0, 0))
            spans.append(Span(seg, max(end, m.sealed_upto(seg)), n))
        return spans

    def _tell_damaged_tombstones(self) -> None:
        """Deletions the tombstone log lost to damage: those instances are visible again."""
        where = f"{tombstones.DIRECTORY}/{tombstones.LOG}"
        for bad in tombstones.damaged_lines(self.data_dir):
            why = (f"tombstone line of {bad.length} bytes is damaged (checksum): its deletions are not in force; "
                   "delete these instances again (stowage delete --instance)")
            for uid in bad.uids or ("",):
                self._tell(Problem(where, bad.offset, uid, why if uid else why + " (no UID legible in it)",
                                   corrupt=False))

    def _rows(self, segment: str, start: int) -> dict[int, Row]:
        _cols, rows = self.catalog.execute(
            "SELECT \"offset\", record_length, sop_instance_uid, dataset_crc32, dataset_length FROM records "
            "WHERE segment = ? AND \"offset\" >= ? ORDER BY \"offset\"", [segment, start])
        out: dict[int, Row] = {}
        for off, length, uid, crc, dlen in rows:
            out.setdefault(int(off), Row(int(off), int(length or 0), uid or "", crc, dlen))
        return out

    def _report(self, p: Problem) -> None:
        if not p.corrupt:  # told once the segment is done, if it still belongs to the catalog
            self._unindexed.append(p)
            return
        self._tell(p)

    def _tell(self, p: Problem) -> None:
        self.tally.problems.append(p)
        if p.corrupt:
            try:
                self.tally.marked += self.marks.mark(p.segment, p.offset, p.sop_instance_uid, p.problem, self.by)
            except OSError as e:  # reported all the same; the mark is tried again on the next pass
                p = Problem(p.segment, p.offset, p.sop_instance_uid,
                            f"{p.problem} (could not be marked: {e.strerror or e})", p.corrupt)
        self.on_problem(p)

    def verify(self, span: Span, start: int = 0) -> None:
        """Verify `span` from the record boundary `start`; problems go to `on_problem`."""
        rows = self._rows(span.segment, start)
        end = max([span.end] + [r.offset + r.record_length for r in rows.values()])
        path = self.segments_dir / span.segment
        try:
            f = open_segment(path, buffering=1 << 16)  # or its uploaded copy, by ranged GETs
        except FileNotFoundError:
            if self._rows(span.segment, start):  # still named: not a segment compacted away meanwhile
                for r in rows.values():
                    self._report(Problem(span.segment, r.offset, r.sop_instance_uid, "segment file is missing"))
            return
        self.tally.segments += 1
        self._unindexed = []
        with f:
            try:
                os.posix_fadvise(f.fileno(), start, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
            visited = self._walk(f, path, span.segment, start, end, rows)
        # A compaction may have replaced the segment meanwhile (its rows now name the new
        # one): its records are then not missing from the catalog.
        if not _left_out(manifest.load(self.catalog_dir), span.segment):
            for p in self._unindexed:
                self._tell(p)
        for r in rows.values():
            if r.offset not in visited:
                self._report(Problem(span.segment, r.offset, r.sop_instance_uid,
                                     "catalog row points at no record (cut segment or inside another record)"))

    def _walk(self, f: BinaryIO, path: Path, segment: str, pos: int, end: int, rows: dict[int, Row]) -> set[int]:
        """Each record from `pos` to `end`; returns the offsets where a record was read."""
        visited: set[int] = set()
        marked = self.marks.in_segment(segment)
        boundaries = sorted(rows)
        last_drop, dropped_at = pos, time.monotonic()
        while pos < end:
            row = rows.get(pos)
            try:
                rec, stored = open_record(f, pos)
                self.pacer.spend(rec.payload_offset - pos)
                crc, length = record_dataset(path, rec, stored, self.pacer.spend)
            except (CorruptRecord, OSError) as e:  # OSError: an unreadable sector (EIO)
                visited.add(pos)
                why = str(e) if isinstance(e, CorruptRecord) else f"cannot read at byte {pos}: {e.strerror or e}"
                self._report(Problem(segment, pos, row.sop_instance_uid if row else "", why))
                nxt = pos + row.record_length if row and row.record_length else self._next_boundary(f, pos, end,
                                                                                                    boundaries)
                if nxt is None:
                    self._advance(segment, pos, end)
                    break
                self._advance(segment, pos, nxt)
                pos = nxt
                continue
            visited.add(pos)
            self.tally.records += 1
            self._check(segment, rec.header, row, pos, rec.length, crc, length, pos in marked)
            self._advance(segment, pos, pos + rec.length)
            pos += rec.length
            # at least once a second: a scrub paced to a few KB/s would otherwise hold all it
            # read of a segment in the cache until the segment's end, hours later
            if self.drop_cache and (pos - last_drop >= 64 << 20 or time.monotonic() - dropped_at >= 1):
                _drop(f, last_drop, pos)
                last_drop, dropped_at = pos & ~(_PAGE - 1), time.monotonic()  # the kernel keeps a partial page
        if self.drop_cache:
            _drop(f, last_drop, pos)
        return visited

    def _advance(self, segment: str, pos: int, nxt: int) -> None:
        self.tally.bytes += nxt - pos
        self.on_progress(segment, nxt, nxt - pos)

    def _check(self, segment: str, header: dict, row: Row | None, pos: int, rec_length: int, crc: int,
               length: int, was_marked: bool) -> None:
        """An intact record against its own header and its catalog row."""
        uid = str(header.get("sop_instance_uid") or "")
        problem = dataset_problem(crc, length, header.get("dataset_crc32"), header.get("dataset_length"),
                                  "the record header's")
        if problem is None and row is not None:
            if row.sop_instance_uid != uid:
                problem = f"catalog row names {row.sop_instance_uid}, the record holds {uid}"
            elif row.record_length and row.record_length != rec_length:
                problem = f"catalog row says {row.record_length} bytes, the record has {rec_length}"
            else:
                problem = dataset_problem(crc, length, row.dataset_crc32, row.dataset_length, "the catalog's")
        if problem is not None:
            self._report(Problem(segment, pos, uid, problem))
        elif row is None:
            self._report(Problem(segment, pos, uid, "record is not in the catalog (stowage rebuild-catalog "
                                                    "indexes it again)", corrupt=False))
        elif was_marked and self.marks.clear(segment, pos, self.by):
            self.tally.cleared += 1

    def _next_boundary(self, f: BinaryIO, pos: int, end: int, boundaries: list[int]) -> int | None:
        """Where to go on after a broken record without a catalog row: the next row's
        record, else the next offset where a whole record verifies."""
        later = [b for b in boundaries if b > pos]
        if later:
            return later[0]
        for cand in _magic_offsets(f, pos + 1, end):
            try:
                _rec, stored = open_record(f, cand)
                for _ in stored:
                    pass
            except (CorruptRecord, OSError):
                continue
            return cand
        return None


def _left_out(m: manifest.Manifest, segment: str) -> bool:
    """Segments that are not the catalog's to answer for: one a compaction replaced (kept
    for a grace, its rows moved), or one a compaction is still writing (engine/lifecycle/compaction.py)."""
    return segment in m.retired_segments or m.sealed_upto(segment) >= RESERVED


def _magic_offsets(f: BinaryIO, start: int, end: int) -> Iterator[int]:
    base = start
    while base < end:
        f.seek(base)
        data = f.read(min(_SCAN_WINDOW, end - base) + len(MAGIC) - 1)
        if len(data) < len(MAGIC):
            return
        pos = data.find(MAGIC)
        while pos != -1 and pos < _SCAN_WINDOW and base + pos < end:
            yield base + pos
            pos = data.find(MAGIC, pos + 1)
        base += _SCAN_WINDOW


def _drop(f: BinaryIO, start: int, end: int) -> None:
    """Let the kernel drop what a pass read from its cache: a weekly re-read of the whole
    archive must not push out the pages the archive's readers use."""
    try:
        os.posix_fadvise(f.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def verify_all(verifiers: list[Verifier], spans: list[Span]) -> None:
    """Each verifier takes the next segment until none is left; the first error raised
    in any of them is raised here, once all have stopped."""
    todo = deque(spans)
    errors: list[BaseException] = []

    def work(v: Verifier) -> None:
        while not errors:
            try:
                span = todo.popleft()
            except IndexError:
                return
            try:
                v.verify(span)
            except BaseException as e:  # noqa: B036 - re-raised in the calling thread
                errors.append(e)
                v.pacer.stop.set()

    if len(verifiers) == 1:
        work(verifiers[0])
    else:
        threads = [threading.Thread(target=work, args=(v,), name=f"verify-{i}", daemon=True)
                   for i, v in enumerate(verifiers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
