"""The segment writer: one active segment per worker, group commit.

Stores hand encoded records to `append` and block. Leader-based group commit: a store
that finds no commit running becomes the leader, takes everything queued, writes it with
one `writev`, fsyncs once, tells the catalog (`on_commit`) and only then releases every
store in the batch; while it runs, the next batch gathers, and the first of its stores
leads next. Concurrent associations share fsyncs without any added delay, and a lone
association commits on its own thread: no hand-off to a writer thread and back. A
waiting store sleeps on a lock of its own, released once by whoever decides its fate
(the leader that made it durable or refused it, or the one that hands it the lead): one
wake-up per waiting store, none for a lone one, where a condition variable woke every
waiter and made each take the condition's lock again (docs/benchmarks.md).

A bulk loader (import, migrate; serve too with `cache_writes = false`) passes
`keep_cache=False`: each batch's pages are dropped from the page cache once durable, as
PostgreSQL's bulk-write ring keeps a COPY from evicting everything else. Terabytes written once would otherwise push out what `serve`
reads, and every new page cache page costs the kernel an allocation now and a reclaim
later (on this project's VMs the writes then cost up to 6x the CPU: docs/import.md).
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stowage.catalog import manifest
from stowage.catalog.durable import fsync_dir
from stowage.engine.store.segment import FileRange, Part, next_sequence, part_length, segment_name

log = logging.getLogger("stowage.writer")
_IOV_MAX = 512
_PAGE = os.sysconf("SC_PAGE_SIZE")


# Commits may have to land elsewhere too before they are acknowledged: engine.storage
# installs, with durability = "object-store", a callable that PUTs each fsync'd batch to
# the bucket (segment name, fd, start, end); an OSError from it refuses the batch.
_replicate: Callable[[str, int, int, int], None] | None = None


def replicate_commits(fn: Callable[[str, int, int, int], None] | None) -> None:
    """Install (or, with None, remove) what every group commit calls after its fsync."""
    global _replicate
    _replicate = fn


class OutOfResources(OSError):
    """The record could not be made durable (disk full, I/O error); nothing was kept."""


@dataclass
class Appended:
    """Where a record landed, known once its batch is durable."""

    segment: str = ""
    offset: int = 0
    length: int = 0


@dataclass(slots=True)
class _Pending:
    """One store's record while it waits for its batch: slots, and nothing made before it
    is needed (its Appended comes with the commit), as every store makes one."""

    record: list[Part]
    row: dict[str, Any]
    length: int = 0  # of the record, all parts
    done: bool = False
    where: Appended | None = None
    error: BaseException | None = None
    gate: Any = None  # a held lock while the store waits: released when done, or handed the lead


class SegmentWriter:
    """Appends records to `<directory>/<slot>-<seq>.seg`, rolling past `segment_size`."""

    def __init__(self, directory: Path, slot: int, *, segment_size: int, fsync: bool,
                 on_commit: Callable[[list[dict[str, Any]]], None], keep_cache: bool = True) -> None:
        self.directory = directory
        self.slot = slot
        self.segment_size = segment_size
        self.fsync = fsync
        self.keep_cache = keep_cache
        self.on_commit = on_commit
        self._queue: list[_Pending] = []   # waiting for the running commit to end
        self._lock = threading.Lock()
        self._leading = False        # a store is committing a batch now
        self._closed = False
        self._fd = -1
        self._name = ""
        self._size = 0
        self._opened = 0.0           # time.monotonic() when the active segment was opened
        self._dropped = 0            # pages of the segment below this offset left the page cache
        self.batches = 0
        self.records = 0
        self._open_next()

    @property
    def active_segment(self) -> str:
        return self._name

    def append(self, record: bytes | list[Part], row: dict[str, Any]) -> Appended:
        """Queue a record (whole, or as parts) and wait until it is durable; raises
        OutOfResources if it is not."""
        parts = [record] if isinstance(record, bytes) else record
        item = _Pending(parts, row, sum(map(part_length, parts)))
        with self._lock:
            if self._closed:
                raise OutOfResources(errno.ESHUTDOWN, "the segment writer is shutting down")
            lead = not self._leading
            if lead:  # no commit running: commit ours (and anything queued) now
                self._leading = True
                batch, self._queue = self._queue, []
                batch.append(item)
            else:
                item.gate = threading.Lock()
                item.gate.acquire()
                self._queue.append(item)
        if not lead:
            item.gate.acquire()  # released once: our batch is done, or we lead the next one
            if item.done:
                return self._result(item)
            with self._lock:  # handed the lead: everything queued, ours first
                batch, self._queue = self._queue, []
        self._lead(batch)
        return self._result(item)

    @staticmethod
    def _result(item: _Pending) -> Appended:
        if item.error is not None:
            raise item.error
        return item.where

    def _lead(self, batch: list[_Pending]) -> None:
        """Commit `batch`, release its stores, and hand the lead to the first store queued
        meanwhile (or step down)."""
        try:
            self._commit(batch)
        except BaseException as e:  # a bug of ours: no store of the batch may wait forever
            log.exception("committing a batch of %d record(s) failed", len(batch))
            self._refuse([p for p in batch if not p.done], OutOfResources(errno.EIO, f"could not store: {e}"))
        finally:
            for p in batch:
                if p.gate is not None:
                    p.gate.release()
            self._hand_on()

    def _hand_on(self) -> None:
        """Give the lead to the first store queued meanwhile, or step down."""
        with self._lock:
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._leading = False
        if successor is not None:
            successor.gate.release()  # not done: it wakes as the next leader

    def roll_if_older(self, max_age: float) -> bool:
        """Seal the active segment and open the next, if it holds records and was opened
        more than `max_age` seconds ago; True if it did. It takes the lead as a commit does,
        so no batch is being written meanwhile, and hands it on the same way."""
        with self._lock:
            if self._closed or self._leading or self._size == 0 or time.monotonic() - self._opened < max_age:
                return False
            self._leading = True
        try:
            self._open_next()
        finally:
            self._hand_on()
        return True

    def close(self) -> None:
        """Refuse new records, let the running commit (and the ones it hands on) finish,
        then close the segment."""
        with self._lock:
            self._closed = True
        while True:  # rare (shutdown): a short poll, not a signal every commit would pay for
            with self._lock:
                if not self._leading:
                    break
            time.sleep(0.002)
        if self._fd >= 0:
            self._drop_cache(self._size)
            os.close(self._fd)
            self._fd = -1

    def _next_sequence(self) -> int:
        """One past the highest sequence of our slot on local disk, uploaded, or known to
        the manifest: a data directory found again in the bucket (engine/storage/restore.py)
        never reuses a name, and neither does one whose newest segment file was removed
        or lost. A reused name would inherit the old file's sealed watermark: recovery
        would skip the new records below it (acknowledged, lost at the next crash), and
        the old catalog rows would name the new file's records."""
        prefix = f"{self.slot:03d}-"
        m = manifest.load(self.directory.parent / "catalog")
        known = [int(n[4:12]) for n in (*m.uploaded, *m.watermarks, *m.retired_segments)
                 if n.startswith(prefix) and n[4:12].isdigit()]
        return max(next_sequence(self.directory, self.slot), max(known, default=0) + 1)

    def _open_next(self) -> None:
        """Open the next segment, then close the active one: a failed open (a full disk)
        leaves the active segment in use, not a closed descriptor."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = segment_name(self.slot, self._next_sequence())
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)  # one writer; read by wal.py
        if self._fd >= 0:
            self._drop_cache(self._size)
            os.close(self._fd)
        self._fd, self._name, self._size, self._dropped = fd, name, 0, 0
        self._opened = time.monotonic()
        fsync_dir(self.directory)

    def _commit(self, batch: list[_Pending]) -> None:
        start = self._size
        try:
            self._write_all([part for p in batch for part in p.record])
            if self.fsync:
                os.fdatasync(self._fd)
            if _replicate is not None:
                _replicate(self._name, self._fd, start, start + sum(p.length for p in batch))
        except OSError as e:
            self._fail(batch, start, e)
            return
        offset = start
        for p in batch:
            length = p.length
            p.where = Appended(self._name, offset, length)
            p.row.update(segment=self._name, offset=offset, record_length=length)
            offset += length
        try:
            self.on_commit([p.row for p in batch])
        except OSError as e:
            # Acknowledged means visible to every reader (read-your-writes): rows that could
            # not reach the catalog tail are refused, and their records cut from the segment.
            self._fail(batch, start, e)
            return
        self._size = offset
        self._drop_cache(offset // _PAGE * _PAGE)  # the last partial page is written again next
        self.batches += 1
        self.records += len(batch)
        for p in batch:
            p.done = True
        if self._size >= self.segment_size:
            self._open_next()

    def _drop_cache(self, end: int) -> None:
        """Drop the durable pages below `end` from the page cache (keep_cache off: bulk
        loaders, or serve with cache_writes = false; with fsync off they are still dirty,
        and the kernel would only start writing them)."""
        if self.keep_cache or not self.fsync or end <= self._dropped:
            return
        try:
            os.posix_fadvise(self._fd, self._dropped, end - self._dropped, os.POSIX_FADV_DONTNEED)
        except OSError as e:  # advice only: the data is durable either way
            log.debug("posix_fadvise on %s: %s", self._name, e)
        self._dropped = end

    def _write_all(self, parts: list[Part]) -> None:
        run: list[bytes] = []
        for part in parts:
            if not isinstance(part, FileRange):
                run.append(part)
                if len(run) == _IOV_MAX:
                    self._writev(run)
                    run = []
                continue
            self._writev(run)
            run = []
            self._copy(part)
        self._writev(run)

    def _writev(self, chunks: list[Part]) -> None:
        if not chunks:
            return
        written = os.writev(self._fd, chunks)
        if written != sum(map(len, chunks)):  # short write: finish it byte-wise
            rest = b"".join(chunks)[written:]
            while rest:
                rest = rest[os.write(self._fd, rest):]

    def _copy(self, part: FileRange) -> None:
        """Copy a spooled payload into the segment in the kernel, without reading it in."""
        with open(part.path, "rb") as src:
            offset, left = part.offset, part.length
            while left:
                sent = os.copy_file_range(src.fileno(), self._fd, left, offset)
                if sent == 0:
                    raise OSError(errno.EIO, f"{part.path} ended before its recorded length")
                offset += sent
                left -= sent

    def _fail(self, batch: list[_Pending], start: int, e: OSError) -> None:
        """Cut the segment back to its last good record and refuse the whole batch."""
        log.error("segment %s: %s; %d store(s) refused", self._name, e.strerror or e, len(batch))
        try:
            os.ftruncate(self._fd, start)
            os.lseek(self._fd, start, os.SEEK_SET)
            if e.errno != errno.ENOSPC:  # an I/O error leaves the file suspect: start another
                self._open_next()
        except OSError:
            log.exception("could not truncate segment %s after a failed write", self._name)
        self._refuse(batch, OutOfResources(e.errno or errno.EIO, f"could not store: {e.strerror or e}"))

    @staticmethod
    def _refuse(batch: list[_Pending], err: OutOfResources) -> None:
        for p in batch:
            p.error = err
            p.done = True
