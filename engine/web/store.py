"""What an HTTP process holds of the archive, opened once per process: a catalog view for
queries, another for the lookups of retrievals (so a long QIDO never holds up a frame),
the Archive (its own claimed slot) for STOW-RS, and the thread pool in which all of
their blocking work runs, off the event loop.

The Archive is opened as the process starts, in the pool (claiming a slot, recovering
what a previous holder left, starting its sealer), so that the first STOW-RS costs what
the others do; reads are served meanwhile. A STOW-RS that arrives first waits for it on the lock.

HTTP processes claim writer slots 900..949 (engine/store/slots.py numbering).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

from aiohttp import web

from stowage.catalog.reader import Catalog
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.malloc import keep_large_buffers_in_heap
from stowage.engine.store.archive import Archive
from stowage.engine.store.recovery import recover
from stowage.engine.store.slots import Slot, claim_slot
from stowage.engine.web.part_buffers import PartBuffers
from stowage.engine.web.records import Instance, Reader, SeriesLookups, find
from stowage.engine.store.series_cache import SeriesCache

log = logging.getLogger("stowage.http")
HTTP_FIRST_SLOT, HTTP_LAST_SLOT = 900, 949
_THREADS = 8
T = TypeVar("T")


def spool_dir(data_dir: Path) -> Path:
    """Where STOW-RS bodies are spooled as they arrive (engine/web/stow.py)."""
    return data_dir / "spool" / "http"


def sweep_spool(data_dir: Path) -> None:
    """Remove spool files left by HTTP processes that died (their pid no longer runs)."""
    folder = spool_dir(data_dir)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        pid = name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            (folder / name).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class WebStore:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = config.data_dir
        sweep_spool(config.data_dir)
        self.segments = config.data_dir / "segments"
        self.catalog = Catalog(config.data_dir / "catalog", config.duplicates, cluster=config.cluster_view)
        self.lookups = Catalog(config.data_dir / "catalog", config.duplicates, cluster=config.cluster_view)
        self.reader = Reader(config.data_dir, config.duplicates, cluster=config.cluster_view)
        self.series_lookups = SeriesLookups(self.lookups)
        self.series_cache = SeriesCache(config.data_dir)
        self.parts = PartBuffers()  # WADO-RS's, reused part to part
        self.pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="web")
        self._archive: Archive | None = None
        self._slot: Slot | None = None
        self._archive_lock = threading.Lock()

    def find(self, study: str, series: str | None = None, instance: str | None = None) -> list[Instance]:
        """records.find on the lookups' catalog; one instance from its series' kept rows."""
        if series is not None and instance is not None:
            return self.series_lookups.instance(study, series, instance)
        return find(self.lookups, study, series, instance)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the pool, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))

    def archive(self) -> Archive:
        """The store path (claimed at the first STOW: a process that only serves reads
        holds no writer slot). Blocking: call it in the pool."""
        with self._archive_lock:
            if self._archive is None:
                # STOW-RS parts, their shuffled copies and zstd frames are CT-sized: from the
                # heap, reused, rather than fresh mmaps faulted in page by page (as in DIMSE
                # workers). Here, not at __init__: a process that only reads (or a test that
                # makes a WebStore in its own process) keeps glibc's defaults.
                keep_large_buffers_in_heap()
                self._slot = claim_slot(self.data_dir, HTTP_FIRST_SLOT, HTTP_LAST_SLOT)
                recover(self.data_dir, self._slot.number)  # a previous holder may have died mid-write
                self._archive = Archive(self.config, self._slot.number)
                log.info("http store path on slot %03d", self._slot.number)
            return self._archive

    def open_archive(self) -> None:
        """archive(), at start-up: a failure is logged and the first STOW-RS tries again
        (and answers its own error)."""
        try:
            self.archive()
        except Exception as e:  # e.g. no free slot, a read-only data directory
            log.warning("http store path not opened at start (%s); the first STOW-RS tries again", e)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self._archive is not None:
            self._archive.close()
        if self._slot is not None:
            self._slot.release()
        self.catalog.close()
        self.lookups.close()
        self.reader.close()


STORE = web.AppKey("store", WebStore)


def store_context(config: Config) -> Callable:
    """For app.cleanup_ctx: the process's WebStore for the life of the application."""
    async def context(app: web.Application):
        app[STORE] = store = WebStore(config)
        opened = asyncio.get_running_loop().run_in_executor(store.pool, store.open_archive)
        yield
        await opened
        await asyncio.get_running_loop().run_in_executor(None, app[STORE].close)
    return context
