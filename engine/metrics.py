"""Prometheus metrics on `metrics_port` (GET /metrics), served by the acceptor.

The acceptor counts what it sees itself (associations admitted and rejected, workers
ready and restarted) and reads the free space of the data directory when scraped. Each
worker counts its C-STOREs in memory (`StoreCounts`, a few integer additions per store)
and reports its totals over its control channel at most once a second; a worker that
dies keeps what it last reported. No shared memory maps: a full disk must not be able
to kill a process through them (see catalog/versions.py).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Callable, Iterator

log = logging.getLogger("stowage.metrics")

OUTCOMES = ("success", "warning", "failure")
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
REPORT = b"S"  # control-channel message: b"S" + JSON of a worker's totals


def outcome(status: int) -> str:
    return "success" if status == 0 else "warning" if status in WARNING_STATUSES else "failure"


class StoreCounts:
    """One worker's C-STORE totals since it started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stores = dict.fromkeys(OUTCOMES, 0)
        self.bytes = 0

    def stored(self, status: int, length: int) -> None:
        key = outcome(status)
        with self._lock:
            self.stores[key] += 1
            if key != "failure":
                self.bytes += length

    def report(self) -> bytes:
        with self._lock:
            return REPORT + json.dumps({"stores": self.stores, "bytes": self.bytes}).encode()


class ArchiveMetrics:
    """The acceptor's view: its own counters plus the workers' last reports."""

    def __init__(self, data_dir: os.PathLike, workers: Callable[[], tuple[int, int]]) -> None:
        self.data_dir = data_dir
        self.workers = workers  # () -> (connections open on the workers, workers ready)
        self.admitted = 0
        self.rejected = 0
        self.restarts = 0
        self._reports: dict[int, dict] = {}      # slot -> the running worker's last report
        self._gone = {"stores": dict.fromkeys(OUTCOMES, 0), "bytes": 0}  # from workers that died

    def worker_report(self, slot: int, payload: bytes) -> None:
        try:
            self._reports[slot] = json.loads(payload)
        except ValueError:
            log.warning("worker %d sent an unreadable metrics report", slot)

    def worker_gone(self, slot: int) -> None:
        last = self._reports.pop(slot, None)
        if last is not None:
            for k in OUTCOMES:
                self._gone["stores"][k] += int(last["stores"].get(k, 0))
            self._gone["bytes"] += int(last.get("bytes", 0))

    def totals(self) -> tuple[dict[str, int], int]:
        stores, nbytes = dict(self._gone["stores"]), self._gone["bytes"]
        for r in list(self._reports.values()):
            for k in OUTCOMES:
                stores[k] += int(r["stores"].get(k, 0))
            nbytes += int(r.get("bytes", 0))
        return stores, nbytes

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        stores, nbytes = self.totals()
        c = CounterMetricFamily("stowage_stores", "C-STOREs answered, by outcome of the status", labels=["outcome"])
        for k in OUTCOMES:
            c.add_metric([k], stores[k])
        yield c
        yield CounterMetricFamily("stowage_stored_bytes", "Dataset bytes of the C-STOREs answered success or warning",
                                  value=nbytes)
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
        try:
            st = os.statvfs(self.data_dir)
            yield GaugeMetricFamily("stowage_free_bytes", "Free bytes on the data directory's file system",
                                    value=st.f_bavail * st.f_frsize)
        except OSError:
            pass


def serve(metrics: ArchiveMetrics, bind: str, port: int) -> None:
    """Serve /metrics on bind:port from a daemon thread."""
    from prometheus_client import CollectorRegistry, start_http_server
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    start_http_server(port, addr=bind, registry=registry)
