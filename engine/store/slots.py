"""Slot claims: which live process writes which slot of a data directory.

A *slot* is the number that prefixes a writer's segments (`segments/NNN-SSSSSSSS.seg`)
and catalog tails (`catalog/tails/NNN-pid-gen.tail`). Exactly one live process may
append to a slot's segments, and recovery (cutting torn tails, sealing tail rows,
deleting stale tails) must never run on a slot that a live process is writing.

The claim is an exclusive `flock` on `segments/NNN.lock`, held for the life of the
writing process. The kernel drops it when the process dies, even by `kill -9`, so a
claim can never be stale and never needs cleaning up. Numbering, by convention:

- `stowage serve` workers use slots 0..N-1 (`claim_exact`, the acceptor chose the number);
- `stowage import` processes use slots 100..899 (`claim_slot(data_dir, 100, 899)`);
- the compactor uses slot 999 (engine/lifecycle/compaction.py);
- `serve`'s HTTP processes use slots 900..949 for STOW-RS (engine/web/store.py);
- other writers (e.g. `stowage migrate`) pick their own base and call `claim_slot`.

Usage by a writer process::

    slot = claim_slot(data_dir, 100)      # or claim_exact(data_dir, n) for a fixed number
    recover(data_dir, slot.number)        # our slot: a previous owner may have died mid-write
    archive = Archive(config, slot.number)
    ...                                   # keep `slot` referenced until the process ends
    slot.release()                        # optional: process exit releases it too

`recover(data_dir)` over all slots calls `try_claim()` per slot and leaves alone the
slots that another live process holds.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

MAX_SLOT = 999  # segment names give the slot three digits
IMPORT_FIRST_SLOT = 100  # `stowage import` processes claim slots in 100..899
IMPORT_LAST_SLOT = 899   # (999 is the compactor's: engine/lifecycle/compaction.py)


class SlotError(OSError):
    """No slot could be claimed (all taken, or the lock file cannot be opened)."""


@dataclass
class Slot:
    """A claimed slot; the claim lasts until `release()` or the end of the process."""

    number: int
    path: Path
    fd: int

    @property
    def prefix(self) -> str:
        """The prefix of this slot's segment and tail file names."""
        return f"{self.number:03d}-"

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1


def lock_path(data_dir: Path, number: int) -> Path:
    return data_dir / "segments" / f"{number:03d}.lock"


def _try(data_dir: Path, number: int) -> Slot | None:
    path = lock_path(data_dir, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CLOEXEC: a child process (e.g. a spawned helper) must not keep our claim alive.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return Slot(number, path, fd)


def claim_slot(data_dir: Path, first: int, last: int = MAX_SLOT) -> Slot:
    """Claim the lowest free slot in first..last; raises SlotError when all are taken."""
    for number in range(first, last + 1):
        slot = _try(data_dir, number)
        if slot is not None:
            return slot
    raise SlotError(errno.EBUSY, f"every slot {first}..{last} of {data_dir} is claimed by a live process")


def claim_exact(data_dir: Path, number: int, timeout: float = 30.0) -> Slot:
    """Claim slot `number`, waiting up to `timeout` s for its holder (e.g. a recovery of it
    by another process) to let go; raises SlotError if it does not."""
    deadline = time.monotonic() + timeout
    while True:
        slot = _try(data_dir, number)
        if slot is not None:
            return slot
        if time.monotonic() >= deadline:
            raise SlotError(errno.EBUSY, f"slot {number:03d} of {data_dir} is held by another live process")
        time.sleep(0.05)


def try_claim(data_dir: Path, number: int) -> Slot | None:
    """A claim on slot `number`, or None when another live process holds it. Recovery
    holds such a claim while it works on a slot, so no writer starts on it meanwhile."""
    return _try(data_dir, number)


def slots_present(data_dir: Path) -> set[int]:
    """Slot numbers that have segments or tails in `data_dir`."""
    found: set[int] = set()
    for directory, suffix in ((data_dir / "segments", ".seg"), (data_dir / "catalog" / "tails", ".tail")):
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if name.endswith(suffix) and name[:3].isdigit() and name[3:4] == "-":
                found.add(int(name[:3]))
    return found
