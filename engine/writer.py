"""The segment writer: one active segment per worker, group commit.

Stores hand encoded records to `append` and block; one writer thread takes everything
queued, writes it with one `writev`, fsyncs once, tells the catalog (`on_commit`) and
only then releases every store in the batch. While an fsync runs, the next batch
gathers, so concurrent associations share fsyncs without any added delay.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.segment import fsync_dir, next_sequence, segment_name

log = logging.getLogger("stowage.writer")
_IOV_MAX = 512


class OutOfResources(OSError):
    """The record could not be made durable (disk full, I/O error); nothing was kept."""


@dataclass
class Appended:
    """Where a record landed, known once its batch is durable."""

    segment: str = ""
    offset: int = 0
    length: int = 0


@dataclass
class _Pending:
    record: bytes
    row: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    where: Appended = field(default_factory=Appended)
    error: BaseException | None = None


class SegmentWriter:
    """Appends records to `<directory>/<slot>-<seq>.seg`, rolling past `segment_size`."""

    def __init__(self, directory: Path, slot: int, *, segment_size: int, fsync: bool,
                 on_commit: Callable[[list[dict[str, Any]]], None]) -> None:
        self.directory = directory
        self.slot = slot
        self.segment_size = segment_size
        self.fsync = fsync
        self.on_commit = on_commit
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._closed = False
        self._fd = -1
        self._name = ""
        self._size = 0
        self.batches = 0
        self.records = 0
        self._open_next()
        self._thread = threading.Thread(target=self._run, name=f"segment-writer-{slot}", daemon=True)
        self._thread.start()

    @property
    def active_segment(self) -> str:
        return self._name

    def append(self, record: bytes, row: dict[str, Any]) -> Appended:
        """Queue a record and wait until it is durable; raises OutOfResources if it is not."""
        item = _Pending(record, row)
        with self._cond:
            if self._closed:
                raise OutOfResources(errno.ESHUTDOWN, "the segment writer is shutting down")
            self._queue.append(item)
            self._cond.notify()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.where

    def close(self) -> None:
        """Finish queued records, then close the active segment."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open_next(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._name = segment_name(self.slot, next_sequence(self.directory, self.slot))
        path = self.directory / self._name
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._size = 0
        fsync_dir(self.directory)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                if not batch and self._closed:
                    return
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        start = self._size
        try:
            self._write_all([p.record for p in batch])
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError as e:
            self._fail(batch, start, e)
            return
        offset = start
        for p in batch:
            p.where = Appended(self._name, offset, len(p.record))
            p.row.update(segment=self._name, offset=offset, record_length=len(p.record))
            offset += len(p.record)
        self._size = offset
        try:
            self.on_commit([p.row for p in batch])
        except Exception:  # the records are durable; recovery rebuilds what the catalog missed
            log.exception("catalog tail update failed; rows will be recovered from the segment")
        self.batches += 1
        self.records += len(batch)
        for p in batch:
            p.done.set()
        if self._size >= self.segment_size:
            self._open_next()

    def _write_all(self, chunks: list[bytes]) -> None:
        for i in range(0, len(chunks), _IOV_MAX):
            part = chunks[i:i + _IOV_MAX]
            total = sum(len(c) for c in part)
            written = os.writev(self._fd, part)
            if written != total:  # short write: finish it byte-wise
                rest = b"".join(part)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]

    def _fail(self, batch: list[_Pending], start: int, e: OSError) -> None:
        """Cut the segment back to its last good record and refuse the whole batch."""
        log.error("segment %s: %s; %d store(s) refused", self._name, e.strerror or e, len(batch))
        try:
            os.ftruncate(self._fd, start)
            if e.errno != errno.ENOSPC:  # an I/O error leaves the file suspect: start another
                self._open_next()
        except OSError:
            log.exception("could not truncate segment %s after a failed write", self._name)
        err = OutOfResources(e.errno or errno.EIO, f"could not store: {e.strerror or e}")
        for p in batch:
            p.error = err
            p.done.set()
