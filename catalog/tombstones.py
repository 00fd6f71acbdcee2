"""Tombstones: which stored records are deleted (by `stowage delete`, by a rejection note,
by the quota), as an append-only log beside the catalog.

A tombstone hides one stored record, named by `(sop_instance_uid, received_at)`:
received_at (microseconds, UTC) is in the segment record's header, so it survives a
catalog rebuild and a compaction that moves the record to another segment; a copy of
the instance sent again after the deletion has a new received_at and is visible again.

The log lives in `<data-dir>/tombstones/` (not under catalog/, which `rebuild-catalog`
throws away): `tombstones.log`, one line per batch of entries,

    <crc32 of the JSON, 8 hex digits> <JSON list of entries>\\n

each entry `{"uid", "received_at" (µs, or null), "study", "reason", "at" (µs), "actor",
"comment"}` with reason `deleted`, `rejected:<code>` (a CID 7011 code) or `quota`, and the
administrator's words in comment (`stowage delete --reason`). A batch is
written with one write() under an flock and fsync'd before `append` returns. A line
torn by a crash (no newline, or a checksum that does not match) is skipped by readers
and kept in the file; the next append starts on a new line. An entry whose received_at
is null hides nothing: it records that a rejection note named an instance the archive
did not hold (see `rejected_uids`).

Readers: `load()` for a table, `TombstoneReader` to follow the log incrementally (each
byte parsed once), `stamp()` to learn in one stat() whether anything was added.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from stowage.catalog.durable import file_stamp, fsync_dir, replace_durably

log = logging.getLogger("stowage.tombstones")

DIRECTORY = "tombstones"
LOG = "tombstones.log"
_LOCK = "tombstones.lock"
_BATCH = 10_000  # entries per line: a line is all-or-nothing after a crash
SCHEMA = pa.schema([("sop_instance_uid", pa.string()), ("received_at", pa.timestamp("us", tz="UTC")),
                    ("study_instance_uid", pa.string()), ("reason", pa.string()),
                    ("at", pa.timestamp("us", tz="UTC")), ("actor", pa.string()), ("comment", pa.string())])
_EMPTY = SCHEMA.empty_table()  # made once (pyarrow takes tens of µs per column), shared: tables are immutable


@dataclass(frozen=True)
class Tombstone:
    """One record hidden: (sop_instance_uid, received_at in µs since the epoch)."""

    sop_instance_uid: str
    received_at: int | None        # None: rejected before it was received (hides nothing)
    reason: str = "deleted"
    study_instance_uid: str = ""
    at: int = 0                     # µs since the epoch; 0: now
    actor: str = ""
    comment: str = ""               # why, in the administrator's words


def directory(data_dir: Path) -> Path:
    return Path(data_dir) / DIRECTORY


def stamp(data_dir: Path) -> tuple | None:
    """A value that changes whenever an entry is added (None: no tombstones yet)."""
    return stamp_of(directory(data_dir))


def stamp_of(tombstones_dir: Path) -> tuple | None:
    return file_stamp(tombstones_dir / LOG)


def _line(entries: list[Tombstone], now: int) -> bytes:
    body = json.dumps([{"uid": e.sop_instance_uid, "received_at": e.received_at, "study": e.study_instance_uid,
                        "reason": e.reason, "at": e.at or now, "actor": e.actor,
                        **({"comment": e.comment} if e.comment else {})} for e in entries],
                      separators=(",", ":")).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def append(data_dir: Path, entries: Iterable[Tombstone]) -> int:
    """Add `entries` to the log, durably (fsync'd before this returns); returns how many.
    Safe from several processes at once. Raises OSError (e.g. ENOSPC): then none of the
    entries of the failed line count (readers skip a torn line)."""
    entries = list(entries)
    if not entries:
        return 0
    d = directory(data_dir)
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
        fsync_dir(d.parent)
    now = time.time_ns() // 1000
    with open(d / _LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        created = not (d / LOG).exists()
        fd = os.open(d / LOG, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash: start afresh
                _write_all(fd, b"\n")
            for i in range(0, len(entries), _BATCH):
                _write_all(fd, _line(entries[i:i + _BATCH], now))
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(d)
    return len(entries)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _parse(line: bytes) -> list[dict] | None:
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        entries = json.loads(body)
    except ValueError:
        return None
    return entries if isinstance(entries, list) else None


def _table(entries: list[dict]) -> pa.Table:
    return pa.table({
        "sop_instance_uid": pa.array([e.get("uid") for e in entries], pa.string()),
        "received_at": pa.array([e.get("received_at") for e in entries], pa.int64()).cast(SCHEMA.field(1).type),
        "study_instance_uid": pa.array([e.get("study") or None for e in entries], pa.string()),
        "reason": pa.array([e.get("reason") for e in entries], pa.string()),
        "at": pa.array([e.get("at") for e in entries], pa.int64()).cast(SCHEMA.field(4).type),
        "actor": pa.array([e.get("actor") for e in entries], pa.string()),
        "comment": pa.array([e.get("comment") for e in entries], pa.string()),
    }, schema=SCHEMA)


class TombstoneReader:
    """Follows the log of one tombstones directory; `read()` returns every entry so far
    (SCHEMA), parsing only the bytes added since the last call; after it, `fresh` holds
    the entries that call added and `generation` changes when the log was read afresh
    (replaced by a rewrite). With keep=False, read() returns nothing and only `fresh`
    counts: for a caller that keeps the entries elsewhere (one copy in memory). Thread-safe."""

    def __init__(self, tombstones_dir: Path, keep: bool = True) -> None:
        self.path = Path(tombstones_dir) / LOG
        self._keep = keep
        self._lock = threading.Lock()
        self._ino: int | None = None
        self._offset = 0
        self._chunks: list[pa.Table] = []
        self._table = SCHEMA.empty_table()
        self.fresh = self._table
        self.generation = 0
        self.skipped = 0  # torn or damaged lines seen

    def read(self) -> pa.Table:
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                if self._ino is not None:
                    self.generation += 1
                self._ino, self._offset, self._table = None, 0, SCHEMA.empty_table()
                self.fresh = self._table
                return self._table
            self.fresh = _EMPTY
            try:
                st = os.fstat(fd)
                if st.st_ino != self._ino or st.st_size < self._offset:  # replaced: read it all again
                    self._ino, self._offset, self._table = st.st_ino, 0, SCHEMA.empty_table()
                    self.generation += 1
                if st.st_size == self._offset:
                    return self._table
                data = os.pread(fd, st.st_size - self._offset, self._offset)
            finally:
                os.close(fd)
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
            chunks: list[pa.Table] = []  # one table per line: the parsed dicts of one line at a time
            for line in data[:end].split(b"\n")[:-1]:
                if not line:
                    continue
                parsed = _parse(line)
                if parsed is None:
                    self.skipped += 1
                    log.warning("%s: a torn or damaged line (%d bytes) skipped", self.path, len(line))
                    continue
                chunks.append(_table(parsed))
            del data
            self._offset += end
            if chunks:
                self.fresh = pa.concat_tables(chunks).combine_chunks()
                if self._keep:
                    self._table = pa.concat_tables([self._table, self.fresh])
            return self._table


def read_from(tombstones_dir: Path, ino: int | None, offset: int) -> tuple[pa.Table, int | None, int]:
    """The entries (unheld ones too) after byte `offset` of the log whose inode is `ino`,
    and the (inode, offset) to go on from: whole lines only. A log replaced since
    (`prune`: another inode) is read from its start."""
    path = Path(tombstones_dir) / LOG
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _EMPTY, None, 0
    try:
        st = os.fstat(fd)
        if st.st_ino != ino or st.st_size < offset:
            offset = 0
        data = os.pread(fd, st.st_size - offset, offset)
    finally:
        os.close(fd)
    end = data.rfind(b"\n") + 1
    chunks = [_table(parsed) for line in data[:end].split(b"\n")[:-1] if line
              for parsed in [_parse(line)] if parsed is not None]
    return (pa.concat_tables(chunks) if chunks else _EMPTY), st.st_ino, offset + end


@dataclass(frozen=True)
class DamagedLine:
    """A line of the log that fails its checksum: its deletions are not in force."""

    offset: int             # byte offset of the line in the log
    length: int
    uids: tuple[str, ...]   # the SOP Instance UIDs still legible in it (maybe not all)


_LEGIBLE_UID = re.compile(rb'"uid":\s*"([0-9.]{1,64})"')


def damaged_lines(data_dir: Path) -> list[DamagedLine]:
    """Every whole line of the log that fails its checksum (a torn last line without its
    newline is a write still going on, or a crash's: not counted), with the UIDs still
    legible in it, so that an administrator can delete those instances again."""
    try:
        data = (directory(data_dir) / LOG).read_bytes()
    except FileNotFoundError:
        return []
    found, at = [], 0
    for line in data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]:
        if line and _parse(line) is None:
            uids = tuple(dict.fromkeys(m.decode() for m in _LEGIBLE_UID.findall(line)))
            found.append(DamagedLine(at, len(line), uids))
        at += len(line) + 1
    return found


def load(data_dir: Path, with_unheld: bool = False) -> pa.Table:
    """Every tombstone that hides a record: a table of SCHEMA (sop_instance_uid,
    received_at, study_instance_uid, reason, at, actor, comment). `with_unheld` also returns the
    entries with a null received_at (rejected before received)."""
    t = TombstoneReader(directory(data_dir)).read()
    return t if with_unheld else hiding(t)


def hiding(table: pa.Table) -> pa.Table:
    """The entries of `table` that hide a record (received_at not null)."""
    if table.num_rows == 0 or table["received_at"].null_count == 0:
        return table
    return table.filter(pc.is_valid(table["received_at"]))


def rejected_uids(table: pa.Table) -> frozenset[str]:
    """SOP Instance UIDs that a rejection note rejected (held then or not)."""
    if table.num_rows == 0:
        return frozenset()
    mask = pc.starts_with(table["reason"], "rejected:")
    return frozenset(table.filter(mask)["sop_instance_uid"].to_pylist())


PUBLISHED = "published"  # "<inode> <offset>": how far the log is in the Iceberg deletions table


def mark_published(data_dir: Path, ino: int | None, offset: int) -> None:
    """Record (engine/iceberg's publisher) that the log whose inode is `ino` is published up
    to byte `offset`: `prune` keeps every entry after it, so that no deletion is pruned
    before the other nodes can learn of it."""
    d = directory(data_dir)
    text = f"{ino or 0} {offset}"
    try:
        if (d / PUBLISHED).read_text() == text:
            return
    except FileNotFoundError:
        d.mkdir(parents=True, exist_ok=True)
    replace_durably(d / PUBLISHED, text)


def _published_upto(d: Path, ino: int, size: int) -> int:
    """The byte offset of the log (inode `ino`, `size` bytes) before which entries may be
    pruned: all of it without Iceberg publication (no marker), none of it when the marker
    names another inode (the log was rewritten since the publisher last looked)."""
    try:
        marked_ino, offset = (int(v) for v in (d / PUBLISHED).read_text().split())
    except (FileNotFoundError, ValueError):
        return size
    return offset if marked_ino == ino else 0


def prune(data_dir: Path, gone: set[tuple[str, int]]) -> int:
    """Rewrite the log without the entries that hide a record in `gone` ((uid, received_at
    µs) pairs no segment or catalog row holds any more: engine/lifecycle/tombstone_pruning.py
    decides); returns how many entries went. An entry of a rejection note is kept as one
    that hides nothing (received_at null), so the UID stays rejected (`rejected_uids`).
    Entries the Iceberg publisher has not published yet are kept (`mark_published`).
    Under the appenders' lock, written whole to a new file, fsync'd and renamed over the log:
    a crash leaves the old log or the new one; readers see a new inode and read it afresh."""
    d = directory(data_dir)
    if not gone or not (d / LOG).exists():
        return 0
    with open(d / _LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(d / LOG, "rb") as f:
            data = f.read()
            upto = _published_upto(d, os.fstat(f.fileno()).st_ino, len(data))
        kept: list[dict] = []
        removed = 0
        at = 0
        for line in data.split(b"\n"):
            start, at = at, at + len(line) + 1
            for entry in (_parse(line) or []) if line else []:
                if (entry.get("uid"), entry.get("received_at")) not in gone or start >= upto:
                    kept.append(entry)
                    continue
                removed += 1
                if str(entry.get("reason", "")).startswith("rejected:"):
                    kept.append({**entry, "received_at": None})
        if not removed:
            return 0
        tmp = d / (LOG + ".pruned")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(0, len(kept), _BATCH):
                body = json.dumps(kept[i:i + _BATCH], separators=(",", ":")).encode()
                _write_all(fd, b"%08x " % zlib.crc32(body) + body + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, d / LOG)
        fsync_dir(d)
    return removed
