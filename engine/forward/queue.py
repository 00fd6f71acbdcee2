"""The forwarding queue: one SQLite database in <data-dir>/forward/, one row per
(destination, stored record). States: pending (waiting, or being sent: an entry is only
marked done after the destination answered), done, parked (refused by the destination:
its status and Error Comment are kept, and it is not tried again until a person says so),
cancelled (by a person: `stowage queue --cancel`).

Entries of a rule with `commit = true` also carry a commitment state: wanted (until the
destination's report), committed, or failed (with the reason); `commit_group` is the study
(or series) a request covers.

SQLite in WAL mode with synchronous=FULL: each scan's entries and its cursor are committed
in one transaction (one fsync per scan, not per instance), so a crash loses neither.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable, NamedTuple

DIRECTORY = "forward"
DATABASE = "queue.sqlite"
STATES = ("pending", "done", "parked", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    rule TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    segment TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    dataset_length INTEGER NOT NULL,
    received_at INTEGER NOT NULL,          -- microseconds since the epoch, as the catalog has it
    series_instance_uid TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,       -- not before this time.time()
    status INTEGER,                        -- the destination's last C-STORE status
    comment TEXT NOT NULL DEFAULT '',      -- why it failed or was parked
    queued_at REAL NOT NULL,
    done_at REAL,
    UNIQUE (destination, sop_instance_uid, received_at)
);
CREATE INDEX IF NOT EXISTS due ON entries (destination, state, next_at, id);
CREATE INDEX IF NOT EXISTS due_in_order ON entries (destination, state, received_at, id);
CREATE INDEX IF NOT EXISTS arrival ON entries (received_at);
CREATE TABLE IF NOT EXISTS cursor (id INTEGER PRIMARY KEY CHECK (id = 0), received_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS delivered (destination TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""
# Columns added after the first release, to queues made before (ALTER TABLE when missing).
_ADDED = {
    "series_instance_uid": "TEXT NOT NULL DEFAULT ''",
    "project": "TEXT NOT NULL DEFAULT ''",        # [projects.NAME]: sent de-identified
    "sent_uid": "TEXT NOT NULL DEFAULT ''",       # the SOP Instance UID the destination got (de-identified: new)
    "commit_group": "TEXT NOT NULL DEFAULT ''",   # study/series UID a commitment request covers; '': none wanted
    "commit_state": "TEXT",                       # NULL (none wanted), wanted, committed, failed
    "commit_comment": "TEXT NOT NULL DEFAULT ''",
    "commit_tries": "INTEGER NOT NULL DEFAULT 0",  # requests of its group that got no report in time
}
COMMIT_STATES = ("wanted", "committed", "failed")
KEEP_DONE_S = 7 * 24 * 3600  # done and cancelled entries are deleted this long after (the counts stay)


class Entry(NamedTuple):
    """A pending entry as `Queue.due` reads it (a tuple: thousands are read per second
    while a queue drains, and a frozen dataclass's __init__ cost 3 µs each)."""

    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    segment: str
    offset: int
    dataset_length: int
    attempts: int
    project: str = ""
    received_at: int = 0


def path_of(data_dir: Path) -> Path:
    return Path(data_dir) / DIRECTORY / DATABASE


class Queue:
    """One connection to the queue (one per thread: sqlite3 connections are not shared)."""

    def __init__(self, data_dir: Path, *, readonly: bool = False) -> None:
        path = path_of(data_dir)
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(entries)")}
        for column, kind in _ADDED.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")
        self.db.execute("CREATE INDEX IF NOT EXISTS commits ON entries (destination, commit_state, commit_group)")

    def close(self) -> None:
        self.db.close()

    # -- the scanner's side ----------------------------------------------------------

    def cursor(self) -> int | None:
        row = self.db.execute("SELECT received_at FROM cursor").fetchone()
        return None if row is None else row[0]

    def start_cursor(self, received_at: int) -> int:
        """Set the cursor if there is none yet (forwarding starts with what arrives from now)."""
        self.db.execute("INSERT OR IGNORE INTO cursor VALUES (0, ?)", (received_at,))
        return self.cursor()  # type: ignore[return-value]

    def set_cursor(self, received_at: int) -> int:
        """Move the cursor back (a clock stepped back); entries stay unique, so records
        scanned again are not queued twice."""
        with self.db:
            self.db.execute("UPDATE cursor SET received_at = ?", (received_at,))
        return received_at

    def queued_since(self, received_at: int) -> set[tuple[str, int]]:
        """(SOP Instance UID, received_at) of the entries of records received after a time."""
        return {(u, r) for u, r in self.db.execute(
            "SELECT DISTINCT sop_instance_uid, received_at FROM entries WHERE received_at > ?", (received_at,))}

    def add(self, rows: Iterable[tuple], cursor: int, holds: Iterable[tuple[str, str, str, str, float]] = ()) -> int:
        """Queue (destination, rule, sop_instance_uid, sop_class_uid, transfer_syntax_uid,
        study_instance_uid, segment, offset, dataset_length, received_at, series_instance_uid,
        next_at[, project, commit_group]) rows, hold the pending entries of series and studies that are not quiet yet
        (destination, rule, "series" or "study", its UID, not before), and move the cursor,
        in one durable transaction. Returns the number of new entries."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            before = self.db.total_changes
            self.db.executemany(
                "INSERT OR IGNORE INTO entries (destination, rule, sop_instance_uid, sop_class_uid, "
                "transfer_syntax_uid, study_instance_uid, segment, \"offset\", dataset_length, received_at, "
                "series_instance_uid, next_at, project, commit_group, commit_state, queued_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*r[:12], *(r[12:14] if len(r) > 12 else ("", "")),
                  "wanted" if len(r) > 13 and r[13] else None, now) for r in rows])
            added = self.db.total_changes - before
            for destination, rule, level, uid, until in holds:
                column = "series_instance_uid" if level == "series" else "study_instance_uid"
                self.db.execute(f"UPDATE entries SET next_at = max(next_at, ?) WHERE destination = ? AND rule = ? "
                                f"AND {column} = ? AND state = 'pending' AND attempts = 0",
                                (until, destination, rule, uid))
            self.db.execute("UPDATE cursor SET received_at = max(received_at, ?)", (cursor,))
        return added

    # -- the deliverers' side ----------------------------------------------------------

    def due(self, destination: str, limit: int, waiting: list[str] | None = None,
            now: float | None = None, scanned_through: float | None = None,
            after: tuple[int, int] | None = None) -> list[Entry]:
        """Pending entries whose time has come, in order of arrival; none of the rules
        named in `waiting` (outside their schedule); with `after` (received_at, id), only
        those that arrived after that entry. An entry held for its series' or
        study's quiet time (next_at set by a scan, never tried) is due only once the
        scanner has looked at every record stamped before that time (`scanned_through`):
        an instance of the group that arrived within the quiet time has then extended
        the hold, however far the scanner lags.

        Read in order of arrival from an index (due_in_order) and stopped at `limit`:
        SQLite would otherwise take the `due` index and sort every due entry for each
        top-up (77 ms at 100,000 pending, each 512 entries sent; 6 ms this way)."""
        now = time.time() if now is None else now
        held = now if scanned_through is None else min(now, scanned_through)
        received_at, last_id = after if after is not None else (-1, -1)
        rows = self.db.execute(
            "SELECT id, destination, sop_instance_uid, sop_class_uid, transfer_syntax_uid, segment, \"offset\", "
            "dataset_length, attempts, project, received_at FROM entries INDEXED BY due_in_order "
            "WHERE destination = ? AND state = 'pending' AND (received_at, id) > (?, ?) AND next_at <= ? "
            "AND (attempts > 0 OR next_at <= ?) "
            "AND rule NOT IN (SELECT value FROM json_each(?)) ORDER BY received_at, id LIMIT ?",
            (destination, received_at, last_id, now, held, json.dumps(waiting or []), limit)).fetchall()
        return [Entry._make(r) for r in rows]

    def next_due(self, destination: str) -> float | None:
        row = self.db.execute("SELECT min(next_at) FROM entries WHERE destination = ? AND state = 'pending'",
                              (destination,)).fetchone()
        return row[0]

    def settle(self, done: list[tuple], parked: list[tuple[int, int | None, str]],
               retry: list[tuple[int, float, int | None, str]]) -> None:
        """Record a batch's outcomes: done (id, status[, SOP Instance UID sent]); parked (id,
        status, comment); retry (id, next_at, status, comment)."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE entries SET state = 'done', status = ?, done_at = ?, attempts = attempts + 1, "
                                "sent_uid = ? WHERE id = ?",
                                [(d[1], now, d[2] if len(d) > 2 else "", d[0]) for d in done])
            if done:
                self.db.execute("INSERT INTO delivered SELECT destination, ? FROM entries WHERE id = ? "
                                "ON CONFLICT (destination) DO UPDATE SET n = n + excluded.n",
                                (len(done), done[0][0]))
            self.db.executemany("UPDATE entries SET state = 'parked', status = ?, comment = ?, done_at = ?, "
                                "attempts = attempts + 1 WHERE id = ?", [(s, c, now, i) for i, s, c in parked])
            self.db.executemany("UPDATE entries SET next_at = ?, status = ?, comment = ?, attempts = attempts + 1 "
                                "WHERE id = ?", [(t, s, c, i) for i, t, s, c in retry])

    # -- storage commitment ------------------------------------------------------------

    def commit_groups(self, destination: str) -> list[tuple[str, str, float]]:
        """(rule, group UID, newest arrival in s) of the groups whose commitment is wanted and
        whose every entry was answered: none pending, at least one done."""
        return self.db.execute(
            "SELECT rule, commit_group, max(received_at) / 1e6 FROM entries WHERE destination = ? "
            "AND commit_state = 'wanted' GROUP BY rule, commit_group "
            "HAVING sum(state = 'pending') = 0 AND sum(state = 'done') > 0", (destination,)).fetchall()

    def commit_members(self, destination: str, rule: str, group: str) -> list[tuple[int, str, str]]:
        """(id, SOP Class UID, SOP Instance UID as sent) of a group's delivered entries."""
        return self.db.execute(
            "SELECT id, sop_class_uid, CASE sent_uid WHEN '' THEN sop_instance_uid ELSE sent_uid END FROM entries "
            "WHERE destination = ? AND rule = ? AND commit_group = ? AND commit_state = 'wanted' AND state = 'done' "
            "ORDER BY id", (destination, rule, group)).fetchall()

    def record_commitment(self, verdicts: list[tuple[int, str, str]], destination: str = "", rule: str = "",
                          group: str = "") -> None:
        """(id, committed or failed, comment) per entry; a group's entries that were never
        delivered (parked, cancelled) are no longer waited for."""
        with self.db:
            self.db.executemany("UPDATE entries SET commit_state = ?, commit_comment = ? WHERE id = ?",
                                [(state, comment, i) for i, state, comment in verdicts])
            if group:
                self.db.execute("UPDATE entries SET commit_state = NULL WHERE destination = ? AND rule = ? "
                                "AND commit_group = ? AND commit_state = 'wanted' AND state IN ('parked', 'cancelled')",
                                (destination, rule, group))

    def no_report(self, ids: list[int], comment: str) -> int:
        """A commitment request for these entries got no report: count it, keep why; the
        most requests any of them has had without a report."""
        with self.db:
            self.db.executemany("UPDATE entries SET commit_tries = commit_tries + 1, commit_comment = ? WHERE id = ?",
                                [(comment, i) for i in ids])
            row = self.db.execute("SELECT max(commit_tries) FROM entries WHERE id IN (SELECT value FROM json_each(?))",
                                  (json.dumps(ids),)).fetchone()
        return row[0] or 0

    def commitments(self) -> dict[tuple[str, str], int]:
        """(destination, wanted/committed/failed) -> entries."""
        return {(d, s): n for d, s, n in self.db.execute(
            "SELECT destination, commit_state, count(*) FROM entries WHERE commit_state IS NOT NULL "
            "GROUP BY destination, commit_state")}

    def not_committed(self, destination: str | None = None, state: str = "failed") -> list[tuple]:
        """(destination, UID as sent, why) of the entries whose commitment failed; with
        state="wanted", of those still wanted after a request that got no report."""
        sql = ("SELECT destination, CASE sent_uid WHEN '' THEN sop_instance_uid ELSE sent_uid END, commit_comment "
               "FROM entries WHERE commit_state = ? AND commit_comment != ''"
               + (" AND destination = ?" if destination else "") + " ORDER BY id")
        return self.db.execute(sql, (state, destination) if destination else (state,)).fetchall()

    # -- operators ---------------------------------------------------------------------

    def summary(self) -> dict[tuple[str, str], tuple[int, float | None]]:
        """(destination, state) -> (entries, the oldest one's queued_at)."""
        return {(d, s): (n, oldest) for d, s, n, oldest in self.db.execute(
            "SELECT destination, state, count(*), min(queued_at) FROM entries GROUP BY destination, state")}

    def delivered(self) -> dict[str, int]:
        """Entries delivered per destination, ever (pruning keeps these counts)."""
        return dict(self.db.execute("SELECT destination, n FROM delivered"))

    def prune(self, older_than: float = KEEP_DONE_S) -> int:
        """Delete done and cancelled entries finished longer ago than `older_than` seconds."""
        with self.db:
            cur = self.db.execute("DELETE FROM entries WHERE state IN ('done', 'cancelled') AND done_at < ?",
                                  (time.time() - older_than,))
        return cur.rowcount

    def retrying(self) -> list[tuple[str, int, str]]:
        """(destination, attempts, why) of each destination whose pending entries failed to
        go: the reason of its most tried one (unreachable, association rejected...)."""
        return self.db.execute(
            "SELECT destination, max(attempts), comment FROM entries WHERE state = 'pending' AND attempts > 0 "
            "AND comment != '' GROUP BY destination ORDER BY destination").fetchall()

    def parked(self, destination: str | None = None) -> list[tuple]:
        sql = ("SELECT destination, sop_instance_uid, status, comment FROM entries WHERE state = 'parked'"
               + (" AND destination = ?" if destination else "") + " ORDER BY id")
        return self.db.execute(sql, (destination,) if destination else ()).fetchall()

    def retry_parked(self, destination: str) -> int:
        """Parked entries of a destination back to pending (after the cause was fixed), and
        its commitments failed for want of a report wanted again; the number of the former."""
        with self.db:
            cur = self.db.execute("UPDATE entries SET state = 'pending', next_at = 0, done_at = NULL "
                                  "WHERE destination = ? AND state = 'parked'", (destination,))
            self.db.execute("UPDATE entries SET commit_state = 'wanted', commit_tries = 0, commit_comment = '' "
                            "WHERE destination = ? AND commit_state = 'failed' AND commit_tries > 0", (destination,))
        return cur.rowcount

    def pending_uids(self) -> list[str]:
        return [u for u, in self.db.execute("SELECT DISTINCT sop_instance_uid FROM entries WHERE state = 'pending'")]

    def pending_records(self) -> list[tuple[str, int]]:
        """(SOP Instance UID, received_at) of the records pending entries are for."""
        return self.db.execute("SELECT DISTINCT sop_instance_uid, received_at FROM entries "
                               "WHERE state = 'pending'").fetchall()

    def cancel_uids(self, uids: list[str], comment: str) -> int:
        """Cancel the pending entries of these instances (deleted or rejected meanwhile)."""
        with self.db:
            cur = self.db.executemany("UPDATE entries SET state = 'cancelled', comment = ?, done_at = ? "
                                      "WHERE sop_instance_uid = ? AND state = 'pending'",
                                      [(comment, time.time(), u) for u in uids])
        return cur.rowcount

    def cancel_records(self, records: list[tuple[str, int]], comment: str) -> int:
        """Cancel the pending entries of these records ((UID, received_at): deleted, or
        deleted and its UID sent again since, a record of its own)."""
        with self.db:
            cur = self.db.executemany("UPDATE entries SET state = 'cancelled', comment = ?, done_at = ? "
                                      "WHERE sop_instance_uid = ? AND received_at = ? AND state = 'pending'",
                                      [(comment, time.time(), u, r) for u, r in records])
        return cur.rowcount

    def cancel_ids(self, ids: list[int], comment: str) -> None:
        with self.db:
            self.db.executemany("UPDATE entries SET state = 'cancelled', comment = ?, done_at = ? WHERE id = ?",
                                [(comment, time.time(), i) for i in ids])

    def cancel(self, destination: str) -> int:
        """Pending and parked entries of a destination: never to be sent."""
        with self.db:
            cur = self.db.execute("UPDATE entries SET state = 'cancelled', done_at = ? "
                                  "WHERE destination = ? AND state IN ('pending', 'parked')",
                                  (time.time(), destination))
        return cur.rowcount
