"""The publisher's durable record, `<data_dir>/iceberg/ledger.json`: the batch being
committed (its id, its data files and where they go), how far the tombstone log is
published, and totals. Replaced atomically (write, fsync, rename).

A batch is written here before its first commit attempt and cleared only after its
files are off the outbox, so a publisher killed at any instant finds it on restart and
asks the table whether it landed (a snapshot carries the batch id): if so it only clears
it, if not it commits the very same data files. Nothing is lost, nothing lands twice.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stowage.catalog.durable import replace_durably

LEDGER = "ledger.json"


@dataclass
class Batch:
    id: str
    table: str                   # "instances" or "deletions"
    files: list[dict]            # {"name", "local" (path here), "path" (in the warehouse), "bytes"}
    rows: int
    log_ino: int | None = None   # deletions: the tombstone log position this batch publishes up to
    log_end: int = 0
    # a relocation (engine/iceberg/relocations.py): the data files `files` replace, and
    # the replaced segments whose rows they relocate
    replaces: list[str] = field(default_factory=list)
    relocates: list[str] = field(default_factory=list)


@dataclass
class Ledger:
    batch: Batch | None = None
    log_ino: int | None = None   # the tombstone log is published up to (inode, byte offset)
    log_offset: int = 0
    instance_files: int = 0
    instance_rows: int = 0
    deletion_rows: int = 0
    relocated_rows: int = 0      # rows of the instances table rewritten to follow compactions
    commits: int = 0
    conflicts: int = 0           # commit attempts that lost a race to another writer and were made again
    extra: dict = field(default_factory=dict)
    # segments of a lost data directory written back from write-ahead objects whose rows the
    # instances table already held (engine/iceberg/restore.py): not published again, like adopted ones
    rewritten: list[str] = field(default_factory=list)


def load(home: Path) -> Ledger:
    try:
        with open(home / LEDGER, "rb") as f:
            d = json.load(f)
    except FileNotFoundError:
        return Ledger()
    batch = d.pop("batch", None)
    ledger = Ledger(**{k: d[k] for k in Ledger.__dataclass_fields__ if k in d})
    ledger.batch = Batch(**batch) if batch else None
    return ledger


def save(home: Path, ledger: Ledger) -> None:
    home.mkdir(parents=True, exist_ok=True)
    replace_durably(home / LEDGER, json.dumps(asdict(ledger)))
