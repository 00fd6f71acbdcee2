"""Compaction: reclaim the space of dead records (superseded duplicates, deleted and
rejected instances) by copying the live records of sparse segments into a new one.

Live is what the catalog's `instances` view serves; everything else in a segment is
dead. With several nodes, a deletion another node published (the view's deletions,
catalog/cluster_view.py) makes this node's record dead too. A sealed segment (not the last of its slot, catalogued to its end) whose live
bytes are below `compact_live_ratio` of its size is a candidate. One *round* takes
candidates (live bytes up to `segment_size` in all), and:

1. journal  writes `segments/999.compaction` (new segment, replaced segments, the
            name prefix of the catalog files it will write), fsync'd;
2. reserve  marks the new segment `999-<seq>.seg` sealed to RESERVED in the manifest,
            so that recovery never indexes its records as new ones;
3. copy     copies every live record byte for byte, each checked against its CRC on
            the way, into the new segment, and fsyncs it (rate-limited: `compact_rate`);
4. rewrite  writes new Parquet files for every sealed file holding rows of the
            replaced segments (catalog.relocate), under the sealer's merge lock;
5. commit   one manifest swap: new files in, old files retired, versions table
            remapped, the new segment sealed to its real end, the replaced segments
            retired (`retired_segments`);
6.          removes the journal. Retired segments are unlinked `compact_grace` seconds
            later (readers that looked a record up before the swap may still read it).

A `kill -9` before 5 leaves the old segments and rows as they were: the next
compaction (or `rebuild-catalog`) reads the journal and removes what the dead one wrote
(`settle`). After 5 the compaction has happened. Tombstones name (SOP Instance UID,
received_at), which a copy keeps, so a record deleted during a compaction stays hidden.

Only one compactor runs per data directory: it holds slot 999's claim (engine.store.slots),
whose segments are compaction outputs only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stowage.engine.lifecycle import tombstone_pruning
from stowage.catalog import cluster_view, manifest, relocate, tombstones
from stowage.catalog.durable import fsync_dir, replace_durably
from stowage.catalog.reader import Catalog
from stowage.engine.runtime.config import Config
from stowage.engine.store.integrity import marks_of
from stowage.engine.store.segment import MAGIC, PREFIX_SIZE, crc32, open_segment, segment_name
from stowage.engine.store.slots import Slot, try_claim

log = logging.getLogger("stowage.compaction")

COMPACT_SLOT = 999
RESERVED = 1 << 62           # watermark of a compaction output not yet committed
JOURNAL = f"{COMPACT_SLOT:03d}.compaction"
_SEGMENT = re.compile(r"^(\d{3})-(\d{8})\.seg$")
_PREFIX = struct.Struct("<4sHHIQ")
_CHUNK = 1 << 20
_MAX_VICTIMS = 64
_SYNC_EVERY = 4 << 20


class CompactionBusy(RuntimeError):
    """Another compactor holds the compaction slot."""


@dataclass
class Candidate:
    segment: str
    size: int
    live_bytes: int
    live_records: int

    @property
    def ratio(self) -> float:
        return self.live_bytes / self.size if self.size else 1.0


@dataclass
class Report:
    candidates: list[Candidate] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)    # segments replaced
    written: list[str] = field(default_factory=list)      # new segments
    bytes_before: int = 0     # size of the replaced segments
    bytes_copied: int = 0     # live bytes copied into new segments
    records_copied: int = 0
    purged: int = 0           # retired segments unlinked
    pruned: int = 0           # tombstones that hid nothing any more, pruned
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    short_of_space: str = ""  # why the rounds stopped early, when the disk had no room for the next

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_copied

    @property
    def mb_per_s(self) -> float:
        """Segment bytes processed (read and judged) per second."""
        return self.bytes_before / 1e6 / self.seconds if self.seconds else 0.0


# -- which segments ------------------------------------------------------------------

def _segments(directory: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (slot, sequence, size) of every segment file."""
    out = {}
    with os.scandir(directory) as it:
        for e in it:
            m = _SEGMENT.match(e.name)
            if m:
                out[e.name] = (int(m[1]), int(m[2]), e.stat().st_size)
    return out


def _sealed_inactive(directory: Path, m: manifest.Manifest) -> dict[str, int]:
    """name -> size of the segments compaction may replace: not the last of a writer's
    slot (it may be appended to; and keeping it keeps `next_sequence` from ever reusing
    a name), catalogued to their end, not retired, not empty."""
    found = _segments(directory)
    last: dict[int, int] = {}
    for slot, seq, _size in found.values():
        last[slot] = max(last.get(slot, 0), seq)
    out = {name: size for name, (slot, seq, size) in found.items()
           if (slot == COMPACT_SLOT or seq < last[slot]) and name not in m.retired_segments
           and size > 0 and RESERVED > m.sealed_upto(name) >= size}
    # Sealed segments whose local copy was evicted after their upload (engine.storage):
    # read from the bucket by the copy.
    out.update({name: int(e["size"]) for name, e in m.uploaded.items()
                if name not in found and not e.get("gone") and name not in m.retired_segments})
    return out


def _not_catalogued(catalog: Catalog, sealed: dict[str, int]) -> dict[str, int]:
    """segment -> bytes of it that no catalog row covers, for the segments whose rows (live,
    deleted or superseded) do not tile the file. A record without a row is neither live nor
    dead to compaction, which copies live rows only: rewriting its segment would destroy an
    intact instance that a damaged or lost catalog file no longer names."""
    _cols, rows = catalog.execute(
        "SELECT segment, sum(record_length) FROM (SELECT DISTINCT segment, \"offset\", record_length FROM records "
        "WHERE segment IN (SELECT unnest(?))) GROUP BY segment", [sorted(sealed)])
    covered = {seg: int(n or 0) for seg, n in rows}
    return {seg: size - covered.get(seg, 0) for seg, size in sealed.items() if covered.get(seg, 0) < size}


def uncatalogued(data_dir: Path, catalog: Catalog) -> list[str]:
    """The segments holding records the catalog lacks: sealed ones its rows do not tile,
    and any whose rows leave a hole between two records."""
    sealed = _sealed_inactive(data_dir / "segments", manifest.load(data_dir / "catalog"))
    gaps = set(_not_catalogued(catalog, sealed)) if sealed else set()
    _cols, rows = catalog.execute(
        "SELECT segment, sum(record_length), max(\"offset\" + record_length) FROM (SELECT DISTINCT segment, "
        "\"offset\", record_length FROM records) GROUP BY segment")
    return sorted(gaps | {seg for seg, total, end in rows if int(total or 0) < int(end or 0)})


def candidates(config: Config, catalog: Catalog, ratio: float | None = None,
               skipped: list[str] | None = None) -> list[Candidate]:
    """Segments whose live fraction is below `ratio`, sparsest first. Segments holding
    records the catalog lacks are left as they are, each said in `skipped`."""
    ratio = config.compact_live_ratio if ratio is None else ratio
    catalog_dir = config.data_dir / "catalog"
    sealed = _sealed_inactive(config.data_dir / "segments", manifest.load(catalog_dir))
    # A segment holding a record marked corrupt stays as it is: a mark names (segment,
    # offset), so a moved record would lose its mark and be served again, and the damaged
    # bytes stay where an administrator can look at them or restore them.
    marks = marks_of(config.data_dir)
    sealed = {name: size for name, size in sealed.items() if not marks.in_segment(name)}
    if not sealed:
        return []
    for seg, missing in sorted(_not_catalogued(catalog, sealed).items()):
        why = (f"{seg}: {missing} byte(s) of records are not in the catalog, so it is not rewritten (stowage "
               "verify names them; stowage rebuild-catalog, archive stopped, indexes them again)")
        log.error("compaction: %s", why)
        if skipped is not None:
            skipped.append(why)
        del sealed[seg]
    if not sealed:
        return []
    _cols, rows = catalog.execute(
        "SELECT segment, count(*), sum(record_length) FROM instances WHERE segment IN (SELECT unnest(?)) "
        "GROUP BY segment", [sorted(sealed)])
    live = {seg: (int(n), int(b or 0)) for seg, n, b in rows}
    out = [Candidate(seg, size, live.get(seg, (0, 0))[1], live.get(seg, (0, 0))[0]) for seg, size in sealed.items()]
    return sorted((c for c in out if c.ratio < ratio), key=lambda c: (c.ratio, c.segment))


def _rounds(found: list[Candidate], segment_size: int) -> list[list[Candidate]]:
    """Group candidates so that each round writes at most about one segment."""
    rounds: list[list[Candidate]] = []
    current: list[Candidate] = []
    live = 0
    for c in found:
        if current and (live + c.live_bytes > segment_size or len(current) >= _MAX_VICTIMS):
            rounds.append(current)
            current, live = [], 0
        current.append(c)
        live += c.live_bytes
    if current:
        rounds.append(current)
    return rounds


def _next_name(directory: Path, m: manifest.Manifest) -> str:
    """A compaction segment name never used before in this data directory (the
    manifest keeps the watermarks of replaced segments)."""
    prefix = f"{COMPACT_SLOT:03d}-"
    names = [*m.watermarks, *m.retired_segments, *m.uploaded,  # uploaded: its local copy may be evicted
             *(p.name for p in directory.glob(f"{prefix}*.seg"))]
    seqs = [int(n[4:12]) for n in names if n.startswith(prefix) and n[4:12].isdigit()]
    return segment_name(COMPACT_SLOT, max(seqs, default=0) + 1)


# -- the journal -----------------------------------------------------------------------

def _write_journal(segments_dir: Path, entry: dict) -> None:
    replace_durably(segments_dir / JOURNAL, json.dumps(entry))


def _drop_journal(segments_dir: Path) -> None:
    (segments_dir / JOURNAL).unlink(missing_ok=True)
    fsync_dir(segments_dir)


def settle(data_dir: Path) -> str:
    """Finish what a killed compactor left (call holding the compaction slot): undo an
    uncommitted round, forget a committed one. Returns what it did ("" if nothing)."""
    segments_dir, catalog_dir = data_dir / "segments", data_dir / "catalog"
    try:
        entry = json.loads((segments_dir / JOURNAL).read_text())
    except FileNotFoundError:
        return ""
    except ValueError:  # torn before its rename: the round never started
        _drop_journal(segments_dir)
        return ""
    m = manifest.load(catalog_dir)
    victims, new = entry["replaced"], entry["segment"]
    committed = all(v in m.retired_segments or (not (segments_dir / v).exists() and (
        v not in m.uploaded or m.uploaded[v].get("gone"))) for v in victims)  # evicted is not gone
    if committed:
        _drop_journal(segments_dir)
        return "committed"
    if new and 0 < m.sealed_upto(new) < RESERVED:
        # Indexed by a catalog rebuilt without the manifest that reserved it (catalog/
        # deleted, then `serve` or `rebuild-catalog`): its rows may be the very ones served,
        # and removing it would lose those instances once the replaced segments go too. Its
        # records are intact copies; the old ones are dead twins the next rounds drop.
        _drop_journal(segments_dir)
        log.warning("an interrupted compaction's output %s is in the catalog (rebuilt since): kept", new)
        return "kept"
    for p in relocate.orphans(catalog_dir, entry["prefix"], m):
        p.unlink(missing_ok=True)
    if new:
        (segments_dir / new).unlink(missing_ok=True)
    _drop_journal(segments_dir)
    log.warning("an interrupted compaction was rolled back (%s, replacing %d segment(s))", new or "no output",
                len(victims))
    return "rolled back"


def purge(data_dir: Path, grace: float, now: float | None = None) -> int:
    """Unlink the retired segments whose grace has passed; returns how many."""
    catalog_dir = data_dir / "catalog"
    now = time.time() if now is None else now
    if not any(now - at >= grace for at in manifest.load(catalog_dir).retired_segments.values()):
        return 0
    done = 0
    with manifest.update(catalog_dir) as m:
        for name, at in list(m.retired_segments.items()):
            if now - at >= grace:
                (data_dir / "segments" / name).unlink(missing_ok=True)
                del m.retired_segments[name]
                if name in m.uploaded:  # the uploader deletes its object (engine.storage.uploader)
                    m.uploaded[name]["gone"] = True
                done += 1
    fsync_dir(data_dir / "segments")
    return done


# -- copying ---------------------------------------------------------------------------

class CompactionStopped(RuntimeError):
    """The server is stopping: the round in progress was rolled back."""


class _Throttle:
    """Keeps the average copy rate at or below `rate` MB/s (0: unlimited), and stops the
    copy when `stop` is set."""

    def __init__(self, rate: float, stop: threading.Event | None = None) -> None:
        self.rate = rate
        self.stop = stop or threading.Event()
        self.start = time.monotonic()
        self.done = 0

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self.rate > 0:
            ahead = self.done / (self.rate * 1e6) - (time.monotonic() - self.start)
            if ahead > 0 and self.stop.wait(ahead):
                raise CompactionStopped("stopping")
        if self.stop.is_set():
            raise CompactionStopped("stopping")


class CorruptLiveRecord(RuntimeError):
    """A live record failed its checksum: its segment is left as it is."""


def _copy_record(src: Callable[[int, int], bytes], dst: int, offset: int, length: int, segment: str,
                 throttle: _Throttle) -> None:
    """Copy one record (read with `src`, a pread), checking its framing and CRC-32 as it goes."""
    head = src(min(length, _CHUNK), offset)
    if len(head) < PREFIX_SIZE:
        raise CorruptLiveRecord(f"{segment}: record at byte {offset} ends early")
    magic, _version, _flags, hlen, plen = _PREFIX.unpack_from(head)
    (expected,) = struct.unpack_from("<I", head, _PREFIX.size)
    if magic != MAGIC or PREFIX_SIZE + hlen + plen != length:
        raise CorruptLiveRecord(f"{segment}: no record of {length} bytes at byte {offset}")
    running = crc32(head[PREFIX_SIZE:], crc32(head[:_PREFIX.size]))
    _write_all(dst, head)
    throttle(len(head))
    done = len(head)
    while done < length:
        chunk = src(min(length - done, _CHUNK), offset + done)
        if not chunk:
            raise CorruptLiveRecord(f"{segment}: record at byte {offset} ends early")
        running = crc32(chunk, running)
        _write_all(dst, chunk)
        throttle(len(chunk))
        done += len(chunk)
    if running != expected:
        raise CorruptLiveRecord(f"{segment}: checksum mismatch in the live record at byte {offset}")


def _pread(f) -> Callable[[int, int], bytes]:
    """pread on a segment opened by open_segment: the local file's, or the remote copy's."""
    remote = getattr(f, "pread", None)
    return remote if remote is not None else (lambda n, at: os.pread(f.fileno(), n, at))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- a round ---------------------------------------------------------------------------

def _live_rows(catalog: Catalog, victims: list[str]) -> list[tuple[str, int, int]]:
    _cols, rows = catalog.execute(
        "SELECT DISTINCT segment, \"offset\", record_length FROM instances WHERE segment IN (SELECT unnest(?)) "
        "ORDER BY segment, \"offset\"", [victims])  # DISTINCT: a record catalogued twice is copied once
    return [(s, int(o), int(n)) for s, o, n in rows]


def _round(config: Config, catalog: Catalog, victims: list[Candidate], throttle: _Throttle, report: Report) -> None:
    data_dir = config.data_dir
    segments_dir, catalog_dir = data_dir / "segments", data_dir / "catalog"
    names = [c.segment for c in victims]
    live = _live_rows(catalog, names)
    m = manifest.load(catalog_dir)
    new = _next_name(segments_dir, m) if live else ""
    prefix = f"compact-{new[:-4] if new else time.time_ns()}-"
    _write_journal(segments_dir, {"segment": new, "replaced": names, "prefix": prefix})
    moves: relocate.Moves = {}
    size = 0
    try:
        if new:
            with manifest.update(catalog_dir) as m:
                m.watermarks[new] = RESERVED
            size = _copy(segments_dir, new, live, moves, throttle)
        with manifest.lock(catalog_dir, "compact.lock"):  # no Parquet merge meanwhile
            files = relocate.holding(catalog_dir, sorted(manifest.load(catalog_dir).files), names)
            rewritten = relocate.rewrite(catalog_dir, files, names, new, moves, prefix)
            relocate.commit(catalog_dir, rewritten, names, new, size, moves, prefix,
                            journal=bool(config.storage))
    except BaseException:
        settle(data_dir)  # undo what this round wrote; the old segments serve on
        raise
    _drop_journal(segments_dir)
    report.rewritten += names
    report.written += [new] if new else []
    report.bytes_before += sum(c.size for c in victims)
    report.bytes_copied += size
    report.records_copied += len(moves)
    log.info("compacted %d segment(s) (%.1f MB) into %s: %d live record(s), %.1f MB reclaimed", len(names),
             sum(c.size for c in victims) / 1e6, new or "nothing", len(moves),
             (sum(c.size for c in victims) - size) / 1e6)


def _copy(segments_dir: Path, new: str, live: list[tuple[str, int, int]], moves: relocate.Moves,
          throttle: _Throttle) -> int:
    """Copy the live records into segment `new` (created here), fsync'd; fills `moves`."""
    dst = os.open(segments_dir / new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fsync_dir(segments_dir)
        at = synced = 0
        src, src_name = None, ""
        try:
            for seg, offset, length in live:
                if seg != src_name:
                    if src is not None:
                        src.close()
                    src, src_name = open_segment(segments_dir / seg, buffering=0), seg  # or its uploaded copy
                _copy_record(_pread(src), dst, offset, length, seg, throttle)
                moves[(seg, offset)] = at
                at += length
                if at - synced >= _SYNC_EVERY:  # small flushes, spread out: the workers' fsyncs
                    os.fdatasync(dst)           # never queue behind a whole segment's worth
                    synced = at
        finally:
            if src is not None:
                src.close()
        os.fsync(dst)
    finally:
        os.close(dst)
    return at


def _no_room(config: Config, victims: list[Candidate], left: list[list[Candidate]], grace: float) -> str:
    """Why the disk has no room for this round, or "": its new segment (the live bytes) and
    the catalog files it rewrites (counted at 1 KB a record, generously) must fit above
    `min_free_bytes`, the stores' reserve. Without the check, each round on a nearly full
    disk wrote a new segment while the ones it replaced waited out `compact_grace`: the
    disk ended fuller than before, and stores were refused."""
    if config.min_free_bytes < 0:  # the free-space checks are off
        return ""
    need = sum(c.live_bytes + 1024 * c.live_records for c in victims)
    free = shutil.disk_usage(config.data_dir / "segments").free
    if free - need >= config.min_free_bytes:
        return ""
    retired = manifest.load(config.data_dir / "catalog").retired_segments
    held = sum(_size(config.data_dir / "segments" / n) for n in retired)
    later = (f"; the {len(retired)} segment(s) already replaced ({held / 1e6:.1f} MB) are removed "
             f"{grace:g} s after their round (compact_grace): run `stowage compact --grace 0` to remove them "
             "now, then again for the rest") if retired else "; free some space and run it again"
    return (f"{sum(len(r) for r in left)} segment(s) not rewritten: the next round needs {need / 1e6:.1f} MB "
            f"free above min_free_bytes ({config.min_free_bytes / 1e6:.1f} MB), and {free / 1e6:.1f} MB are "
            f"free{later}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -- the entry points ------------------------------------------------------------------

def _may_hold_dead(data_dir: Path) -> bool:
    """Whether any record can be dead: only a duplicate (the versions table) or a
    tombstone makes one. Without either, a pass needs no catalog query at all."""
    return bool(manifest.load(data_dir / "catalog").duplicates) or tombstones.stamp(data_dir) is not None \
        or bool(cluster_view.load(cluster_view.directory(data_dir)).deletions)


def claim(data_dir: Path) -> Slot | None:
    """The compaction slot's claim, or None when another compactor holds it."""
    (data_dir / "segments").mkdir(parents=True, exist_ok=True)
    return try_claim(data_dir, COMPACT_SLOT)


def compact(config: Config, rate: float | None = None, dry_run: bool = False, ratio: float | None = None,
            grace: float | None = None, limit: int = 0, stop: threading.Event | None = None) -> Report:
    """One compaction pass: settle, purge expired retired segments, rewrite candidates.
    Raises CompactionBusy if another compactor runs, CompactionStopped (after rolling the
    round back) once `stop` is set. `limit`: at most this many rounds."""
    started = time.monotonic()
    data_dir = config.data_dir
    grace = config.compact_grace if grace is None else grace
    slot = None if dry_run else claim(data_dir)
    if slot is None and not dry_run:
        raise CompactionBusy(f"another compaction is running on {data_dir}")
    report = Report()
    # the view's deletions too: this node's records another node deleted are dead here as well
    catalog = Catalog(data_dir / "catalog", config.duplicates, view_deletions=True) if _may_hold_dead(data_dir) \
        else None
    try:
        if not dry_run:
            settle(data_dir)
            report.purged += purge(data_dir, grace)
        report.candidates = candidates(config, catalog, ratio, report.errors) if catalog is not None else []
        if dry_run:
            return report
        throttle = _Throttle(config.compact_rate if rate is None else rate, stop)
        rounds = _rounds(report.candidates, config.segment_size)
        for i, victims in enumerate(rounds):
            if (limit and i >= limit) or throttle.stop.is_set():
                break
            if i:
                report.purged += purge(data_dir, grace)  # with grace 0, what the last round replaced
            report.short_of_space = _no_room(config, victims, rounds[i:], grace)
            if report.short_of_space:
                log.warning("compaction stopped: %s", report.short_of_space)
                break
            try:
                _round(config, catalog, victims, throttle, report)
            except (CorruptLiveRecord, relocate.RelocationError) as e:
                log.error("compaction round skipped: %s", e)
                report.errors.append(str(e))
        if report.rewritten:
            report.purged += purge(data_dir, grace)
        if catalog is not None:
            report.pruned = tombstone_pruning.prune(data_dir, catalog, lambda: uncatalogued(data_dir, catalog))
    finally:
        if catalog is not None:
            catalog.close()
        if slot is not None:
            slot.release()
        report.seconds = time.monotonic() - started
    return report


def prepare_rebuild(data_dir: Path) -> None:
    """Before `rebuild-catalog` indexes every segment: undo an interrupted compaction
    (its output would be indexed twice) and unlink retired segments now (their live
    records have copies). The archive is stopped, so no reader needs them."""
    # also without catalog/ (deleted to be rebuilt): an interrupted round's output would
    # else be indexed, then removed by the next compaction's settle with the rows pointing at it
    slot = claim(data_dir)
    if slot is None:
        raise CompactionBusy(f"a compaction is running on {data_dir}; stop it first")
    try:
        settle(data_dir)
        purge(data_dir, 0.0)
    finally:
        slot.release()
