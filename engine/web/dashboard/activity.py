"""What runs in the archive now, read from the kernel, not from any process's memory: the
slot claims (flocks on segments/NNN.lock, engine/store/slots.py) name every live writer
(serve's workers, imports, migrations, the compactor), and the TCP table counts the
associations open on the DICOM ports."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from stowage.engine.lifecycle.compaction import COMPACT_SLOT
from stowage.engine.migrate.run import SLOT_BASE as MIGRATE_FIRST_SLOT
from stowage.engine.store.slots import IMPORT_FIRST_SLOT, IMPORT_LAST_SLOT
from stowage.engine.web.store import HTTP_FIRST_SLOT, HTTP_LAST_SLOT


@dataclass
class Writer:
    slot: int
    pid: int
    role: str        # worker, import, migrate, STOW-RS, compaction, other
    command: str     # the process's command line, shortened


def role_of(slot: int, argv: list[str]) -> str:
    """What a slot's holder does: by the slot numbering of engine/store/slots.py, and by its
    command line where ranges meet (a migration claims the lowest free slot from 200, which
    many concurrent imports may have taken)."""
    if slot == COMPACT_SLOT:
        return "compaction"
    if HTTP_FIRST_SLOT <= slot <= HTTP_LAST_SLOT:
        return "STOW-RS"  # an HTTP process storing
    if slot < IMPORT_FIRST_SLOT:
        return "worker"
    for command in ("import", "migrate", "compact"):
        if command in argv:
            return "compaction" if command == "compact" else command
    if slot < MIGRATE_FIRST_SLOT:
        return "import"
    return "migrate" if slot <= IMPORT_LAST_SLOT else "other"


def _flock_holders() -> dict[tuple[int, int, int], int]:
    """(major, minor, inode) -> pid of every flock held on this machine (/proc/locks)."""
    held = {}
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts:  # a waiter, not a holder
                    continue
                if len(parts) >= 6 and parts[1] == "FLOCK":
                    major, minor, inode = parts[5].split(":")
                    held[(int(major, 16), int(minor, 16), int(inode))] = int(parts[4])
    except (OSError, ValueError):
        pass
    return held


def _argv(pid: int) -> list[str]:
    try:  # a child of the fork server has its command as one title, padded (setproctitle)
        return " ".join(psutil.Process(pid).cmdline()).split()
    except (psutil.Error, OSError):
        return []


def _shown(argv: list[str]) -> str:
    text = " ".join(os.path.basename(w) if i == 0 else w for i, w in enumerate(argv))
    return text if len(text) <= 120 else text[:119] + "…"


def writers(data_dir: Path) -> list[Writer]:
    """Every slot of `data_dir` a live process holds, lowest slot first."""
    held = _flock_holders()
    out = []
    for lock in sorted((data_dir / "segments").glob("*.lock")):
        try:
            slot = int(lock.stem)
            st = lock.stat()
        except (ValueError, OSError):
            continue
        pid = held.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
        if pid is not None:
            argv = _argv(pid)
            out.append(Writer(slot, pid, role_of(slot, argv), _shown(argv)))
    return out


def open_associations(ports: tuple[int, ...]) -> int:
    """TCP connections established on our DICOM ports (one per association)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return -1
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port in ports)
