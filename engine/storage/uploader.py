"""The uploader: a helper process of `stowage serve` (engine.runtime.supervised) when
`storage` names a bucket. Every `upload_interval` seconds it

1. uploads each sealed segment not yet uploaded (not the last of its writer's slot, so
   nothing appends to it any more; catalogued to its end; not retired by a compaction),
   verified by a read-back of size and checksum (objects.py);
2. records it in the manifest (`uploaded`), durably (write, fsync, rename);
3. deletes the objects of segments a compaction retired and purged (a compaction output
   goes up after its journal, compactions.py, which goes once they are deleted), and (every
   WAL_SWEEP_S) the write-ahead objects of durability = "object-store" nothing needs;
   copies the tombstone log whole when it changed (restore.copy_tombstones);
4. evicts, oldest first, local copies of uploaded segments and read-cache blocks while
   they hold more than `local_cache_bytes`.

A local copy is unlinked only after step 2 has landed for it: a `kill -9` at any instant
leaves every segment on local disk, in the bucket, or both, and the next uploader goes
on from the manifest (an upload not yet recorded is simply done again).
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

from stowage.catalog import manifest
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.supervised import SupervisedProcess, child_start, run_exclusively
from stowage.engine.storage.objects import ObjectStore, ObjectStoreError, SegmentConflict, store_for
from stowage.engine.storage import compactions, wal
from stowage.engine.storage.remote import CACHE
from stowage.engine.storage.restore import copy_tombstones

log = logging.getLogger("stowage.uploader")

LOCK = "uploader.lock"
_SEGMENT = re.compile(r"^(\d{3})-(\d{8})\.seg$")
_COMPACT_SLOT = 999          # compaction outputs: sealed once their manifest swap commits
_RESERVED = 1 << 62          # the watermark of a compaction output not yet committed
WAL_SWEEP_S = 30.0           # how often write-ahead objects nothing needs are looked for (wal.sweep)


def sealed_not_uploaded(data_dir: Path, m: manifest.Manifest) -> dict[str, int]:
    """name -> size of the local segments to upload: sealed and immutable from now on."""
    found: dict[str, tuple[int, int, int]] = {}
    try:
        with os.scandir(data_dir / "segments") as it:
            for e in it:
                match = _SEGMENT.match(e.name)
                if match:
                    found[e.name] = (int(match[1]), int(match[2]), e.stat().st_size)
    except FileNotFoundError:
        return {}
    last: dict[int, int] = {}
    for slot, seq, _size in found.values():
        last[slot] = max(last.get(slot, 0), seq)
    return {name: size for name, (slot, seq, size) in sorted(found.items())
            if (slot == _COMPACT_SLOT or seq < last[slot]) and size > 0 and name not in m.uploaded
            and name not in m.retired_segments and _RESERVED > m.sealed_upto(name) >= size}


def compaction_pending(data_dir: Path, m: manifest.Manifest) -> bool:
    """A compaction output not in the bucket yet: what it copied is safe elsewhere only in
    its sources' objects and write-ahead objects, which stay until it is."""
    return any(n.startswith(f"{_COMPACT_SLOT}-") for n in sealed_not_uploaded(data_dir, m))


def upload_sealed(data_dir: Path, store: ObjectStore, stop: threading.Event, ahead: bool = False,
                  refused: dict[str, str] | None = None) -> list[str]:
    """Upload, verify and record every sealed segment not yet uploaded; returns their names.
    `ahead`: durability = object-store, delete each one's write-ahead objects (wal.py) too.
    A segment whose key holds another object stays local and the others go on; it is
    logged once, and noted in `refused` (name -> why) when given."""
    catalog_dir = data_dir / "catalog"
    done = []
    m = manifest.load(catalog_dir)
    refused = {} if refused is None else refused
    for name, size in sealed_not_uploaded(data_dir, m).items():
        if stop.is_set():
            break
        started = time.monotonic()
        if name in m.compactions:  # a compaction output: what it replaced goes first (compactions.py)
            compactions.write(store, name, m.compactions[name])
        try:
            up = store.upload(data_dir / "segments" / name, name)
        except FileNotFoundError:  # a compaction retired and purged it meanwhile
            continue
        except SegmentConflict as e:  # never overwritten; it waits on local disk for an operator
            if name not in refused:
                log.error("%s; %s stays on local disk until the object is moved away", e, name)
            refused[name] = str(e)
            continue
        refused.pop(name, None)
        with manifest.update(catalog_dir) as m:
            if name in m.retired_segments:  # retired meanwhile: its object goes at the next purge
                m.uploaded[name] = {**up.as_record(time.time()), "gone": True}
            else:
                m.uploaded[name] = up.as_record(time.time())
        if ahead:  # durability = object-store: its write-ahead objects are redundant now
            try:
                wal.delete_segment(store, name)
            except ObjectStoreError as e:  # the next sweep deletes them
                log.warning("could not delete the write-ahead objects of %s: %s", name, e)
        done.append(name)
        log.info("uploaded %s (%.1f MB) to s3://%s/%s in %.2f s, verified (SHA-256 %s)", name, size / 1e6,
                 store.bucket, up.key, time.monotonic() - started, up.checksum)
    return done


def delete_gone(data_dir: Path, store: ObjectStore, grace: float = 0.0, now: float | None = None) -> int:
    """Delete the objects of segments a compaction replaced and purged (their live records
    have copies in a newer segment); returns how many. With Iceberg publication on, other
    nodes read them where the instances table says: an object stays until `grace` seconds
    after the table's rows of it were relocated (engine/iceberg/relocations.py)."""
    catalog_dir = data_dir / "catalog"
    m = manifest.load(catalog_dir)
    if compaction_pending(data_dir, m):
        return 0  # the copies of their live records are not in the bucket yet: a lost disk would lose them
    now = time.time() if now is None else now
    gone = {n: e for n, e in m.uploaded.items() if e.get("gone") and (
        n not in m.relocations or (m.relocations[n] and now - m.relocations[n] >= grace))}
    for name, entry in gone.items():
        store.delete(entry["key"])
    if gone:
        with manifest.update(catalog_dir) as m:
            for name in gone:
                m.uploaded.pop(name, None)
                m.relocations.pop(name, None)
    compactions.forget(data_dir, store)  # journals whose replaced objects are all gone now
    return len(gone)


def _cached(data_dir: Path, m: manifest.Manifest) -> list[tuple[float, int, Path, str]]:
    """(age key, size, path, segment) of everything evictable: local copies of uploaded
    segments (aged by their upload) and read-cache blocks (by when they were fetched)."""
    out = []
    for name, entry in m.uploaded.items():
        path = data_dir / "segments" / name
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if not entry.get("gone") and st.st_size == entry["size"]:
            out.append((float(entry["at"]), st.st_size, path, name))
    for root, _dirs, files in os.walk(data_dir / CACHE):
        for f in files:
            path = Path(root) / f
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, path, ""))
    return sorted(out, key=lambda t: t[0])


def evict(data_dir: Path, budget: int) -> int:
    """Unlink the oldest evictable local bytes until at most `budget` remain; returns the
    bytes freed. A segment's local copy goes only while the manifest records it uploaded."""
    catalog_dir = data_dir / "catalog"
    items = _cached(data_dir, manifest.load(catalog_dir))
    total = sum(size for _at, size, _p, _n in items)
    freed = 0
    for _at, size, path, name in items:
        if total <= budget:
            break
        if name and name not in manifest.load(catalog_dir).uploaded:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        total -= size
        freed += size
        if name:
            log.info("evicted the local copy of %s (%.1f MB): it is read from the bucket now", name, size / 1e6)
    return freed


class Uploader:
    def __init__(self, config: Config, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self.store = store_for(config)
        self.swept_at = float("-inf")
        self.tombstones: tuple | None = None  # the tombstone log's stamp when last copied to the bucket
        self.refused: dict[str, str] = {}     # segments whose key holds another object (logged once each)

    def once(self) -> None:
        data_dir = self.config.data_dir
        ahead = self.config.durability == "object-store"  # else stale write-ahead objects go at start-up
        upload_sealed(data_dir, self.store, self.stop, ahead, self.refused)
        delete_gone(data_dir, self.store, self.config.compact_grace)
        try:  # a lost disk gets its deletions back from this copy (restore.py)
            self.tombstones = copy_tombstones(data_dir, self.store, self.tombstones)
        except (ObjectStoreError, OSError) as e:
            log.warning("could not copy the tombstone log to the bucket (%s); trying again", e)
        if ahead and time.monotonic() - self.swept_at >= WAL_SWEEP_S \
                and not compaction_pending(data_dir, manifest.load(data_dir / "catalog")):
            wal.sweep(self.store, data_dir)
            self.swept_at = time.monotonic()
        evict(data_dir, self.config.local_cache_bytes)

    def run(self) -> None:
        failing = False
        while not self.stop.wait(self.config.upload_interval):
            try:
                self.once()
                if failing:
                    log.info("uploads to %s go through again", self.config.storage)
                failing = False
            except (ObjectStoreError, OSError) as e:
                if not failing:  # said once, not every interval
                    log.error("uploads to %s fail, will retry every %g s: %s", self.config.storage,
                              self.config.upload_interval, e)
                failing = True


def main() -> None:
    config, stop = child_start("STOWAGE_UPLOAD_CONFIG", "uploader")
    run_exclusively(config.data_dir / LOCK, stop, lambda: Uploader(config, stop).run(), "uploader")


class UploaderProcess(SupervisedProcess):
    """The acceptor's handle on the uploader process."""

    name, module, config_env, restart_after = "uploader", "stowage.engine.storage.uploader", \
        "STOWAGE_UPLOAD_CONFIG", 5.0

    def start(self) -> None:
        if self.config.storage:
            self.launch(f", storage {self.config.storage}")


if __name__ == "__main__":
    main()
