"""The outbox of the Iceberg publisher (engine/iceberg): which sealed Parquet files hold
rows not yet committed to the Iceberg instances table.

It is a list in the manifest (`Manifest.outbox`), so a file enters it in the same atomic
swap that seals its rows (catalog.sealer.seal_rows) and a crash can never seal rows
without queueing them. A file a compaction merges away stays on disk while it is queued
(manifest._purge_retired), so the publisher always copies the files as sealed, and rows
reach Iceberg once: merged files are never queued, their rows already are.
"""
from __future__ import annotations

from pathlib import Path

from stowage.catalog import manifest


def enable(directory: Path) -> int:
    """Turn publication on (once): every file sealed so far is queued, so an archive that
    existed before Iceberg was configured is published whole. Returns how many were queued."""
    with manifest.lock(directory):
        if manifest.load(directory).outbox is not None:
            return 0
    with manifest.update(directory) as m:
        if m.outbox is None:
            m.outbox = sorted(m.files)
            return len(m.outbox)
        return 0


def enabled(directory: Path) -> bool:
    return manifest.load(directory).outbox is not None


def pending(directory: Path) -> list[str]:
    """The queued files, oldest first."""
    return list(manifest.load(directory).outbox or ())


def done(directory: Path, names: list[str]) -> None:
    """Take `names` off the queue (they are in Iceberg); a merged-away one may now go."""
    gone = set(names)
    with manifest.update(directory) as m:
        if m.outbox is not None:
            m.outbox = [n for n in m.outbox if n not in gone]
