"""What `stowage migrate` was asked to do (Options), the error it stops with, and where its
checkpoint lives: apart from run.py so that the command line reads them without importing
the migration loop (pydicom, pynetdicom: most of a second before `--help` could answer)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stowage.engine.migrate.pacing import Rate, TimeWindow

if TYPE_CHECKING:
    from stowage.engine.transfer.requestor import Peer


class MigrateError(RuntimeError):
    """The migration cannot go on; the message says why and what to do."""


@dataclass
class Options:
    method: str = "move"
    since: dt.date | None = None
    until: dt.date | None = None
    parallel: int = 3
    find_limit: int = 0
    verify_content: bool = False
    dry_run: bool = False
    window: TimeWindow | None = None
    rate: Rate | None = None
    stall_timeout: float = 300.0
    retries: int = 5
    retry_delay: float = 30.0
    rescan: bool = False
    progress: bool = True


def checkpoint_path(data_dir: Path, peer: Peer) -> Path:
    from stowage.engine.migrate.source import slug
    return data_dir / "migrate" / f"{slug(peer)}.sqlite"
