"""A segment in the bucket, read as a file: ranged GETs through a read cache on local disk.

Reads are cut into blocks of `s3_read_block` bytes. A block already in the read cache
(`<data_dir>/segment-cache/<segment>/<block>`) is read from there; the missing blocks of
one read are fetched with one ranged GET per run of consecutive blocks, and kept in the
cache (written whole, renamed into place: a reader never sees half a block). A reader
that goes on where its last read ended (a series, a verify, a compaction copy) reads
ahead, doubling up to 16 blocks per GET. The uploader process keeps the cache, with the
local copies of uploaded segments, under `local_cache_bytes`.

The bytes are not trusted for being cached: every record read is checked against its
CRC-32 by the segment reader, as on local disk.

Other nodes' segments (several nodes on one bucket, docs/scale-out.md). Each node uploads
its segments to `<prefix>/<node_name>/segments/<segment>`, so a segment is found from its
node's name and its own name alone, with no access to that node's manifest:

    segment_key(config, node, segment) -> str
        the object key of `segment` uploaded by `node`.
    open_node_segment(config, node, segment) -> RemoteFile
        a read-only, seekable file (read, seek, tell, pread) over that object: ranged
        GETs through the same block cache (`segment-cache/nodes/<node>/<segment>/`, kept
        under `local_cache_bytes` with the rest). One HEAD finds its size, once per
        process; raises FileNotFoundError (saying which key) when the bucket has no such
        object, ObjectStoreError when the store fails. Thread-safe.

Walk it with the segment reader as any local segment (`segment.read_record_at(f, offset)`
and friends check every record's CRC-32). Segments are immutable once uploaded (the
uploader never overwrites another segment's object), so what was read stays true until
a compaction deletes the object; a read after that raises ObjectStoreError (NoSuchKey).
"""
from __future__ import annotations

import io
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from stowage.catalog import manifest
from stowage.engine.runtime.config import Config
from stowage.engine.storage.objects import ObjectStore, store_for
from stowage.engine.storage.objects import segment_key as _key
from stowage.engine.store import segment

CACHE = "segment-cache"
NODES = "nodes"  # segment-cache/nodes/<node>/<segment>: other nodes' segments (no segment is named so)
_MAX_AHEAD = 16
_IN_MEMORY = 16  # blocks a process keeps in memory too: a record's head, then its payload, read apart


class _Recent:
    """The last few blocks read, in memory, so that the small reads of a record walk do
    not each read a block file again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks: OrderedDict[tuple[Path, str, int], bytes] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[Path, str, int]) -> bytes | None:
        with self.lock:
            data = self.blocks.get(key)
            if data is not None:
                self.blocks.move_to_end(key)
            return data

    def put(self, key: tuple[Path, str, int], data: bytes) -> None:
        with self.lock:
            self.blocks[key] = data
            self.blocks.move_to_end(key)
            while len(self.blocks) > self.size:
                self.blocks.popitem(last=False)


_recent = _Recent(_IN_MEMORY)


class ReadCache:
    """Blocks of remote segments on local disk, shared by every process of a data directory."""

    def __init__(self, data_dir: Path, block: int) -> None:
        self.directory = data_dir / CACHE
        self.block = block

    def _path(self, name: str, index: int) -> Path:
        return self.directory / name / f"{index:08d}"

    def get(self, name: str, index: int) -> bytes | None:
        data = _recent.get((self.directory, name, index))
        if data is not None:
            return data
        try:
            with open(self._path(name, index), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        _recent.put((self.directory, name, index), data)
        return data

    def put(self, name: str, index: int, data: bytes) -> None:
        _recent.put((self.directory, name, index), data)
        path = self._path(name, index)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # a full disk: the read goes on uncached, and leaves no half block taking room
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


class RemoteSegment:
    """One uploaded segment: key, size, and the block reads (shared by its open files)."""

    def __init__(self, store: ObjectStore, cache: ReadCache, name: str, key: str, size: int) -> None:
        self.store, self.cache, self.name, self.key, self.size = store, cache, name, key, size
        self._next, self._ahead = -1, 1  # where the last read ended; blocks to read ahead

    def pread(self, n: int, offset: int) -> bytes:
        end = min(self.size, offset + n)
        if n <= 0 or offset >= end:
            return b""
        block = self.cache.block
        first, last = offset // block, (end - 1) // block
        sequential = offset == self._next
        self._ahead = min(self._ahead * 2, _MAX_AHEAD) if sequential else 1
        self._next = end
        blocks: dict[int, bytes] = {}
        index = first
        while index <= last:
            data = self.cache.get(self.name, index)
            if data is not None:
                blocks[index] = data
                index += 1
                continue
            run_end = index
            while run_end + 1 <= last and self.cache.get(self.name, run_end + 1) is None:
                run_end += 1
            if run_end == last and sequential:
                run_end = min(last + self._ahead - 1, (self.size - 1) // block)
            blocks.update(self._fetch(index, run_end))
            index = run_end + 1
        joined = b"".join(blocks[i] for i in range(first, last + 1))
        start = offset - first * block
        return joined[start:start + end - offset]

    def _fetch(self, first: int, last: int) -> dict[int, bytes]:
        """Blocks first..last with one ranged GET, put in the cache."""
        block = self.cache.block
        start = first * block
        data = self.store.get_range(self.key, start, min(self.size, (last + 1) * block) - start)
        out = {}
        for i in range(first, last + 1):
            out[i] = data[(i - first) * block:(i - first + 1) * block]
            self.cache.put(self.name, i, out[i])
        return out


class RemoteFile(io.RawIOBase):
    """A read-only file over a RemoteSegment: read, seek, tell, pread; no fileno."""

    def __init__(self, remote: RemoteSegment) -> None:
        super().__init__()
        self.remote = remote
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.remote.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.remote.size - self.pos
        data = self.remote.pread(n, self.pos)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def pread(self, n: int, offset: int) -> bytes:
        return self.remote.pread(n, offset)


class Opener:
    """What `segment.open_segment` calls for a segment file that is not on local disk:
    the uploaded copy, if the manifest records one."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: ObjectStore | None = None
        self._lock = threading.Lock()
        self._seen: dict[Path, tuple[tuple[int, int], dict[str, dict]]] = {}
        self._remotes: dict[tuple[Path, str], RemoteSegment] = {}

    def uploaded(self, data_dir: Path) -> dict[str, dict]:
        """The manifest's `uploaded` of `data_dir`, read again whenever the manifest changed."""
        path = data_dir / "catalog" / manifest.MANIFEST
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns)
        seen = self._seen.get(data_dir)
        if seen is None or seen[0] != stamp:
            seen = self._seen[data_dir] = (stamp, manifest.load(data_dir / "catalog").uploaded)
        return seen[1]

    def __call__(self, path: Path) -> RemoteFile | None:
        data_dir, name = path.parent.parent, path.name
        with self._lock:
            entry = self.uploaded(data_dir).get(name)
            if entry is None or entry.get("gone"):
                return None
            remote = self._remotes.get((data_dir, name))
            if remote is None:
                if self.store is None:
                    self.store = store_for(self.config)
                remote = RemoteSegment(self.store, ReadCache(data_dir, self.config.s3_read_block), name,
                                       entry["key"], int(entry["size"]))
                self._remotes[(data_dir, name)] = remote
        return RemoteFile(remote)


def read_from_bucket(config: Config) -> Opener | None:
    """Read segments that are no longer on local disk from object storage, in this
    process, when `storage` names a bucket; returns the opener (None: local only). With
    durability = "object-store", the segment writers of this process also PUT each group
    commit to the bucket before it is acknowledged (wal.py)."""
    from stowage.engine.storage import wal
    wal.install(config)
    if not config.storage:
        segment.read_elsewhere(None)
        return None
    opener = Opener(config)
    segment.read_elsewhere(opener)
    return opener


def segment_key(config: Config, node: str, segment: str) -> str:
    """The object key of `segment` as `node` uploads it: `<prefix>/<node>/segments/<segment>`."""
    return _key(store_for(config).prefix, node, segment)


_nodes_lock = threading.Lock()
_node_segments: dict[tuple[Path, str, str, str], RemoteSegment] = {}


def open_node_segment(config: Config, node: str, segment: str) -> RemoteFile:
    """A readable file over `segment` as `node` uploaded it (see the module docstring)."""
    if not config.storage:
        raise FileNotFoundError(f"segment {segment} of node {node}: storage is local disk, no bucket to read it from")
    if not re.match(r"^[A-Za-z0-9._-]{1,64}$", node) or not segment.endswith(".seg") or "/" in segment:
        raise ValueError(f"not a node name and segment name: {node!r}, {segment!r}")
    ident = (config.data_dir, config.storage, node, segment)
    with _nodes_lock:
        remote = _node_segments.get(ident)
    if remote is None:
        store = store_for(config)
        key = _key(store.prefix, node, segment)
        head = store.head(key)
        if head is None:
            raise FileNotFoundError(f"no segment {segment} of node {node} in the bucket (s3://{store.bucket}/{key})")
        remote = RemoteSegment(store, ReadCache(config.data_dir, config.s3_read_block),
                               f"{NODES}/{node}/{segment}", key, int(head["ContentLength"]))
        with _nodes_lock:
            remote = _node_segments.setdefault(ident, remote)
    return RemoteFile(remote)
