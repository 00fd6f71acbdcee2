"""Tails: the rows of durable records that are not yet sealed into Parquet.

Each worker appends the rows of every group commit, as one msgpack array, to its own tail
file before the stores of that batch are acknowledged; any process reads all tails to see
acknowledged instances at once (read-your-writes). Tails are a cache: after a crash they
are rebuilt from the segments.

msgpack rather than Arrow on the write side: the store path pays far less per batch
than building a record batch would cost (docs/benchmarks.md). Readers parse each file's bytes once, incrementally
(`TailReader`), and keep the rows as Arrow tables.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pyarrow as pa

from stowage.catalog.schema import SCHEMA

SUFFIX = ".tail"
_EMPTY = SCHEMA.empty_table()  # made once: pyarrow takes ~0.3 ms to make a table of these 35 columns
_UID_KEY = b"sop_instance_uid"


_local = threading.local()


def packb(obj: Any) -> bytes:
    """`msgpack.packb(obj, use_bin_type=True)` with this thread's Packer: packb makes a new
    Packer for every call, a quarter of packing a catalog row (docs/benchmarks.md)."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


class TailWriter:
    """Appends row batches to one tail file (one writer per file)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """One write per batch; a short write (disk full) raises, and the caller must stop
        appending to this file (readers wait at the partial batch forever)."""
        data = packb(rows)
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(28, f"short write to catalog tail {self.path.name} ({written} of {len(data)} bytes)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class _FileState:
    offset: int = 0
    unpacker: msgpack.Unpacker = field(default_factory=lambda: msgpack.Unpacker(raw=False))
    chunks: list[pa.Table] = field(default_factory=list)


class TailReader:
    """Every tail file of a directory, each byte parsed once across calls.

    `read()` returns all rows currently in tails; `fresh` holds the rows that call added.
    Files that vanish (sealed and removed) are forgotten; a batch still being written is
    left for the next call.
    """

    def __init__(self, directory: Path, skip_prefix: str | None = None) -> None:
        self.directory = directory
        self.skip_prefix = skip_prefix
        self._files: dict[str, _FileState] = {}
        self.fresh: pa.Table = _EMPTY
        self._all: pa.Table = _EMPTY

    def read(self) -> pa.Table:
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(SUFFIX)
                           and not (self.skip_prefix and n.startswith(self.skip_prefix)))
        except FileNotFoundError:
            names = []
        changed = False
        for gone in set(self._files) - set(names):
            del self._files[gone]
            changed = True
        fresh = []
        for name in names:
            state = self._files.setdefault(name, _FileState())
            table = self._advance(name, state)
            if table is not None:
                state.chunks.append(table)
                fresh.append(table)
        self.fresh = pa.concat_tables(fresh) if fresh else _EMPTY
        if fresh or changed:  # else the rows of the last call stand (a catalog query asks every time)
            chunks = [c for s in self._files.values() for c in s.chunks]
            self._all = pa.concat_tables(chunks) if chunks else _EMPTY
        return self._all

    def _advance(self, name: str, state: _FileState) -> pa.Table | None:
        try:
            with open(self.directory / name, "rb") as f:
                f.seek(state.offset)
                data = f.read()
        except FileNotFoundError:
            return None
        if not data:
            return None
        state.offset += len(data)
        state.unpacker.feed(data)
        rows = [row for batch in state.unpacker for row in batch]
        return pa.Table.from_pylist(rows, schema=SCHEMA) if rows else None


class TailUids:
    """The SOP Instance UIDs of the rows appended to a directory's tails since the last
    call, each byte read once and nothing else kept: what a worker's duplicate filter
    needs from other workers' tails.

    The rows are not unpacked: the UIDs are found in the msgpack bytes by their key
    (`find`, at C speed), and only a value that is a whole UID (1-64 digits and dots, as
    the store path admits) is taken. Unpacking every row, even raw, cost a busy worker
    about as much as 5% of its CPU (docs/benchmarks.md). The same bytes elsewhere in a row
    (a value, or a header's bytes) can only add a UID that was not stored: a false
    positive of the filter, which costs a catalog lookup; they cannot hide a real key,
    whose own letters no UID value can span."""

    def __init__(self, directory: Path, skip_prefix: str) -> None:
        self.directory = directory
        self.skip_prefix = skip_prefix
        self._files: dict[str, tuple[int, bytes]] = {}  # name -> (offset read to, bytes kept for the next read)

    def read(self) -> list[str]:
        try:
            names = [n for n in os.listdir(self.directory) if n.endswith(SUFFIX) and not n.startswith(self.skip_prefix)]
        except FileNotFoundError:
            names = []
        for gone in set(self._files) - set(names):
            del self._files[gone]
        uids: list[str] = []
        for name in names:
            offset, carry = self._files.get(name) or (0, b"")
            try:
                with open(self.directory / name, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            data = carry + data if carry else data
            self._files[name] = (offset + len(data) - len(carry), data[uids_in(data, uids):])
        return uids


_UID_FIELD = b"\xb0" + _UID_KEY  # msgpack fixstr of 16 bytes: the key
_UID_FIELD_MAX = len(_UID_FIELD) + 2 + 64  # key, str8 header, the longest UID
_UID_BYTES = frozenset(b"0123456789.")


def uids_in(data: bytes, out: list[str]) -> int:
    """Append to `out` the UIDs under the `sop_instance_uid` key in msgpack `data`; return
    where to resume once more bytes have come (a field may be cut by the end of `data`)."""
    pos, resume, end = 0, max(0, len(data) - _UID_FIELD_MAX), len(data)
    while (at := data.find(_UID_FIELD, pos)) >= 0:
        head = at + len(_UID_FIELD)
        if head >= end:
            return min(at, resume)
        kind = data[head]
        if 0xA1 <= kind <= 0xBF:  # fixstr
            length, start = kind & 0x1F, head + 1
        elif kind == 0xD9:  # str8
            if head + 1 >= end:
                return min(at, resume)
            length, start = data[head + 1], head + 2
        else:
            pos = at + 1
            continue
        if start + length > end:
            if length <= 64 and _UID_BYTES.issuperset(data[start:end]):
                return min(at, resume)  # cut by the end of data: read it again next time
            pos = at + 1
            continue
        value = data[start:start + length]
        if length > 64 or not _UID_BYTES.issuperset(value):
            pos = at + 1
            continue
        out.append(value.decode("ascii"))
        pos = start + length
        resume = max(resume, pos)
    return resume


def read_tails(directory: Path) -> pa.Table:
    """The rows of every tail file in `directory`, read afresh."""
    return TailReader(directory).read()
