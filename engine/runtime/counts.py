"""Per-process counters a worker reports to the acceptor (engine/metrics.py serves them):
an integer addition under a lock per event, sent over the control channel at most once a
second as REPORT + JSON."""
from __future__ import annotations

import json
import threading

from stowage.protocol.status import STORE_WARNINGS, SUCCESS

OUTCOMES = ("success", "warning", "failure")
# Every resource limit a peer or a file can run into (docs/configuration.md, Limits): what
# stowage_limit_refusals{limit=...} counts, each refusal once, in the process that refused.
LIMITS = ("inflated_bytes", "command_bytes", "nesting_depth", "association_request_timeout",
          "associations_per_address", "commitment_references", "commitments_pending_per_ae", "spool_bytes",
          "free_space", "record_length", "wildcard")
REPORT = b"S"  # control-channel message: b"S" + JSON of a worker's totals


def outcome(status: int) -> str:
    return "success" if status == SUCCESS else "warning" if status in STORE_WARNINGS else "failure"


class WorkerCounts:
    """One worker's totals since it started, as flat counters: "stores|<outcome>",
    "stored_bytes", "retrieve|<C-MOVE or C-GET>|<completed, failed or warning>",
    "retrieved_bytes|<kind>", "finds", "limit|<LIMITS name>"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n: dict[str, int] = {f"stores|{k}": 0 for k in OUTCOMES}
        self._n["stored_bytes"] = 0

    def refused(self, limit: str) -> None:
        """A refusal because of one of LIMITS."""
        self.add(f"limit|{limit}")

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._n[key] = self._n.get(key, 0) + n

    def stored(self, status: int, length: int) -> None:
        key = outcome(status)
        with self._lock:
            self._n[f"stores|{key}"] += 1
            if key != "failure":
                self._n["stored_bytes"] += length

    def retrieved(self, kind: str, completed: int, failed: int, warning: int, nbytes: int) -> None:
        with self._lock:
            for state, n in (("completed", completed), ("failed", failed), ("warning", warning)):
                key = f"retrieve|{kind}|{state}"
                self._n[key] = self._n.get(key, 0) + n
            key = f"retrieved_bytes|{kind}"
            self._n[key] = self._n.get(key, 0) + nbytes

    def report(self) -> bytes:
        with self._lock:
            return REPORT + json.dumps(self._n).encode()


counts = WorkerCounts()  # this process's, when it is a worker
