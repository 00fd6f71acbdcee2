"""Where a catalog view's DuckDB spills what does not fit its memory_limit (a large sort or
join): a folder per process under the data directory's spool/. DuckDB's own default is `.tmp`
in the working directory, wherever `stowage serve` or a command was started, which may be
read-only, on another disk, or a user's home. DuckDB removes the folder when the connection
closes; a process killed before that leaves it, and the next `stowage serve` removes it."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psutil

PREFIX = "duckdb-"


def directory_for(catalog_dir: Path) -> str:
    """This process's spill folder for a view of `catalog_dir` (its parent: spool/ must exist,
    as DuckDB creates only the last level); a temporary folder if the data directory is
    read-only."""
    spool = catalog_dir.parent / "spool"
    try:
        spool.mkdir(exist_ok=True)
    except OSError:
        spool = Path(tempfile.gettempdir())
    return str(spool / f"{PREFIX}{os.getpid()}")


def remove_stale(data_dir: Path) -> list[Path]:
    """Remove the spill folders of processes that are gone; returns them."""
    removed = []
    for folder in (data_dir / "spool").glob(f"{PREFIX}*"):
        pid = folder.name[len(PREFIX):]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
