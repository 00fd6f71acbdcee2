"""The manifest: which Parquet files make up the sealed catalog, and how far each
segment is sealed. Readers open only the files it names; writers replace it atomically
(write, fsync, rename) under an inter-process lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from stowage.catalog.durable import fsync_dir

MANIFEST = "manifest.json"
RETIRE_GRACE_S = 120.0  # superseded files stay this long for readers that still hold them


@dataclass
class Manifest:
    files: dict[str, int] = field(default_factory=dict)         # parquet name -> rows
    watermarks: dict[str, int] = field(default_factory=dict)    # segment -> sealed byte offset
    retired: dict[str, float] = field(default_factory=dict)     # parquet name -> retired at
    generation: int = 0
    uid_filter: str = ""    # token of the sealed-UID Bloom filter that matches (catalog.sealed_uids)
    duplicates: str = ""    # Parquet file of the records of duplicated UIDs (catalog.versions_table)
    # Segments a compaction replaced (engine.lifecycle.compaction) -> retired at; unlinked after a grace
    retired_segments: dict[str, float] = field(default_factory=dict)
    # Files sealed from fresh rows and not yet committed to the Iceberg instances table
    # (engine/iceberg); None: no Iceberg publication. Kept on disk until published.
    outbox: list[str] | None = None
    # Sealed segments uploaded to object storage and verified there (engine.storage) ->
    # {key, size, sha256, checksum, at}; "gone": true once a compaction retired it (its
    # object is then deleted). Only a segment named here may lose its local copy.
    uploaded: dict[str, dict] = field(default_factory=dict)
    # Segments a compaction replaced while Iceberg publication is on -> 0.0 until the
    # publisher committed the relocation of their rows (engine/iceberg/relocations.py),
    # then the time it did; their objects stay in the bucket until compact_grace after that.
    relocations: dict[str, float] = field(default_factory=dict)
    # With `storage`: compaction output -> the segments it replaced, until none of their
    # objects is left in the bucket (engine/storage/compactions.py journals it there).
    compactions: dict[str, list[str]] = field(default_factory=dict)

    def sealed_upto(self, segment: str) -> int:
        return self.watermarks.get(segment, 0)


class ManifestUnreadable(ValueError):
    """The manifest is there but cannot be read (cut to nothing, damaged): the message names
    it and the remedy."""


def load(directory: Path) -> Manifest:
    try:
        with open(directory / MANIFEST, "rb") as f:
            d = json.load(f)
        return Manifest(d["files"], d["watermarks"], d.get("retired", {}), d["generation"],
                        d.get("uid_filter", ""), d.get("duplicates", ""), d.get("retired_segments", {}),
                        d.get("outbox"), d.get("uploaded", {}), d.get("relocations", {}),
                        d.get("compactions", {}))
    except FileNotFoundError:
        return Manifest()
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors
        raise ManifestUnreadable(
            f"the catalog's manifest {directory / MANIFEST} cannot be read ({type(e).__name__}: {str(e)[:80]}); "
            "stop stowage and run `stowage rebuild-catalog` (it sets the damaged file aside and indexes every "
            "segment again: docs/lifecycle.md)") from None


def _store(directory: Path, m: Manifest) -> None:
    tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": m.files, "watermarks": m.watermarks, "retired": m.retired,
                   "generation": m.generation, "uid_filter": m.uid_filter, "duplicates": m.duplicates,
                   "retired_segments": m.retired_segments, "uploaded": m.uploaded,
                   **({"relocations": m.relocations} if m.relocations else {}),
                   **({"compactions": m.compactions} if m.compactions else {}),
                   **({"outbox": m.outbox} if m.outbox is not None else {})}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    fsync_dir(directory)


@contextmanager
def lock(directory: Path, name: str = "manifest.lock", blocking: bool = True) -> Iterator[bool]:
    """An inter-process lock; yields False when non-blocking and someone else holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def update(directory: Path) -> Iterator[Manifest]:
    """Read-modify-write the manifest under the lock; the change lands atomically on exit."""
    with lock(directory):
        m = load(directory)
        yield m
        m.generation += 1
        _purge_retired(directory, m)
        _store(directory, m)


def _purge_retired(directory: Path, m: Manifest) -> None:
    now = time.time()
    waiting = set(m.outbox or ())  # not yet copied to the Iceberg warehouse: kept until it is
    for name, at in list(m.retired.items()):
        if now - at > RETIRE_GRACE_S and name not in waiting:
            (directory / name).unlink(missing_ok=True)
            if name.endswith(".parquet"):  # and its study summary (catalog.studies)
                (directory / (name[:-len(".parquet")] + ".studies.parquet")).unlink(missing_ok=True)
            del m.retired[name]
