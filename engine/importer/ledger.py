"""The import ledger: which source files are already in the archive, so that a re-run
skips them without opening them.

One SQLite file in the data directory (`import/ledger.sqlite`, WAL mode). A file is
written to it only after the archive acknowledged its instance (stored durably, or
found already held), keyed by its absolute path and remembered with its size, mtime_ns
and inode: a file whose three still match is skipped; any change and it is read again.
The ledger is a cache, never the truth: losing its last rows in a crash only means
that those files are read again, and the archive's duplicate check stores nothing twice.
So a ledger that cannot be written (a full disk: "database or disk is full") costs a
warning, never the import: its summary and report are what the operator needs then.

Paths are text when they are UTF-8, as nearly all are. A file name that is not (Latin-1
names copied from an old system, names from a CD's ISO 9660 records) cannot be SQLite text: it is kept
as a BLOB of its bytes (os.fsencode), and read back as the str the walk gives for it.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

log = logging.getLogger("stowage.import")

Key = tuple[int, int, int]  # (size, mtime_ns, inode)


def _column(path: str) -> str | bytes:
    """The path as the ledger stores it: text, or its bytes when it is not UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode's surrogates: the name's bytes are not UTF-8
        return os.fsencode(path)
    return path


def _below(root: str | bytes) -> tuple[str | bytes, str | bytes]:
    """Bounds of the paths below the folder `root` (ending in "/"): from "root/" up to
    "root0", '0' following '/'; text bounds select text rows, bytes bounds BLOB rows."""
    return root, root[:-1] + ("0" if isinstance(root, str) else b"0")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    imported_at REAL NOT NULL
) WITHOUT ROWID
"""


class Ledger:
    def __init__(self, data_dir: Path) -> None:
        directory = data_dir / "import"
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "ledger.sqlite"
        self._pending: list[tuple] = []
        self._last_flush = time.monotonic()
        self.lost = 0  # rows that could not be written
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # a lost last commit costs a re-read, nothing else
            self.db.execute(_SCHEMA)
        except sqlite3.Error as e:  # this run reads every file; nothing it stores is lost
            log.warning("import ledger %s cannot be opened (%s): every file is read, none skipped", self.path, e)
            self.db = sqlite3.connect(":memory:", isolation_level=None)
            self.db.execute(_SCHEMA)

    def known(self, root: str) -> dict[str, Key]:
        """Files under `root` (a folder, or one file) that the ledger holds."""
        found: dict[str, Key] = {}
        if not root.endswith("/"):
            found.update(self._rows("path = ?", (_column(root),)))
            root += "/"
        text = _column(root)
        if isinstance(text, str):
            found.update(self._rows("path >= ? AND path < ?", _below(text)))
        found.update(self._rows("path >= ? AND path < ?", _below(os.fsencode(root))))  # names not UTF-8
        return found

    def _rows(self, where: str, params: tuple) -> dict[str, Key]:
        rows = self.db.execute(f"SELECT path, size, mtime_ns, inode FROM files WHERE {where}", params)
        return {p if isinstance(p, str) else os.fsdecode(p): (s, m, i) for p, s, m, i in rows}

    def add(self, path: str, key: Key, outcome: str) -> None:
        self._pending.append((_column(path), *key, outcome, time.time()))
        if len(self._pending) >= 5000 or time.monotonic() - self._last_flush > 1.0:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            rows, self._pending = self._pending, []
            try:
                with self.db:
                    self.db.execute("BEGIN")
                    self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.Error as e:
                if not self.lost:
                    log.warning("import ledger %s cannot be written (%s): the files imported from now on are "
                                "read again by the next run, and found already held", self.path, e)
                self.lost += len(rows)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()
