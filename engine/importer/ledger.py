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
"""
from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

log = logging.getLogger("stowage.import")

Key = tuple[int, int, int]  # (size, mtime_ns, inode)

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
        if not root.endswith("/"):
            exact = self.db.execute("SELECT path, size, mtime_ns, inode FROM files WHERE path = ?", (root,))
            found = {p: (s, m, i) for p, s, m, i in exact}
            root += "/"
        else:
            found = {}
        # Paths below the folder: those between "root/" and "root0" ('0' follows '/').
        rows = self.db.execute("SELECT path, size, mtime_ns, inode FROM files WHERE path >= ? AND path < ?",
                               (root, root[:-1] + "0"))
        found.update((p, (s, m, i)) for p, s, m, i in rows)
        return found

    def add(self, path: str, key: Key, outcome: str) -> None:
        self._pending.append((path, *key, outcome, time.time()))
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
