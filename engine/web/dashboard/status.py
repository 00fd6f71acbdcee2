"""The dashboard's figures, gathered in one place from where the archive already keeps
them: the catalog (holdings, the last hour of ingest by minute), the data directory
(segments, free space, the scrub's state, corrupt marks, migration checkpoints), the
kernel (live writers, open associations: activity.py), the audit log (audit_tail.py) and,
when `metrics_port` is set, the acceptor's Prometheus counters (engine/metrics.py)."""
from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stowage.catalog.reader import Catalog
from stowage.engine.lifecycle import scrub
from stowage.engine.lifecycle.compaction import JOURNAL
from stowage.engine.migrate import checkpoint
from stowage.engine.runtime.config import Config
from stowage.engine.store import integrity
from stowage.engine.store.usage import segment_usage
from stowage.engine.web.dashboard import activity
from stowage.engine.web.dashboard.audit_tail import AuditTail

HOUR = 3600
FRESH = 2.0  # seconds a gathered status is served again before it is gathered anew
# The catalog's figures cost time proportional to the archive (about 0.15 s per 50,000
# instances): they are gathered again only once this many times their last cost has passed,
# so a dashboard left open on a large archive takes at most a twentieth of a core.
CATALOG_COST_FACTOR = 20

HOLDINGS_SQL = """
SELECT count(DISTINCT patient_id), count(DISTINCT study_instance_uid), count(DISTINCT series_instance_uid),
       count(*), coalesce(sum(dataset_length), 0), coalesce(sum(stored_length), 0),
       coalesce(sum(record_length), 0)
FROM instances"""
RECORDS_SQL = "SELECT count(*), coalesce(sum(record_length), 0) FROM records"
SYNTAXES_SQL = """SELECT transfer_syntax_uid, count(*) AS n, sum(dataset_length) FROM instances
                  GROUP BY 1 ORDER BY n DESC LIMIT 8"""
INGEST_SQL = """
SELECT epoch(date_trunc('minute', received_at))::BIGINT AS minute, count(*), coalesce(sum(dataset_length), 0)
FROM records WHERE received_at >= ? GROUP BY 1 ORDER BY 1"""
SENDERS_SQL = """
SELECT calling_ae, count(*) AS n, coalesce(sum(dataset_length), 0)
FROM records WHERE received_at >= ? GROUP BY 1 ORDER BY n DESC LIMIT 8"""


class Status:
    """One per HTTP process: a read-only catalog view and the audit tail, kept open."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self._catalog: Catalog | None = None
        self.audit = AuditTail(self.data_dir / "audit.jsonl")
        self._lock = threading.Lock()
        self._last: tuple[float, dict] | None = None
        self._figures: tuple[float, dict] | None = None  # (when they may be gathered again, figures)

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()

    def gather(self) -> dict[str, Any]:
        """Everything the dashboard shows, as plain JSON values (blocking: run in a thread)."""
        with self._lock:
            now = time.time()
            if self._last and now - self._last[0] < FRESH:
                return self._last[1]
            self.audit.refresh()
            if self._figures is None or now >= self._figures[0]:
                started = time.monotonic()
                figures = self._catalog_figures(now)
                self._figures = (now + CATALOG_COST_FACTOR * (time.monotonic() - started), figures)
            out = {"at": now, "aet": self.config.aet, "ports": self._ports(), **self._figures[1],
                   "storage": self._storage(), "activity": self._activity(), "integrity": self._integrity(),
                   "migrations": self._migrations(), "metrics": self._metrics(),
                   "audit": [_event(e) for e in self.audit.recent(20)]}
            out["ingest"] = {**out["ingest"], "per_instance_ms": {
                str(k): round(v, 2) for k, v in self.audit.per_instance_ms(now - HOUR).items()}}
            self._last = (now, out)
            return out

    def _ports(self) -> dict[str, int]:
        return {"dicom": self.config.port, "dicom_tls": self.config.tls_port, "metrics": self.config.metrics_port}

    def _catalog_figures(self, now: float) -> dict[str, Any]:
        catalog_dir = self.data_dir / "catalog"
        if not catalog_dir.is_dir():
            return {"holdings": None, "ingest": {"minutes": [], "senders": []}, "syntaxes": [], "reclaimable": None}
        if self._catalog is None:
            self._catalog = Catalog(catalog_dir, self.config.duplicates)
        since = datetime.fromtimestamp(now - HOUR, timezone.utc)

        def work(execute):
            return (execute(HOLDINGS_SQL)[1][0], execute(RECORDS_SQL)[1][0], execute(SYNTAXES_SQL)[1],
                    execute(INGEST_SQL, [since])[1], execute(SENDERS_SQL, [since])[1])
        (patients, studies, series, instances, dataset, stored, live), (records, all_bytes), syntaxes, minutes, \
            senders = self._catalog.snapshot(work)
        return {
            "holdings": {"patients": patients, "studies": studies, "series": series, "instances": instances,
                         "dataset_bytes": int(dataset), "stored_bytes": int(stored),
                         "compression": round(dataset / stored, 2) if stored else None},
            "syntaxes": [{"uid": uid, "name": _syntax_name(uid), "instances": n, "bytes": int(b or 0)}
                         for uid, n, b in syntaxes],
            "reclaimable": {"records": records - instances, "bytes": int(all_bytes - live)},
            "ingest": {"minutes": [{"minute": m, "instances": n, "bytes": int(b)} for m, n, b in minutes],
                       "senders": [{"calling_ae": ae, "instances": n, "bytes": int(b)} for ae, n, b in senders]},
        }

    def _storage(self) -> dict[str, Any]:
        try:
            disk = shutil.disk_usage(self.data_dir)
        except OSError:
            return {}
        local, bucket = segment_usage(self.data_dir)  # this node's own segments: what its quota counts
        return {"segments_bytes": local + bucket, "segments_local_bytes": local, "segments_bucket_bytes": bucket,
                "bucket": self.config.storage or None, "catalog_bytes": _tree_bytes(self.data_dir / "catalog"),
                "free_bytes": disk.free, "disk_bytes": disk.total, "min_free_bytes": self.config.min_free_bytes,
                "quota_bytes": self.config.max_storage_bytes, "quota_policy": self.config.quota_policy}

    def _activity(self) -> dict[str, Any]:
        writers = activity.writers(self.data_dir)
        ports = tuple(p for p in (self.config.port, self.config.tls_port) if p)
        return {"workers": sum(w.role == "worker" for w in writers), "worker_count": self.config.worker_count,
                "associations": activity.open_associations(ports),
                "writers": [w.__dict__ for w in writers if w.role != "worker"],
                "compaction_running": any(w.role == "compaction" for w in writers)
                or (self.data_dir / "segments" / JOURNAL).exists()}

    def _integrity(self) -> dict[str, Any]:
        state = scrub.load_state(self.data_dir)
        marked, found = integrity.marks_of(self.data_dir).counts()
        return {"corrupt_marked": marked, "corrupt_found": found, "scrub_rate": self.config.scrub_rate,
                "scrub_passes": state.passes, "scrub_bytes": state.bytes, "scrub_segment": state.segment,
                "scrub_pass_started": state.pass_started or None,
                "scrub_last_pass_seconds": state.last_pass_seconds or None}

    def _migrations(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted((self.data_dir / "migrate").glob("*.sqlite")):
            try:
                con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
                try:
                    t = checkpoint.totals(con)
                    source = con.execute("SELECT value FROM meta WHERE key = 'source'").fetchone()
                finally:
                    con.close()
            except sqlite3.Error:
                continue
            t["source"] = source[0] if source else path.stem
            # WAL mode: what was written last may still be in the -wal file
            t["updated"] = max(p.stat().st_mtime for p in (path, path.with_name(path.name + "-wal")) if p.exists())
            out.append(t)
        return out

    def _metrics(self) -> dict[str, float] | None:
        """The acceptor's counters, when it serves them (metrics_port)."""
        if not self.config.metrics_port:
            return None
        host = "127.0.0.1" if self.config.bind in ("0.0.0.0", "", "::") else self.config.bind
        try:
            with urllib.request.urlopen(f"http://{host}:{self.config.metrics_port}/metrics", timeout=1.0) as r:
                text = r.read(1 << 20).decode()
        except OSError:
            return None
        from prometheus_client.parser import text_string_to_metric_families
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{label}}}" if label else "")] = s.value
        return out


def _tree_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def _syntax_name(uid: str | None) -> str:
    from pydicom.uid import UID
    return UID(uid).name if uid else "?"


KEEP = ("ts", "event", "msg", "peer", "calling_ae", "called_ae", "outcome", "stored", "refused", "seconds",
        "bytes", "reason", "actor")


def _event(d: dict) -> dict:
    return {k: d[k] for k in KEEP if k in d}
