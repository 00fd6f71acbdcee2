"""Received datasets that spill to disk past a threshold, so that a worker's memory does
not grow with instance size (DESIGN.md, invariant 7).

pynetdicom collects each DIMSE message's dataset in a BytesIO. We put `SpillBuffer` (a
BytesIO) in its place (protocol/pynetdicom_patches/, `install(dataset_buffer=...)`): small datasets stay in memory exactly as before; past
`threshold` bytes the rest goes to a spool file on the archive's own disk, from which the
store path streams (compression and the segment copy never hold it whole).

The spool is bounded while a dataset arrives, not once it has (issue #25): all spool
files of the process together hold at most `max_spool_bytes`, and a spool file stops
growing when the disk's free space falls under `min_free_bytes` plus what it holds (the
store would refuse it at the end anyway: it needs that much again for the segment copy).
Past either, the buffer is `refused`: its file is removed at once, the rest of the
dataset is read and let go, and the Storage SCP answers Out of Resources with
`refused` as the Error Comment (engine/receive/store.py), on the lean path and
pynetdicom's alike; the association goes on. A spool write that fails anyway (the disk
filled between two looks, min_free_bytes 0, an I/O error) refuses the dataset the same
way: raised, it would have ended the association with no answer to the sender.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
import threading
from pathlib import Path

from stowage.engine.runtime.counts import counts as process_counts

FREE_CHECK_BYTES = 4 << 20  # statvfs once per this many bytes a spool file grows, not per PDU
SPOOL_FULL = "out of spool space (max_spool_bytes) while receiving"        # Error Comments (LO, <= 64)
DISK_FULL = "disk almost full (min_free_bytes) while receiving; not stored"


def write_failed(e: OSError) -> str:
    """The Error Comment of a spool write that failed (at most 64 characters)."""
    return f"cannot spool the dataset ({e.strerror or 'I/O error'}); not stored"[:64]


class _SpoolUse:
    """Bytes in this process's spool files now, across its associations' threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0

    def take(self, n: int, limit: int) -> bool:
        with self.lock:
            if limit and self.bytes + n > limit:
                return False
            self.bytes += n
            return True

    def give_back(self, n: int) -> None:
        with self.lock:
            self.bytes -= n


_spool = _SpoolUse()


class SpillBuffer(io.BytesIO):
    directory: Path | None = None
    threshold: int = 16 << 20
    max_spool_bytes: int = 0  # 0: no limit (prepare() sets the configured ones)
    min_free_bytes: int = 0

    def __init__(self, initial: bytes = b"") -> None:
        super().__init__(initial)
        self._file: io.BufferedWriter | None = None
        self.path: Path | None = None
        self.refused = ""  # the Error Comment, once a spool limit refused this dataset
        self._held = 0  # bytes of our spool file counted in _spool
        self._next_check = 0  # _held at which free space is looked at next

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def write(self, data) -> int:  # type: ignore[override]
        if self._file is None:
            if self.refused:  # the rest of a refused dataset is read and let go
                return len(data)
            if self.directory is None or super().tell() + len(data) <= self.threshold:
                return super().write(data)
            self._spill()
            if self._file is None:  # refused on the way to disk
                return len(data)
        if not self._room(len(data)):
            return len(data)
        try:
            return self._file.write(data)
        except OSError as e:
            self._failed(e)
            return len(data)

    def _spill(self) -> None:
        held = super().getvalue()
        if not self._room(len(held)):
            return
        try:
            fd, name = tempfile.mkstemp(prefix="rx-", suffix=".part", dir=self.directory)
            self._file = os.fdopen(fd, "wb", buffering=1 << 20)
            self.path = Path(name)
            self._file.write(held)
        except OSError as e:
            self._failed(e)
            return
        super().seek(0)
        super().truncate(0)

    def _failed(self, e: OSError) -> None:
        """A spool write failed: refuse the dataset (its file goes), read the rest and let it go."""
        self._refuse("free_space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else None, write_failed(e))

    def _room(self, n: int) -> bool:
        """Whether `n` more bytes may go to the spool; refuses the dataset if not. Per
        PDU: a lock and two integer comparisons; statvfs once per FREE_CHECK_BYTES."""
        if not _spool.take(n, self.max_spool_bytes):
            self._refuse("spool_bytes", SPOOL_FULL)
            return False
        self._held += n
        if self.min_free_bytes and self._held >= self._next_check:
            self._next_check = self._held + FREE_CHECK_BYTES
            if _free(self.directory) < self.min_free_bytes + self._held:
                self._refuse("free_space", DISK_FULL)
                return False
        return True

    def _refuse(self, limit: str | None, comment: str) -> None:
        """Refuse the dataset: `comment` is the Error Comment; `limit` the LIMITS name it
        counts under (None: an I/O error, no limit of ours)."""
        self.refused = comment
        if limit:
            process_counts.refused(limit)
        self.discard()
        super().seek(0)
        super().truncate(0)

    def getvalue(self) -> bytes:
        if self.spilled:
            raise RuntimeError("the dataset was spilled to disk: read it from .path")
        return super().getvalue()

    def close_spool(self) -> None:
        """Write the spool file's last buffered bytes and close it; if they cannot be
        written, the dataset is `refused` as by a failed write on the way."""
        if self._file is None or self._file.closed:
            return
        try:
            self._file.close()
        except OSError as e:
            self._failed(e)

    def finish(self) -> tuple[Path, int]:
        """Close the spool file; returns its path and length."""
        assert self._file is not None and self.path is not None
        self._file.close()
        return self.path, self.path.stat().st_size

    def discard(self) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError:  # its buffered bytes could not be written: the file goes anyway
                pass
        self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        if self._held:
            _spool.give_back(self._held)
            self._held = 0

    def __del__(self) -> None:  # an aborted association leaves its partial dataset behind
        try:
            self.discard()
        except Exception:
            pass


def _free(directory: Path | None) -> int:
    try:
        st = os.statvfs(directory or ".")
    except OSError:
        return 1 << 62  # cannot tell: the store's own check decides
    return st.f_bavail * st.f_frsize


def prepare(directory: Path, threshold: int, *, max_spool_bytes: int = 0, min_free_bytes: int = 0) -> type[SpillBuffer]:
    """SpillBuffers of this process spill into `directory` (emptied) past `threshold` bytes,
    holding at most `max_spool_bytes` there at once (0: no limit) and keeping
    `min_free_bytes` free on its disk (0: no check)."""
    if directory.exists():
        shutil.rmtree(directory)  # partial datasets of a previous life of this worker
    directory.mkdir(parents=True)
    SpillBuffer.directory, SpillBuffer.threshold = directory, threshold
    SpillBuffer.max_spool_bytes, SpillBuffer.min_free_bytes = max_spool_bytes, min_free_bytes
    return SpillBuffer
