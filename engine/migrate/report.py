"""The migration's outcome for a person: `--status` from the checkpoint (read-only, while
a migration runs or after), and the final report, also written as CSV (one row per study)
and JSON (totals, failed studies, possibly incomplete windows) next to the checkpoint."""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from stowage.engine.migrate.checkpoint import CheckpointUnreadable, connect, totals

_STUDY_COLUMNS = ("uid", "patient_id", "study_date", "modalities", "state", "attempts", "expected", "received",
                  "verified", "bytes", "verified_by", "last_error")


def summary(con: sqlite3.Connection) -> dict[str, Any]:
    t = totals(con)
    t["failed"] = [dict(zip(("uid", "patient_id", "study_date", "attempts", "reason"), r)) for r in con.execute(
        "SELECT uid, patient_id, study_date, attempts, last_error FROM studies WHERE state = 'failed' ORDER BY uid")]
    t["retrying"] = [dict(zip(("uid", "attempts", "next_attempt", "reason"), r)) for r in con.execute(
        "SELECT uid, attempts, next_attempt, last_error FROM studies WHERE state = 'pending' AND attempts > 0 "
        "ORDER BY next_attempt LIMIT 20")]
    t["incomplete_windows"] = [dict(zip(("window", "state", "note"), r)) for r in con.execute(
        "SELECT key, state, note FROM windows WHERE state IN ('incomplete', 'failed', 'pending') ORDER BY key")]
    t["meta"] = dict(con.execute("SELECT key, value FROM meta").fetchall())
    return t


def lines(s: dict[str, Any]) -> list[str]:
    """The report as a person reads it."""
    mb = s["bytes"] / 1e6
    out = [f"source {s['meta'].get('source', '?')} by C-{s['meta'].get('method', 'move').upper()}",
           f"studies: {s['studies']} found, {s['studies_done']} done, {s['studies_failed']} failed, "
           f"{s['studies_in_flight']} in flight, {s['studies_pending']} pending"
           + (f" ({s['studies_waiting_retry']} waiting to retry)" if s["studies_waiting_retry"] else ""),
           f"instances: {s['instances_expected']} expected"
           + (f" (+{s['studies_count_unknown']} studies of unknown size)" if s["studies_count_unknown"] else "")
           + f", {s['instances_received']} received, {s['instances_verified']} verified, {mb:.1f} MB"]
    windows = s["windows"]
    out.append("enumeration: " + ", ".join(f"{n} window(s) {state}" for state, n in sorted(windows.items()))
               if windows else "enumeration: not started")
    for w in s["incomplete_windows"]:
        if w["state"] != "pending":
            out.append(f"  possibly incomplete window {w['window']}: {w['state']} ({w['note']})")
    for f in s["failed"]:
        out.append(f"  failed study {f['uid']} (patient {f['patient_id']}, {f['study_date'] or 'no date'}, "
                   f"{f['attempts']} attempts): {f['reason']}")
    for r in s["retrying"]:
        when = max(0.0, (r["next_attempt"] or 0) - time.time())
        out.append(f"  retrying study {r['uid']} in {when:.0f} s (attempt {r['attempts']}): {r['reason']}")
    return out


def status(path: Path) -> list[str]:
    """--status: the checkpoint's counts, without taking the migration's lock."""
    con = connect(path, readonly=True)
    try:
        return lines(summary(con))
    except sqlite3.DatabaseError as e:
        raise CheckpointUnreadable(path, e) from None
    finally:
        con.close()


def write(path: Path, s: dict[str, Any], con: sqlite3.Connection) -> tuple[Path, Path]:
    """<checkpoint>-report.csv (every study) and -report.json, each replaced atomically."""
    csv_path = path.with_name(path.stem + "-report.csv")
    json_path = path.with_name(path.stem + "-report.json")
    tmp = csv_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_STUDY_COLUMNS)
        w.writerows(con.execute(f"SELECT {', '.join(_STUDY_COLUMNS)} FROM studies ORDER BY state, uid"))
    os.replace(tmp, csv_path)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(s, indent=1, default=str))
    os.replace(tmp, json_path)
    return csv_path, json_path
