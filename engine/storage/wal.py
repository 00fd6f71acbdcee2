"""`durability = "object-store"`: a C-STORE is acknowledged only once its bytes are in the
bucket, for nodes whose local disk does not survive them (docs/scale-out.md).

Each group commit (engine/store/writer.py), once fsync'd, PUTs the bytes it appended as a
small write-ahead object, `<prefix>/<node>/wal/<segment>/<offset, 16 digits>` (a batch
larger than `s3_part_size` as several); the stores of the batch are released only after
every PUT succeeded, and refused with Out of Resources (the bytes cut from the segment)
when one failed. The uploader deletes a segment's write-ahead objects once the segment
itself is uploaded and verified, and every 30 s those of segments a compaction retired
(uploader.py, `sweep`).

At start-up (restore.py), before recovery, every write-ahead object of a segment the
bucket does not hold yet is written back into the local segment file where that file
is missing or shorter (a lost or replaced disk); recovery then indexes the records as
after any crash, and the uploader uploads the segment. Objects of segments already
uploaded are stale and deleted.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from stowage.catalog import manifest
from stowage.catalog.durable import fsync_dir
from stowage.engine.runtime.config import Config
from stowage.engine.storage.objects import ObjectStore, ObjectStoreError, store_for
from stowage.engine.store import writer

log = logging.getLogger("stowage.storage")
_CHUNK = 16 << 20  # bytes one write-ahead object holds at most (bounded memory per commit)


def wal_prefix(store: ObjectStore, segment: str = "") -> str:
    """`<prefix>/<node>/wal/` and, with a segment, `<...>/wal/<segment>/`."""
    base = f"{store.prefix}/{store.node}/wal/" if store.prefix else f"{store.node}/wal/"
    return f"{base}{segment}/" if segment else base


class Replicator:
    """What the segment writer calls after each fsync'd group commit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = store_for(config)
        self.chunk = min(_CHUNK, config.s3_part_size)

    def __call__(self, segment: str, fd: int, start: int, end: int) -> None:
        """PUT bytes [start, end) of the segment open at `fd`; raises OSError when the
        bucket did not take them (the writer then refuses the batch)."""
        offset = start
        while offset < end:
            data = os.pread(fd, min(self.chunk, end - offset), offset)
            if not data:
                raise OSError(errno.EIO, f"segment {segment} ends at {offset} before {end}")
            try:
                self.store.put(f"{wal_prefix(self.store, segment)}{offset:016d}", data)
            except ObjectStoreError as e:
                raise OSError(errno.EIO, f"not in the object store (durability = object-store): {e}") from None
            offset += len(data)


def install(config: Config) -> None:
    """In a process that writes segments: replicate its commits when the configuration says so."""
    writer.replicate_commits(Replicator(config) if config.storage and config.durability == "object-store" else None)


def delete_segment(store: ObjectStore, segment: str) -> int:
    """Delete the write-ahead objects of `segment` (uploaded and verified); returns how many."""
    keys = list(store.list(wal_prefix(store, segment)))
    store.delete_many(keys)
    return len(keys)


def sweep(store: ObjectStore, data_dir: Path) -> int:
    """Delete the write-ahead objects nothing needs: of segments uploaded, retired by a
    compaction (their live records are in its output), or neither on local disk nor
    uploaded (retired and purged). Runs in the uploader, after start-up's `replay`, so a
    segment missing locally is never one still to be written back. Returns how many."""
    m = manifest.load(data_dir / "catalog")
    stale = [key for segment, pieces in _pieces(store).items()
             if segment in m.uploaded or segment in m.retired_segments or not (data_dir / "segments" / segment).exists()
             for _o, key, _s in pieces]
    store.delete_many(stale)
    return len(stale)


def _pieces(store: ObjectStore) -> dict[str, list[tuple[int, str, int]]]:
    """segment -> [(offset, key, size)] of every write-ahead object of this node."""
    base = wal_prefix(store)
    out: dict[str, list[tuple[int, str, int]]] = {}
    for key, size in store.list(base).items():
        segment, _, offset = key[len(base):].partition("/")
        if offset.isdigit():
            out.setdefault(segment, []).append((int(offset), key, size))
    return {s: sorted(p) for s, p in out.items()}


def replay(config: Config) -> int:
    """Write back into local segment files what the write-ahead objects hold beyond them;
    delete those of segments uploaded or retired. Returns the bytes written back."""
    store = store_for(config)
    segments = config.data_dir / "segments"
    m = manifest.load(config.data_dir / "catalog")
    restored = 0
    for segment, pieces in _pieces(store).items():
        if segment in m.uploaded or segment in m.retired_segments:
            store.delete_many([key for _o, key, _s in pieces])
            continue
        restored += _write_back(store, segments / segment, pieces)
    if restored:
        log.warning("wrote back %.1f MB of acknowledged records from the bucket's write-ahead objects into "
                    "local segments", restored / 1e6)
    return restored


def _write_back(store: ObjectStore, path: Path, pieces: list[tuple[int, str, int]]) -> int:
    try:
        have = path.stat().st_size
    except FileNotFoundError:
        have = 0
    missing = [(o, k, s) for o, k, s in pieces if o + s > have]
    if not missing:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    written = 0
    try:
        for offset, key, size in missing:
            data = store.get_range(key, 0, size)
            os.pwrite(fd, data, offset)
            written += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return written
