"""The pseudonym table of one project: original patient -> pseudonym (and date offset),
original Study Instance UID -> new, kept durably in SQLite (WAL, synchronous=FULL) under
the data directory so that an authorised operator can re-identify. It never leaves with
the data. Rows are only ever added; a process remembers what it wrote and skips repeats."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (pseudonym TEXT PRIMARY KEY, patient_id TEXT NOT NULL,
    patient_name TEXT NOT NULL, date_offset_days INTEGER NOT NULL, first_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS studies (new_uid TEXT PRIMARY KEY, original_uid TEXT NOT NULL,
    pseudonym TEXT NOT NULL, first_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS key_check (id INTEGER PRIMARY KEY CHECK (id = 0), digest TEXT NOT NULL);
"""


class PseudonymTable:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def record(self, pseudonym: str, patient_id: str, patient_name: str, offset: int,
               study: tuple[str, str]) -> None:
        """Add the patient and the study if this process has not already."""
        rows = []
        if ("p", pseudonym) not in self._seen:
            rows.append(("INSERT OR IGNORE INTO patients VALUES (?,?,?,?,?)",
                         (pseudonym, patient_id, patient_name, offset, time.time()), ("p", pseudonym)))
        if study[1] and ("s", study[1]) not in self._seen:
            rows.append(("INSERT OR IGNORE INTO studies VALUES (?,?,?,?)",
                         (study[1], study[0], pseudonym, time.time()), ("s", study[1])))
        if not rows:
            return
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for sql, args, _ in rows:
                    self._db.execute(sql, args)
            self._seen.update(key for _, _, key in rows)

    def key_digest(self, digest: str) -> str:
        """The digest of the key this table's pseudonyms were made with: `digest` if it has
        none yet (a new table, or one made before it kept one)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO key_check VALUES (0, ?)", (digest,))
            return self._db.execute("SELECT digest FROM key_check").fetchone()[0]

    def patients(self) -> list[tuple]:
        return self._db.execute("SELECT pseudonym, patient_id, patient_name, date_offset_days FROM patients "
                                "ORDER BY first_seen, pseudonym").fetchall()

    def studies(self) -> list[tuple]:
        return self._db.execute("SELECT pseudonym, original_uid, new_uid FROM studies "
                                "ORDER BY first_seen, new_uid").fetchall()

    def close(self) -> None:
        self._db.close()
