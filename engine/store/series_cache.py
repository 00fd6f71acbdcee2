"""Series metadata (WADO-RS …/metadata) kept on disk, one file a series, shared by every
HTTP process and kept across restarts: the first request for a series' metadata makes it
(metadata.py) and writes it here; the next ones, in any process, read one file.

A file is served only while it still describes the series: it carries a fingerprint of
the instances it was made from (SOP Instance UID, record, syntax, length, in order), and
the catalog lookup that every request makes anyway gives the fingerprint of what the
series holds now. An instance that joins the series, one deleted or rejected, a record
that compaction moves: the fingerprints differ and the metadata is made again. A delete
(`stowage delete`, DELETE through the HTTP port: engine/lifecycle/delete.py) also removes
the files of the series it touches, so data of a deleted patient does not stay behind here.
It lives under engine/store, not engine/web, so that the delete path below the web layer
can reach it.

The file holds the JSON with a placeholder where this server's base URL goes (clients
reach the server under different names), zstd-compressed (the slices of a series repeat
most of their elements). Files are named by a hash of the Series Instance UID (nothing from
the network names a path), written to a temporary name and renamed (a reader never sees
half a file), and the least recently used go once the folder passes MAX_BYTES.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Iterable

import zstandard

log = logging.getLogger("stowage.http")

BASE = "http://stowage.invalid/dicom-web"  # stands for the base URL in stored files (RFC 2606's .invalid)
MAX_BYTES = 1 << 30  # the folder's size, compressed, before the least recently used files go
_MAGIC = b"stowage series metadata 1 "
_local = threading.local()


def folder(data_dir: Path) -> Path:
    return data_dir / "cache" / "series-metadata"


def fingerprint(instances: Iterable) -> bytes:
    """What the series holds, as the catalog says now: instances (engine/web/records.Instance) in order."""
    h = hashlib.sha256()
    for i in instances:
        h.update(f"{i.sop_instance_uid}|{i.segment}|{i.offset}|{i.transfer_syntax_uid}|{i.dataset_length}\n".encode())
    return h.hexdigest().encode()


def _name(series: str) -> str:
    return hashlib.sha256(series.encode()).hexdigest()[:40] + ".json.zst"


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = _local.pair = (zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor())
    return pair


class SeriesCache:
    def __init__(self, data_dir: Path, max_bytes: int = MAX_BYTES) -> None:
        self.folder = folder(data_dir)
        self.max_bytes = max_bytes
        self._written = 0  # bytes written since the folder's size was last checked

    def get(self, series: str, fp: bytes) -> bytes | None:
        """The series' metadata with BASE in place of the base URL, when the stored file
        was made from exactly the instances `fp` names; else None."""
        path = self.folder / _name(series)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError:
            return None
        head, _, body = blob.partition(b"\n")
        if head != _MAGIC + fp:
            return None
        try:
            data = _zstd()[1].decompress(body)
        except zstandard.ZstdError:
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return data

    def path(self, series: str) -> Path:
        """The file that keeps the series' metadata."""
        return self.folder / _name(series)

    def current(self, series: str, fp: bytes) -> bool:
        """Whether the kept file was made from exactly the instances `fp` names (its first
        line read, not the whole file)."""
        try:
            with open(self.path(series), "rb") as f:
                head = f.readline(len(_MAGIC) + len(fp) + 2)
        except OSError:
            return False
        return head.rstrip(b"\n") == _MAGIC + fp

    def holds(self, series: str) -> bool:
        """Whether a file for the series is there (current or not: get() decides)."""
        return (self.folder / _name(series)).exists()

    def put(self, series: str, fp: bytes, data: bytes) -> None:
        """Keep the series' metadata (a failure to write is logged, never the request's)."""
        path = self.folder / _name(series)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            blob = _MAGIC + fp + b"\n" + _zstd()[0].compress(data)
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("series metadata not kept on disk (%s): %s", self.folder, e.strerror or e)
            return
        self._written += len(blob)
        if self._written > self.max_bytes // 16:
            self._written = 0
            self.trim()

    def forget(self, series: Iterable[str]) -> None:
        """Remove the files of these series (they were deleted)."""
        for uid in series:
            (self.folder / _name(uid)).unlink(missing_ok=True)

    def trim(self) -> None:
        """Remove the least recently used files until the folder is under max_bytes."""
        try:
            entries = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(self.folder)
                       if e.is_file() and e.name.endswith(".json.zst")]
        except OSError:
            return
        total = sum(size for _m, size, _p in entries)
        for _mtime, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass
