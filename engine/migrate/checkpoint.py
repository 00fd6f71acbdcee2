"""The migration's checkpoint: one SQLite file per source in <data-dir>/migrate/ (WAL, so
`--status` reads it while a migration writes it; synchronous=FULL, so a state written is
a state kept through kill -9 or a power cut).

Tables
  meta     key/value: source, method, created
  windows  enumeration windows: pending, done, split, incomplete, failed
  studies  one row per study: state pending | in-flight | done | failed, attempts,
           next_attempt (back-off), counts expected/received/verified, bytes, last_error

A study moves pending -> in-flight -> done, or back to pending with a later next_attempt
(retry), or to failed when its attempts are used up. On open, in-flight rows (a run that
died mid-pull) return to pending: they are pulled again, which is harmless because the
archive does not store an identical re-sent instance twice.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from stowage.catalog.durable import fsync_dir
from stowage.engine.migrate.enumerate import Study, Window
from stowage.engine.migrate.options import MigrateError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS windows (
    key TEXT PRIMARY KEY, state TEXT NOT NULL, found INTEGER, note TEXT, updated REAL, matches INTEGER);
CREATE TABLE IF NOT EXISTS studies (
    uid TEXT PRIMARY KEY, patient_id TEXT, patient_name TEXT, study_date TEXT, modalities TEXT,
    expected INTEGER, state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0, received INTEGER NOT NULL DEFAULT 0,
    verified INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, verified_by TEXT,
    last_error TEXT, updated REAL);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state, next_attempt);
"""
STATES = ("pending", "in-flight", "done", "failed")

# A study found again (another window, or --rescan) takes the source's new count. A done
# study whose new count is above what was verified has gained instances at the source
# since it was pulled (a report, a late series): it is pulled again, with fresh attempts;
# the instances already held are answered "already held" and not stored twice.
_GREW = "studies.state = 'done' AND excluded.expected > studies.verified"
_UPSERT_STUDY = f"""
INSERT INTO studies (uid, patient_id, patient_name, study_date, modalities, expected, updated)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (uid) DO UPDATE SET expected = excluded.expected,
    state = CASE WHEN {_GREW} THEN 'pending' ELSE studies.state END,
    attempts = CASE WHEN {_GREW} THEN 0 ELSE studies.attempts END,
    next_attempt = CASE WHEN {_GREW} THEN 0 ELSE studies.next_attempt END,
    last_error = CASE WHEN {_GREW} THEN 'the source now counts ' || excluded.expected || ' instances, '
                      || studies.verified || ' were verified: pulled again' ELSE studies.last_error END
WHERE excluded.expected IS NOT NULL AND (studies.state != 'done' OR excluded.expected > studies.verified)
"""


class CheckpointBusy(RuntimeError):
    """Another `stowage migrate` holds this source's checkpoint."""


class CheckpointUnreadable(MigrateError):
    """The checkpoint file is damaged, or is not a checkpoint (SQLite cannot read it)."""

    def __init__(self, path: Path, error: sqlite3.Error) -> None:
        super().__init__(f"the migration checkpoint {path} cannot be read ({error}): it is damaged or not a "
                         f"checkpoint; move it aside (with its -wal and -shm files) and run again to start this "
                         f"source afresh (instances already in the archive are not stored twice)")


@dataclass
class StudyRow:
    uid: str
    patient_id: str
    study_date: str
    expected: int | None
    attempts: int


@dataclass
class Result:
    """What one attempt at a study ended with."""

    state: str                  # done, or failed (retried while attempts remain)
    expected: int | None = None
    received: int = 0
    verified: int = 0
    bytes: int = 0
    verified_by: str = ""
    error: str = ""
    busy: bool = False          # the source said it is out of resources, or stalled


DateRange = tuple[dt.date | None, dt.date | None]  # --since, --until (inclusive)


def in_range(dates: DateRange) -> tuple[str, tuple[str, ...]]:
    """SQL (and its values) selecting the studies whose StudyDate (DA, YYYYMMDD; also the
    YYYY.MM.DD of ACR-NEMA and YYYY-MM-DD some old archives answer) is within `dates`; with
    neither bound, every study, undated ones included (as the enumeration)."""
    since, until = dates
    if since is None and until is None:
        return "1", ()
    day = "replace(replace(trim(study_date), '.', ''), '-', '')"
    where, params = [f"length({day}) = 8"], []
    if since is not None:
        where.append(f"{day} >= ?")
        params.append(since.strftime("%Y%m%d"))
    if until is not None:
        where.append(f"{day} <= ?")
        params.append(until.strftime("%Y%m%d"))
    return " AND ".join(where), tuple(params)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    con = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30, isolation_level=None)
    if not readonly:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
    return con


def _create(path: Path) -> None:
    """A new checkpoint, its tables made in a temporary file renamed into place: `--status`
    (or anyone reading) never finds the file without its tables."""
    tmp = path.with_name(f".{path.name}.tmp")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        leftover.unlink(missing_ok=True)
    con = connect(tmp)
    try:
        con.executescript(SCHEMA)
    finally:
        con.close()
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Checkpoint:
    """The checkpoint of one source, held exclusively (flock) by one migration."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock_file = open(path.with_suffix(".lock"), "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise CheckpointBusy(f"another stowage migrate is running from this source ({path.name}); "
                                 "see it with --status") from None
        try:
            if not path.exists():
                _create(path)
            self.con = connect(path)
            self.con.executescript(SCHEMA)  # an older checkpoint gains what it lacks
            self.con.execute("SELECT count(*) FROM studies").fetchone()  # reads the pages, not just the header
        except sqlite3.DatabaseError as e:
            self._lock_file.close()
            raise CheckpointUnreadable(path, e) from None
        self._mutex = threading.Lock()

    def close(self) -> None:
        self.con.close()
        self._lock_file.close()

    def _tx(self, statements: Iterable[tuple[str, Any]]) -> None:
        with self._mutex:
            self.con.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self.con.execute(sql, params)
                self.con.execute("COMMIT")
            except BaseException:
                if self.con.in_transaction:  # a Ctrl-C just after COMMIT: nothing to roll back
                    self.con.execute("ROLLBACK")
                raise

    def _one(self, sql: str, params: Any = ()) -> Any:
        with self._mutex:
            row = self.con.execute(sql, params).fetchone()
        return row[0] if row else None

    # -- meta and resume -----------------------------------------------------------

    def meta(self, key: str) -> str | None:
        return self._one("SELECT value FROM meta WHERE key = ?", (key,))

    def set_meta(self, **values: str) -> None:
        self._tx(("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v)) for k, v in values.items())

    def resume(self, retry_failed: bool = True) -> int:
        """In-flight studies of a run that died go back to pending (and, for a new run,
        failed ones too, with fresh attempts); returns how many were in flight."""
        with self._mutex:
            n = self.con.execute("SELECT count(*) FROM studies WHERE state = 'in-flight'").fetchone()[0]
        stmts = [("UPDATE studies SET state = 'pending', next_attempt = 0 WHERE state = 'in-flight'", ())]
        if retry_failed:
            stmts.append(("UPDATE windows SET state = 'pending' WHERE state = 'failed'", ()))
            stmts.append(("UPDATE studies SET state = 'pending', attempts = 0, next_attempt = 0 "
                          "WHERE state = 'failed'", ()))
        self._tx(stmts)
        return n

    # -- enumeration ---------------------------------------------------------------

    def seed_windows(self, windows: list[Window], rescan: bool) -> None:
        """Start enumeration with `windows`, unless a previous run did (and no rescan). A
        run asking for another --since/--until than the previous ones adds its own first
        window: a migration of the last two years first, then of everything, must find the
        older studies too (the first windows of every run are remembered, done or not)."""
        if rescan:
            self._tx([("DELETE FROM windows", ())])
        now = time.time()
        self._tx(("INSERT OR IGNORE INTO windows (key, state, updated) VALUES (?, 'pending', ?)", (w.key, now))
                 for w in windows)

    def pending_windows(self) -> list[Window]:
        with self._mutex:
            rows = self.con.execute("SELECT key FROM windows WHERE state = 'pending' ORDER BY rowid").fetchall()
        return [Window.from_key(k) for (k,) in rows]

    def window_done(self, w: Window, outcome: str, studies: list[Study], children: list[Window],
                    note: str, matches: int = 0) -> None:
        """One window's answer, atomically: its studies, its children, its state."""
        now = time.time()
        stmts: list[tuple[str, Any]] = [
            (_UPSERT_STUDY, (s.uid, s.patient_id, s.patient_name, s.study_date, s.modalities, s.expected, now))
            for s in studies]
        stmts += [("INSERT OR IGNORE INTO windows (key, state, updated) VALUES (?, 'pending', ?)", (c.key, now))
                  for c in children]
        stmts.append(("UPDATE windows SET state = ?, found = ?, note = ?, updated = ?, matches = ? WHERE key = ?",
                      (outcome, len(studies), note, now, matches, w.key)))
        self._tx(stmts)

    def study_count(self) -> int:
        return int(self._one("SELECT count(*) FROM studies"))

    def requeue(self, keys: list[str]) -> None:
        self._tx(("UPDATE windows SET state = 'pending' WHERE key = ?", (k,)) for k in keys)

    def windows_with(self, min_matches: int) -> list[tuple[str, str]]:
        """(key, state) of finished windows whose answer held at least `min_matches`."""
        with self._mutex:
            return self.con.execute("SELECT key, state FROM windows WHERE state = 'done' AND matches >= ?",
                                    (min_matches,)).fetchall()

    def clear_incomplete(self, note: str) -> None:
        self._tx([("UPDATE windows SET state = 'done', note = note || '; ' || ? WHERE state = 'incomplete'",
                   (note,))])

    # -- pulling -------------------------------------------------------------------

    def next_due(self, limit: int, now: float, dates: DateRange = (None, None)) -> list[StudyRow]:
        where, params = in_range(dates)
        with self._mutex:
            rows = self.con.execute(
                "SELECT uid, patient_id, study_date, expected, attempts FROM studies "
                f"WHERE state = 'pending' AND next_attempt <= ? AND {where} "
                "ORDER BY attempts, study_date DESC, uid LIMIT ?", (now, *params, limit)).fetchall()
        return [StudyRow(*r) for r in rows]

    def earliest_retry(self, dates: DateRange = (None, None)) -> float | None:
        where, params = in_range(dates)
        return self._one(f"SELECT min(next_attempt) FROM studies WHERE state = 'pending' AND {where}", params)

    def outside(self, dates: DateRange) -> int:
        """Studies not done whose StudyDate is outside --since/--until: left to another run."""
        where, params = in_range(dates)
        return int(self._one(f"SELECT count(*) FROM studies WHERE state != 'done' AND NOT ({where})", params))

    def start(self, uid: str) -> None:
        self._tx([("UPDATE studies SET state = 'in-flight', attempts = attempts + 1, updated = ? WHERE uid = ?",
                   (time.time(), uid))])

    def finish(self, uid: str, result: Result, retry_at: float | None, attempts: int | None = None) -> str:
        """Record an attempt's result; a failure with `retry_at` goes back to pending.
        `attempts`: what the study's count of attempts becomes (an attempt that was not the
        study's fault, e.g. our disk full, is given back)."""
        state = result.state
        if state == "failed" and retry_at is not None:
            state = "pending"
        self._tx([("UPDATE studies SET state = ?, next_attempt = ?, expected = coalesce(?, expected), "
                   "received = ?, verified = ?, bytes = ?, verified_by = ?, last_error = ?, updated = ?, "
                   "attempts = coalesce(?, attempts) WHERE uid = ?",
                   (state, retry_at or 0, result.expected, result.received, result.verified, result.bytes,
                    result.verified_by, result.error or None, time.time(), attempts, uid))])
        return state

    def done_bytes_and_instances(self) -> tuple[int, int]:
        with self._mutex:
            row = self.con.execute("SELECT coalesce(sum(bytes), 0), coalesce(sum(verified), 0) FROM studies "
                                   "WHERE state = 'done'").fetchone()
        return int(row[0]), int(row[1])


def totals(con: sqlite3.Connection) -> dict[str, Any]:
    """Counts for --status and the report, from any connection (read-only is enough)."""
    by_state = dict.fromkeys(STATES, 0)
    for state, n in con.execute("SELECT state, count(*) FROM studies GROUP BY state"):
        by_state[state] = n
    waiting = con.execute("SELECT count(*) FROM studies WHERE state = 'pending' AND attempts > 0").fetchone()[0]
    expected, received, verified, mb = con.execute(
        "SELECT coalesce(sum(expected), 0), coalesce(sum(received), 0), coalesce(sum(verified), 0), "
        "coalesce(sum(bytes), 0) FROM studies").fetchone()
    unknown = con.execute("SELECT count(*) FROM studies WHERE expected IS NULL").fetchone()[0]
    windows = dict(con.execute("SELECT state, count(*) FROM windows GROUP BY state").fetchall())
    return {"studies": sum(by_state.values()), **{f"studies_{k.replace('-', '_')}": v for k, v in by_state.items()},
            "studies_waiting_retry": waiting, "instances_expected": expected, "studies_count_unknown": unknown,
            "instances_received": received, "instances_verified": verified, "bytes": mb,
            "windows": windows}
