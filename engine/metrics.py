"""Prometheus metrics on `metrics_port` (GET /metrics), served by the acceptor.

The acceptor counts what it sees itself (associations admitted and rejected, workers
ready and restarted) and reads the free space of the data directory when scraped. Each
worker counts its C-STOREs, retrieve sub-operations and C-FINDs in memory
(engine/runtime/counts.py, an integer addition under a lock per event) and reports its totals over its control channel
at most once a second; a worker that dies keeps what it last reported. No shared memory maps: a full disk must not be able
to kill a process through them (see catalog/sealed_uids.py).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterator

from stowage.engine.forward.metrics import forward_metrics
from stowage.engine.runtime.counts import LIMITS, OUTCOMES

log = logging.getLogger("stowage.metrics")


class ArchiveMetrics:
    """The acceptor's view: its own counters plus the workers' last reports."""

    def __init__(self, data_dir: os.PathLike, workers: Callable[[], tuple[int, int]]) -> None:
        self.data_dir = data_dir
        self.workers = workers  # () -> (connections open on the workers, workers ready)
        self.admitted = 0
        self.rejected = 0
        self.restarts = 0
        self.limits: dict[str, int] = {}  # the acceptor's own refusals, by LIMITS name
        self._reports: dict[int, dict[str, int]] = {}  # slot -> the running worker's last report
        self._gone: dict[str, int] = {}                 # what workers that died had reported

    def refused(self, limit: str) -> None:
        """The acceptor refused a connection because of one of LIMITS."""
        self.limits[limit] = self.limits.get(limit, 0) + 1

    def worker_report(self, slot: int, payload: bytes) -> None:
        try:
            report = json.loads(payload)
            self._reports[slot] = {str(k): int(v) for k, v in report.items()}
        except (ValueError, TypeError, AttributeError):
            log.warning("worker %d sent an unreadable metrics report", slot)

    def worker_gone(self, slot: int) -> None:
        for k, v in self._reports.pop(slot, {}).items():
            self._gone[k] = self._gone.get(k, 0) + v

    def totals(self) -> dict[str, int]:
        out = dict(self._gone)
        for report in list(self._reports.values()):
            for k, v in report.items():
                out[k] = out.get(k, 0) + v
        return out

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        n = self.totals()
        c = CounterMetricFamily("stowage_stores", "C-STOREs answered, by outcome of the status", labels=["outcome"])
        for k in OUTCOMES:
            c.add_metric([k], n.get(f"stores|{k}", 0))
        yield c
        yield CounterMetricFamily("stowage_stored_bytes", "Dataset bytes of the C-STOREs answered success or warning",
                                  value=n.get("stored_bytes", 0))
        r = CounterMetricFamily("stowage_retrieve_suboperations", "C-MOVE and C-GET sub-operations and "
                                "WADO-RS instances sent, by outcome", labels=["kind", "outcome"])
        rb = CounterMetricFamily("stowage_retrieved_bytes", "Bytes sent by C-MOVE and C-GET sub-operations and WADO-RS",
                                 labels=["kind"])
        for kind in ("C-MOVE", "C-GET", "WADO-RS"):
            for state in ("completed", "failed", "warning"):
                r.add_metric([kind, state], n.get(f"retrieve|{kind}|{state}", 0))
            rb.add_metric([kind], n.get(f"retrieved_bytes|{kind}", 0))
        yield r
        yield rb
        yield CounterMetricFamily("stowage_find_requests", "C-FIND requests answered", value=n.get("finds", 0))
        a = CounterMetricFamily("stowage_associations", "Connections admitted to a worker, or rejected "
                                "(association cap, no worker ready)", labels=["outcome"])
        a.add_metric(["admitted"], self.admitted)
        a.add_metric(["rejected"], self.rejected)
        yield a
        active, ready = self.workers()
        yield GaugeMetricFamily("stowage_associations_active", "Connections open on the workers now", value=active)
        yield GaugeMetricFamily("stowage_workers_ready", "Worker processes ready", value=ready)
        yield CounterMetricFamily("stowage_worker_restarts", "Worker processes restarted after they died",
                                  value=self.restarts)
        refusals = CounterMetricFamily("stowage_limit_refusals", "Refusals because a peer or a file reached a "
                                       "resource limit (docs/configuration.md, Limits)", labels=["limit"])
        for name in LIMITS:
            refusals.add_metric([name], n.get(f"limit|{name}", 0) + self.limits.get(name, 0))
        yield refusals
        yield from self._integrity()
        yield from forward_metrics(self.data_dir)
        try:
            st = os.statvfs(self.data_dir)
            yield GaugeMetricFamily("stowage_free_bytes", "Free bytes on the data directory's file system",
                                    value=st.f_bavail * st.f_frsize)
        except OSError:
            pass


    def _integrity(self) -> Iterator:
        """Corrupt records and the scrub, read from their files (engine/store/integrity.py,
        engine/lifecycle/scrub.py) when scraped: what `stowage verify` marks counts too, and the
        counts survive restarts."""
        from pathlib import Path

        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from stowage.engine.lifecycle import scrub
        from stowage.engine.store import integrity
        marked, found = integrity.marks_of(Path(self.data_dir)).counts()
        yield CounterMetricFamily("stowage_corrupt_records_found", "Records found corrupt (by verify or the "
                                  "scrub) and marked: never sent, failed by storage commitment", value=found)
        yield GaugeMetricFamily("stowage_corrupt_records", "Records marked corrupt now", value=marked)
        state = scrub.load_state(Path(self.data_dir))
        yield CounterMetricFamily("stowage_scrub_read_bytes", "Bytes the background scrub re-read and checked",
                                  value=state.bytes)
        yield CounterMetricFamily("stowage_scrub_passes", "Full passes of the background scrub", value=state.passes)


def serve(metrics: ArchiveMetrics, bind: str, port: int) -> None:
    """Serve /metrics on bind:port from a daemon thread."""
    from prometheus_client import CollectorRegistry, start_http_server
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    start_http_server(port, addr=bind, registry=registry)
