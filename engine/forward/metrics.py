"""Prometheus families of the forwarding queue, read from the queue database when
/metrics is scraped (no counters kept in memory: the queue is the record)."""
from __future__ import annotations

import os
import sqlite3
import time
from typing import Iterator

from stowage.engine.forward.queue import STATES, Queue, path_of


def forward_metrics(data_dir: os.PathLike) -> Iterator:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    if not path_of(data_dir).is_file():
        return
    try:
        queue = Queue(data_dir, readonly=True)
        try:
            summary, delivered = queue.summary(), queue.delivered()
        finally:
            queue.close()
    except sqlite3.Error:
        return
    depth = GaugeMetricFamily("stowage_forward_entries", "Forwarding queue entries by destination and state "
                              "(pending: not yet delivered; parked: refused, waiting for a person)",
                              labels=["destination", "state"])
    sent = CounterMetricFamily("stowage_forward_delivered", "Instances forwarded and acknowledged by the destination",
                               labels=["destination"])
    age = GaugeMetricFamily("stowage_forward_oldest_pending_seconds", "Age of the oldest pending entry",
                            labels=["destination"])
    now = time.time()
    for destination in sorted({d for d, _s in summary} | set(delivered)):
        sent.add_metric([destination], delivered.get(destination, 0))
        for state in STATES:
            n, oldest = summary.get((destination, state), (0, None))
            if state != "done":
                depth.add_metric([destination, state], n)
            if state == "pending":
                age.add_metric([destination], now - oldest if oldest else 0.0)
    yield depth
    yield sent
    yield age
