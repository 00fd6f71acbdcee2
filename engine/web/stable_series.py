"""Series metadata made ahead of the first request (WADO-RS …/metadata): once a series has
received nothing for `metadata_stable_seconds`, its metadata is made from the catalog's
stored headers and kept in the on-disk series cache (engine/store/series_cache.py), so that
the viewer that opens it first reads one file instead of walking every slice's header
(on a 500-slice CT, ~60 of the ~90 ms of a first request). Orthanc's DICOMweb plugin does
the same for its stable series since 1.15.

It spends mostly CPU the machine does not otherwise use: series are made while the other
processes leave at least a core idle (IDLE_SHARE); on a busy machine, only the series that
has waited longest, once it has waited OVERDUE times the stable age, and one per look (a
500-slice CT every few seconds: ~2% of a core). A bulk ingest so pays next to nothing while
it runs and its series are made once it ends (those past MAX_PENDING on their first
request). One HTTP process does it (the one holding the lock file); should it die, another
takes over at its next look.

Only series whose metadata comes from the catalog's stored headers are made ahead (native
pixels, little endian: the usual CT, MR, CR); one with compressed pixel data would have
every record read for it (from object storage, where segments were evicted), so it is made
on its first request. A series that changes after it was made (an instance more, one
deleted or rejected, a record moved) no longer matches its file's fingerprint: the next
request makes it anew, as does the next look once the series is stable again."""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from typing import Callable

import psutil
from aiohttp import web

from stowage.engine.runtime.config import Config
from stowage.engine.store.series_cache import fingerprint
from stowage.engine.web.metadata import deletions_stamp, from_headers, made_series
from stowage.engine.web.records import find
from stowage.engine.web.store import STORE, WebStore

log = logging.getLogger("stowage.http")

LOOKBACK_S = 2.0  # a record is visible within this of its received_at stamp (engine/forward/scan.py)
START_BACK_S = 600.0  # at start, series stamped this far back are looked at (a restart drops nothing recent)
MAX_PENDING = 100_000  # series waiting to be stable; past it the oldest are left to their first request
IDLE_SHARE = 0.5  # made freely while the other processes keep the CPUs busy less than this share
OVERDUE = 6  # ...else one a look, stable this many times the stable age
_LOCK = ".maker.lock"


class IdleCpu:
    """How busy the machine's CPUs were between calls, leaving out the calling thread's own
    use (making metadata must not read as the machine being busy; requests this process
    serves meanwhile do count). Called from one thread only."""

    def __init__(self) -> None:
        self._last: tuple[float, float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guest time is in user too
        return t.idle + getattr(t, "iowait", 0.0), total, time.thread_time()

    def others_busy(self) -> float:
        """The share of all CPUs (0-1) used by others since the last call; 1.0 at the first."""
        now = self._sample()
        last, self._last = self._last, now
        if last is None:
            return 1.0  # no span yet: taken as busy until the next call measures one
        span = now[1] - last[1]
        if span <= 0:
            return 0.0
        return max(0.0, (span - (now[0] - last[0]) - (now[2] - last[2])) / span)


class StableSeries:
    """Makes the metadata of series that went quiet; a thread of one HTTP process."""

    def __init__(self, store: WebStore, age: float, interval: float | None = None,
                 busy: Callable[[], float] | None = None) -> None:
        self.store = store
        self.age = age
        self.interval = interval or min(max(age / 4, 0.5), 5.0)
        self.pending: dict[str, tuple[str, int]] = {}  # series -> (study, newest received_at, µs)
        self.looked_at: dict[str, int] = {}  # series made (or found current) -> the newest stamp it had
        self.cursor = int((time.time() - START_BACK_S) * 1e6)
        self._busy = busy or IdleCpu().others_busy
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stable-series", daemon=True)

    def start(self) -> "StableSeries":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self._holds_lock():
                    self.look()
                    self.make_due()
            except Exception:  # the catalog mid-rebuild, a full disk: the next look tries again
                log.exception("making the metadata of stable series failed; will retry")

    def _holds_lock(self) -> bool:
        """Whether this process is the one that makes metadata (an flock the kernel drops
        with the process)."""
        if self._lock_fd is not None:
            return True
        folder = self.store.series_cache.folder
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def look(self) -> None:
        """Note the series that received instances since the last look, with their newest
        stamp (a series' newest instance is among those received since, so this is its
        newest of all)."""
        since = self.cursor - int(LOOKBACK_S * 1e6)
        _cols, rows = self.store.catalog.execute(
            "SELECT study_instance_uid, series_instance_uid, max(epoch_us(received_at)) FROM instances "
            "WHERE received_at > to_timestamp(?) GROUP BY 1, 2", [since / 1e6])
        self.looked_at = {k: v for k, v in self.looked_at.items() if v > since}  # out of every later look
        for study, series, newest in rows:
            if series and study and self.looked_at.get(series) != newest:
                self.pending[series] = (study, newest)
                self.cursor = max(self.cursor, newest)
        if len(self.pending) > MAX_PENDING:
            for series, _v in sorted(self.pending.items(), key=lambda kv: kv[1][1])[:len(self.pending) - MAX_PENDING]:
                del self.pending[series]

    def make_due(self) -> int:
        """Make the series quiet for `age` seconds, oldest first, while the machine has a
        core to spare (else the oldest alone, if overdue); the rest wait for the next look.
        Returns how many were made."""
        now = time.time()
        quiet_since, overdue_since = int((now - self.age) * 1e6), int((now - OVERDUE * self.age) * 1e6)
        due = sorted((newest, series, study) for series, (study, newest) in self.pending.items()
                     if newest <= quiet_since)
        made = 0
        for n, (newest, series, study) in enumerate(due):
            if self._stop.is_set() or (self._busy() >= IDLE_SHARE and (n > 0 or newest > overdue_since)):
                break
            del self.pending[series]
            self.looked_at[series] = newest
            try:
                made += self.make(study, series)
            except Exception as e:  # a value nothing can convert: the first request answers (or refuses) it
                log.warning("series %s: metadata not made ahead (%s: %s); it is made on its first request",
                            series, type(e).__name__, str(e)[:200])
        return made

    def make(self, study: str, series: str) -> int:
        """Make one series' metadata unless its kept file is current; 1 when made."""
        stamp = deletions_stamp(self.store)
        members = find(self.store.lookups, study, series, with_header=True)
        if not members or not from_headers(members) or self.store.series_cache.current(series, fingerprint(members)):
            return 0  # gone, its records would all be read (compressed pixels), or made already
        made_series(self.store, study, series, members, stamp)
        log.debug("series %s: metadata of %d instance(s) made ahead", series, len(members))
        return 1


def context(config: Config) -> Callable:
    """For app.cleanup_ctx (after the store's): the maker for the life of the application."""
    async def run(app: web.Application):
        maker = StableSeries(app[STORE], config.metadata_stable_seconds).start() \
            if config.metadata_stable_seconds > 0 else None
        yield
        if maker is not None:
            maker.stop()
    return run
