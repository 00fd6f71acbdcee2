"""The sealed-UID filter: a fixed-size Bloom filter of every sealed SOP Instance UID in
`uids.bloom`, a sparse file shared by all processes, so that sealing (catalog.versions_table)
and readers look up only the few UIDs that may be sealed already.

The filter carries a token that the manifest names (`uid_filter`): a filter that does not
match its manifest (lost, or written by an older stowage) is rebuilt from the sealed files.
Bits are set and synced before the manifest that counts their rows is stored, so a crash in
between leaves extra bits, never missing ones.
"""
from __future__ import annotations

import functools
import mmap
import os
import threading
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np
import psutil
import pyarrow.parquet as pq

from stowage.catalog.bloom import UidFilter, positions, positions_array
from stowage.catalog.manifest import MANIFEST, Manifest
from stowage.catalog.manifest import load as load_manifest

FILTER = "uids.bloom"
_MAGIC = b"STWBLM01"
_HEAD = 64  # magic, then the token (ASCII), zero-padded
_BITS = 1 << 28  # 32 MiB: about 1 % false positives at 2.5e7 UIDs, 0.01 % at 5e6
_SPAN_GAP = 4096  # changed bytes this close are written together (they share or neighbour a page)


class SealedUids(UidFilter):
    """The Bloom filter of sealed SOP Instance UIDs, in a shared sparse file: read through
    a read-only memory map, written with pwrite.

    Writes do not go through the map: a write fault on a hole that the file system cannot
    back (a full disk) kills the process with SIGBUS, where pwrite raises ENOSPC. On a disk
    file system, reading a hole maps the zero page, which needs no space; tmpfs allocates a
    page even for that, so there the filter is read with pread (one per probe, four per
    UID, each a system call and a round trip of the GIL on a busy worker: why the map).
    """

    def __init__(self, path: Path, writable: bool) -> None:
        super().__init__(bits=8, hashes=4)
        self._bits = _BITS
        self.path = path
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        head = os.pread(self._fd, _HEAD, 0)
        self.token = head[len(_MAGIC):].rstrip(b"\0").decode("ascii", "replace") if head.startswith(_MAGIC) else ""
        st = os.fstat(self._fd)
        mappable = st.st_size >= _HEAD + _BITS // 8 and not _holes_take_space(path.parent)
        self._key = (st.st_dev, st.st_ino, st.st_size) if mappable else None
        self._map = _share_map(self._key, self._fd) if self._key else None

    def _byte(self, index: int) -> int:
        if self._map is not None:
            return self._map[_HEAD + index]
        b = os.pread(self._fd, 1, _HEAD + index)  # a short (foreign or damaged) file
        return b[0] if b else 0

    def __contains__(self, uid: str) -> bool:
        m = self._map
        for p in positions(uid, self._bits, self._k):
            byte = m[_HEAD + (p >> 3)] if m is not None else self._byte(p >> 3)
            if not byte & (1 << (p & 7)):
                return False
        return True

    def add(self, uid: str) -> None:
        self.update((uid,))

    def update(self, uids: Iterable[str]) -> list[str]:
        """Set the bits of `uids`; return those that may have been in the filter already,
        or that repeat (or collide with) an earlier one of `uids`: the UIDs a seal must
        look up. Each UID is hashed once, for both answers, and the rest is numpy.

        A seal adds thousands, whose bits fall on nearly every page of the filter: changed
        bytes closer than a page are read and written as one span, so a large seal writes
        the filter in a few large writes instead of a pwrite per bit; the pages would all
        be written back by `sync` anyway."""
        uids = list(uids)
        if not uids:
            return []
        k = self._k
        flat = positions_array(uids, self._bits, k).ravel()
        # each distinct bit once; the UID that names it first
        bit_at, first, per_flat = np.unique(flat, return_index=True, return_inverse=True)
        byte_of = (bit_at >> np.uint64(3)).astype(np.int64)
        mask_of = np.left_shift(np.uint8(1), (bit_at & np.uint64(7)).astype(np.uint8))
        starts = np.flatnonzero(np.r_[True, byte_of[1:] != byte_of[:-1]])
        touched = byte_of[starts]  # each changed byte once, ascending
        byte_index = np.cumsum(np.r_[True, byte_of[1:] != byte_of[:-1]]) - 1  # bit -> its entry in touched
        masks = np.bitwise_or.reduceat(mask_of, starts)
        old = np.empty(len(touched), np.uint8)
        spans = []
        breaks = np.flatnonzero(np.diff(touched) > _SPAN_GAP) + 1
        for a, b in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(touched)].tolist()):
            start = int(touched[a])
            span = self._read_span(start, int(touched[b - 1]) + 1)
            at = touched[a:b] - start
            old[a:b] = span[at]
            spans.append((start, span, at, a, b))
        was_set = (old[byte_index] & mask_of) != 0
        earlier = (first // k)[per_flat.ravel()] < np.arange(len(flat)) // k
        seen = (was_set[per_flat.ravel()] | earlier).reshape(-1, k).all(axis=1)
        for start, span, at, a, b in spans:
            new = span[at] | masks[a:b]
            if (new != span[at]).any():
                span[at] = new
                self._write_span(start, span)
        return [uid for uid, s in zip(uids, seen.tolist()) if s]

    def _read_span(self, start: int, end: int) -> np.ndarray:
        """The bytes [start, end) of the bit array, writable; zeros past a short file's end."""
        span = np.zeros(end - start, np.uint8)  # read into, not copied from bytes: a span can be the whole 32 MiB
        view = memoryview(span)
        while view and (got := os.preadv(self._fd, [view], _HEAD + start + len(span) - len(view))):
            view = view[got:]
        return span

    def _write_span(self, start: int, span: np.ndarray) -> None:
        view = memoryview(span)
        while view:
            view = view[os.pwrite(self._fd, view, _HEAD + start + len(span) - len(view)):]

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._map is not None:
            self._map = None
            _release_map(self._key)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @classmethod
    def create(cls, path: Path, bits: bytes | bytearray | None = None) -> "SealedUids":
        """A new filter file with a fresh token (replacing any other): empty and sparse, or
        holding `bits` (a whole bit array built in memory)."""
        token = uuid.uuid4().hex
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write((_MAGIC + token.encode()).ljust(_HEAD, b"\0"))
                if bits is not None:
                    f.write(bits)
                f.truncate(_HEAD + _BITS // 8)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return cls(path, writable=True)


# One read-only map per filter file and process, whatever the number of catalog views that
# read it: a process's rss counts a shared file's page once per mapping that touched it, so
# a map per view made every view's rss grow towards 32 MiB as the archive's UIDs reached the
# filter's pages (115 MiB of an HTTP process's rss in the 100,000-case soak, docs/fuzzing.md).
# Keyed by (device, inode, size): a rebuilt filter is a new file, and the old one's map goes
# when its last reader lets it go (the map keeps the inode, so its number is not reused).
_maps: dict[tuple[int, int, int], list] = {}  # key -> [mmap, readers]
_maps_lock = threading.Lock()


def _share_map(key: tuple[int, int, int], fd: int) -> mmap.mmap:
    with _maps_lock:
        entry = _maps.get(key)
        if entry is None:
            entry = _maps[key] = [mmap.mmap(fd, key[2], prot=mmap.PROT_READ), 0]
        entry[1] += 1
        return entry[0]


def _release_map(key: tuple[int, int, int]) -> None:
    with _maps_lock:
        entry = _maps[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _maps[key]
            entry[0].close()


_MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "shm"})


@functools.cache
def _holes_take_space(directory: Path) -> bool:
    """Whether `directory` is on a memory file system, where even reading a hole through a
    map allocates a page (and a full one answers with SIGBUS)."""
    path = os.path.realpath(directory)
    best, fstype = "", ""
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        inside = path == mount or path.startswith(mount if mount.endswith("/") else mount + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, part.fstype
    return fstype in _MEMORY_FILE_SYSTEMS


def open_filter(directory: Path, m: Manifest) -> SealedUids:
    """The writable filter that matches manifest `m` (rebuilt from the sealed files if
    it does not); sets m.uid_filter. Call under the manifest lock."""
    path = directory / FILTER
    if m.uid_filter and path.exists():
        f = SealedUids(path, writable=True)
        if f.token == m.uid_filter:
            return f
        f.close()
    built = UidFilter(bits=_BITS, hashes=4)  # in memory: one write, not a pwrite per bit
    for name in m.files:
        pf = pq.ParquetFile(directory / name)
        for i in range(pf.num_row_groups):
            built.update(pf.read_row_group(i, columns=["sop_instance_uid"]).column(0).to_pylist())
    f = SealedUids.create(path, built._array if m.files else None)
    m.uid_filter = f.token
    return f


def read_filter(directory: Path, m: Manifest, current: SealedUids | None) -> SealedUids | None:
    """A read-only view of the filter for readers, or None when it does not (yet) match
    the manifest (readers then treat every tail UID as possibly sealed)."""
    if current is not None and current.token == m.uid_filter:
        return current
    if current is not None:
        current.close()
    try:
        f = SealedUids(directory / FILTER, writable=False)
    except (OSError, ValueError):
        return None
    if f.token != m.uid_filter:
        f.close()
        return None
    return f


class SealedView:
    """For the store path: may a UID already be sealed? The shared sealed-UID filter,
    re-opened when the manifest names another (`refresh`, from one thread). Nothing is
    sealed in an archive without files; while the filter does not match the manifest
    (being rebuilt), every UID may be."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: tuple | None = None
        self._files = True
        self._filter: SealedUids | None = None
        self._retired: list[SealedUids] = []

    def refresh(self) -> None:
        try:
            st = os.stat(self.directory / MANIFEST)
        except FileNotFoundError:
            self._files, self._stamp = False, None
            return
        for old in self._retired:  # retired a refresh ago (0.1 s): no store still reads them
            old.close()
        self._retired = []
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        m = load_manifest(self.directory)
        current = self._filter
        if current is None or current.token != m.uid_filter:
            if current is not None:
                self._retired.append(current)
            self._filter = read_filter(self.directory, m, None)
        self._files = bool(m.files)
        self._stamp = stamp

    def may_hold(self, uid: str) -> bool:
        if not self._files:
            return False
        f = self._filter
        try:
            return f is None or uid in f
        except ValueError:  # closed under us: be safe
            return True

    def close(self) -> None:
        for f in [*self._retired, *([self._filter] if self._filter else [])]:
            f.close()
        self._retired, self._filter = [], None
