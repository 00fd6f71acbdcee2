"""Compaction and the delete-oldest quota inside `stowage serve`: one background thread
in the acceptor process."""
from __future__ import annotations

import logging
import threading

from stowage.engine.lifecycle.compaction import CompactionBusy, CompactionStopped, compact
from stowage.engine.lifecycle.quota import enforce
from stowage.engine.runtime.config import Config

log = logging.getLogger("stowage.compaction")


class Background:
    """Compaction inside `stowage serve`: a pass every `compact_interval` seconds at
    `compact_rate` MB/s, in one process (the acceptor); skipped while `stowage compact`
    runs. Also where the delete-oldest quota is enforced (engine.lifecycle.quota)."""

    def __init__(self, config: Config, first_delay: float = 5.0) -> None:
        self.config = config
        self.first_delay = first_delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compaction", daemon=True)

    def start(self) -> "Background":
        if self.config.compact_interval > 0 or self.config.max_storage_bytes:
            self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the round in progress to roll back and no other to start (the copy's rate
        limiter wakes at once; unthrottled, it checks per chunk): called as `serve` begins
        to drain, so that the round does not go on while the workers finish."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop, rolling back a round in progress, and wait for the thread."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        wait = self.first_delay
        while not self._stop.wait(wait):
            wait = self.config.compact_interval or 60.0
            try:
                if self.config.max_storage_bytes and self.config.quota_policy == "delete-oldest":
                    if enforce(self.config, self._stop):
                        wait = min(wait, 5.0)  # deleted: compact soon, check again soon
                if self.config.compact_interval > 0 and not self._stop.is_set():
                    r = compact(self.config, stop=self._stop)
                    if r.rewritten:
                        log.info("background compaction: %d segment(s) rewritten, %.1f MB reclaimed, %.1f MB/s",
                                 len(r.rewritten), r.reclaimed / 1e6, r.mb_per_s)
            except (CompactionBusy, CompactionStopped):
                continue
            except Exception:
                log.exception("background compaction failed; will retry")
