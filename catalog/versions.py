"""Duplicate records: which SOP Instance UIDs the catalog holds more than one record of,
so that readers can serve the one the duplicates policy keeps without a window over
every row.

Almost every instance is stored once. Under the manifest lock, each sealing checks its
rows against `uids.bloom`, a fixed-size Bloom filter of every sealed SOP Instance UID
(a sparse file shared by all processes), and looks up the few that may be sealed
already. What it finds goes to the *versions table*: every record (SOP Instance UID,
received_at, segment, offset) of each UID with more than one, a small Parquet file named
by the manifest. Readers take the versions table plus the tails (whose rows they check
against the filter themselves) and hide the records the policy does not keep.

The filter carries a token that the manifest names: a filter that does not match its
manifest (lost, or written by an older stowage) is rebuilt from the sealed files.
Bits are set and synced before the manifest that counts their rows is stored, so a
crash in between leaves extra bits, never missing ones.
"""
from __future__ import annotations

import functools
import mmap
import os
import time
import uuid
from pathlib import Path
from typing import Iterable

import duckdb
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stowage.catalog.bloom import UidFilter
from stowage.catalog.manifest import MANIFEST, Manifest
from stowage.catalog.manifest import load as load_manifest

FILTER = "uids.bloom"
_MAGIC = b"STWBLM01"
_HEAD = 64  # magic, then the token (ASCII), zero-padded
_BITS = 1 << 28  # 32 MiB: about 1 % false positives at 2.5e7 UIDs, 0.01 % at 5e6
VERSION_COLUMNS = ("sop_instance_uid", "received_at", "segment", "offset", "study_instance_uid")
VERSIONS_SCHEMA = pa.schema([("sop_instance_uid", pa.string()), ("received_at", pa.timestamp("us", tz="UTC")),
                             ("segment", pa.string()), ("offset", pa.int64()), ("study_instance_uid", pa.string())])
# Which duplicate a policy keeps: the newest record, or the first one received.
KEEP_NEWEST = {"keep-newest": True, "keep-first": False, "reject": False}


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
        size = os.fstat(self._fd).st_size
        mappable = size >= _HEAD + _BITS // 8 and not _holes_take_space(path.parent)
        self._map = mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if mappable else None

    def _byte(self, index: int) -> int:
        if self._map is not None:
            return self._map[_HEAD + index]
        b = os.pread(self._fd, 1, _HEAD + index)  # a short (foreign or damaged) file
        return b[0] if b else 0

    def __contains__(self, uid: str) -> bool:
        return all(self._byte(p >> 3) & (1 << (p & 7)) for p in self._positions(uid))

    def add(self, uid: str) -> None:
        for p in self._positions(uid):
            byte = self._byte(p >> 3)
            bit = 1 << (p & 7)
            if not byte & bit:
                os.pwrite(self._fd, bytes([byte | bit]), _HEAD + (p >> 3))

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
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
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        for old in self._retired:  # retired a refresh ago: no store still reads them
            old.close()
        self._retired = []
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


def load_versions(directory: Path, m: Manifest) -> pa.Table:
    if not m.duplicates:
        return VERSIONS_SCHEMA.empty_table()
    return pq.read_table(directory / m.duplicates, schema=VERSIONS_SCHEMA)  # a missing column reads as null


def sealed_versions(directory: Path, files: Iterable[str], uids: list[str]) -> pa.Table:
    """Every sealed record of `uids` in `files` (values bound, never SQL text)."""
    paths = [str(directory / n) for n in files]
    if not paths or not uids:
        return VERSIONS_SCHEMA.empty_table()
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        return con.sql(
            "SELECT sop_instance_uid, received_at, segment, \"offset\", study_instance_uid "
            "FROM read_parquet(?, union_by_name=true) "
            "WHERE sop_instance_uid IN (SELECT unnest(?))", params=[paths, uids]).to_arrow_table().cast(VERSIONS_SCHEMA)
    finally:
        con.close()


def merge(*tables: pa.Table) -> pa.Table:
    """The union of version tables, one row per record, only UIDs with several records."""
    t = pa.concat_tables([x.select(VERSION_COLUMNS).cast(VERSIONS_SCHEMA) for x in tables])
    if t.num_rows == 0:
        return t
    t = t.group_by(["segment", "offset"], use_threads=False).aggregate(
        [("sop_instance_uid", "min"), ("received_at", "min"), ("study_instance_uid", "min")]).rename_columns(
        ["segment", "offset", "sop_instance_uid", "received_at", "study_instance_uid"]).select(VERSION_COLUMNS)
    counts = t.group_by("sop_instance_uid", use_threads=False).aggregate([("segment", "count")])
    several = counts.filter(pc.greater(counts["segment_count"], 1))["sop_instance_uid"]
    return t.filter(pc.is_in(t["sop_instance_uid"], value_set=several))


def note_sealed(directory: Path, m: Manifest, table: pa.Table) -> None:
    """Account for `table` (rows about to be sealed into a file not yet in m.files): find
    the UIDs it duplicates, update the versions table and the filter. Mutates m; call
    under the manifest lock, before the manifest is stored."""
    f = open_filter(directory, m)
    try:
        uids = table["sop_instance_uid"].to_pylist()
        maybe: set[str] = set()
        seen: set[str] = set()
        for uid in uids:
            if uid in seen or uid in f:
                maybe.add(uid)
            seen.add(uid)
        if maybe:
            candidates = sorted(maybe)
            mine = table.filter(pc.is_in(table["sop_instance_uid"], value_set=pa.array(candidates, pa.string())))
            known = load_versions(directory, m)
            versions = merge(known, sealed_versions(directory, m.files, candidates), mine)
            if versions.num_rows != known.num_rows:  # merging only ever adds records
                if m.duplicates:
                    m.retired[m.duplicates] = time.time()
                m.duplicates = _write_versions(directory, versions)
        f.update(uids)
        f.sync()
    finally:
        f.close()


def _write_versions(directory: Path, versions: pa.Table) -> str:
    name = f"versions-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{name}.tmp"
    pq.write_table(versions, tmp, compression="zstd")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / name)
    return name


def shadowed(versions: pa.Table, policy: str) -> pa.Table:
    """(segment, offset, study_instance_uid) of every record in `versions` that policy does
    not serve."""
    if versions.num_rows == 0:
        return pa.table({"segment": pa.array([], pa.string()), "offset": pa.array([], pa.int64()),
                         "study_instance_uid": pa.array([], pa.string())})
    order = "descending" if KEEP_NEWEST[policy] else "ascending"
    t = versions.sort_by([("sop_instance_uid", "ascending"), ("received_at", order), ("segment", order),
                          ("offset", order)])
    uids = t["sop_instance_uid"]
    first = pc.not_equal(uids.slice(1), uids.slice(0, len(uids) - 1))  # row i+1 starts a new UID
    keep = pa.concat_arrays([pa.array([True]), first.combine_chunks()])
    return t.filter(pc.invert(keep)).select(["segment", "offset", "study_instance_uid"])
