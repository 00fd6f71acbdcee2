"""Tails: the rows of durable records that are not yet sealed into Parquet.

Each worker appends the rows of every group commit, as one Arrow IPC stream batch, to its
own tail file before the stores of that batch are acknowledged; any process reads all
tails to see acknowledged instances at once (read-your-writes). Tails are a cache: after
a crash they are rebuilt from the segments.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog.schema import SCHEMA

SUFFIX = ".arrows"


class TailWriter:
    """Appends row batches to one tail file (one writer per file)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._sink.flush()

    def append(self, rows: list[dict[str, Any]]) -> None:
        self._writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
        self._sink.flush()

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


def read_tail(path: Path) -> pa.Table:
    """Every complete batch of a tail file; a batch still being written is left out."""
    batches = []
    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
                while True:
                    batches.append(reader.read_next_batch())
            except (StopIteration, pa.ArrowInvalid, OSError):
                pass
    except (FileNotFoundError, pa.ArrowInvalid, OSError):
        pass
    return pa.Table.from_batches(batches, schema=SCHEMA)


def read_tails(directory: Path) -> pa.Table:
    """The rows of every tail file in `directory` (files that vanish meanwhile are skipped)."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))
    except FileNotFoundError:
        names = []
    tables = [read_tail(directory / n) for n in names]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
