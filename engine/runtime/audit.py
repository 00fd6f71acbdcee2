"""The audit trail of associations and stores, as JSON lines in <data_dir>/audit.jsonl
(one line per association, one per C-STORE), and one human line per association on stderr."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from stowage.engine.runtime.counts import WorkerCounts
from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.runtime.logs import audit_store_line

audit = logging.getLogger("stowage.audit")
log = logging.getLogger("stowage.association")


@dataclass
class AssociationRecord:
    peer: str = ""
    started: float = field(default_factory=time.monotonic)
    statuses: Counter = field(default_factory=Counter)
    bytes_in: int = 0


class Trail:
    """Per-association counters, written out when the association ends."""

    def __init__(self, counts: WorkerCounts | None = None) -> None:
        self._records: dict[int, AssociationRecord] = {}
        self._lock = threading.Lock()
        self.counts = counts or process_counts

    def opened(self, key: int, peer: str) -> None:
        with self._lock:
            self._records[key] = AssociationRecord(peer=peer)

    def stored(self, key: int, calling_ae: str, sop_instance_uid: str, status: int, length: int,
               comment: str = "") -> None:
        rec = self._records.get(key)
        if rec is not None:
            rec.statuses[status] += 1
            rec.bytes_in += length
        self.counts.stored(status, length)
        audit_store_line(sop_instance_uid, status, length, calling_ae, comment)

    def closed(self, key: int, calling_ae: str, called_ae: str, outcome: str, path: str = "") -> None:
        with self._lock:
            rec = self._records.pop(key, AssociationRecord())
        seconds = time.monotonic() - rec.started
        ok = rec.statuses.get(0, 0)
        failed = sum(rec.statuses.values()) - ok
        audit.info("association %s %s", outcome, rec.peer, extra={"fields": {
            "event": "association", "peer": rec.peer, "calling_ae": calling_ae, "called_ae": called_ae,
            "outcome": outcome, "path": path, "seconds": round(seconds, 3), "stored": ok, "refused": failed,
            "bytes": rec.bytes_in}})
        log.info("%s %s from %s (%s): %d stored, %d refused, %.1f MB in %.2f s", outcome, calling_ae or "-",
                 rec.peer, called_ae, ok, failed, rec.bytes_in / 1e6, seconds)


def outcome_of(assoc) -> str:
    """How a pynetdicom association ended, in the trail's words."""
    return "aborted" if assoc.is_aborted else "released" if assoc.is_released else \
        "rejected" if assoc.is_rejected else "closed"
