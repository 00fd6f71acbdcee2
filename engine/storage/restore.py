"""A node's own segments found again in the bucket (docs/scale-out.md, "A lost disk").

Every segment a node uploaded sits at `<prefix>/<node_name>/segments/<segment>`. When
`stowage serve` starts, and before `stowage rebuild-catalog` indexes, the node lists that
prefix and records in the manifest (`uploaded`, marked `adopted`) every segment object
that neither the manifest nor the local disk knows: after its data directory was lost,
all of them. Recovery then indexes them as it indexes any segment past its watermark,
reading them by ranged GETs (engine/store/recovery.py walks uploaded segments too), so
every uploaded instance is found and retrieved again; and the segment writer numbers
new segments after every name the manifest records, so no name is ever used twice.

What it cannot bring back is what was never uploaded: records of the active segment
and of sealed segments the uploader had not reached (with `durability =
"object-store"` those are in the bucket's write-ahead objects: engine/storage/wal.py).

The tombstone log is copied too: the uploader PUTs it whole to
`<prefix>/<node_name>/tombstones/tombstones.log` whenever it changed (`copy_tombstones`),
and a data directory that adopted segments and holds no log gets that copy back
(`restore_tombstones`), so a deletion made more than `upload_interval` before the loss
stays. With Iceberg publication on, the deletions table is the record instead
(engine/iceberg/restore.py: it also knows which deletions were published).
"""
from __future__ import annotations

import logging
import os
import re
import time

from stowage.catalog import manifest, tombstones
from stowage.catalog.durable import replace_durably
from stowage.engine.runtime.config import Config
from stowage.engine.storage import compactions
from stowage.engine.storage.objects import ObjectStore, segment_key, store_for

log = logging.getLogger("stowage.storage")
_SEGMENT = re.compile(r"^\d{3}-\d{8}\.seg$")


def adopt(config: Config) -> list[str]:
    """Record in the manifest this node's segment objects it does not know; returns their names."""
    store = store_for(config)
    prefix = segment_key(store.prefix, store.node, "")
    catalog_dir, segments = config.data_dir / "catalog", config.data_dir / "segments"
    try:
        local = set(os.listdir(segments))
    except FileNotFoundError:
        local = set()
    known = manifest.load(catalog_dir)
    listed = {key[len(prefix):]: (key, size) for key, size in store.list(prefix).items()}
    unknown = {name: ks for name, ks in sorted(listed.items())
               if _SEGMENT.match(name) and name not in local and name not in known.uploaded
               and name not in known.retired_segments and ks[1] > 0}
    # segments a compaction replaced whose output is in the bucket too: never indexed (compactions.py)
    replaced, journals = compactions.replaced_in_bucket(store, set(listed)) if unknown else ({}, {})
    found: dict[str, dict] = {}
    dropped: dict[str, dict] = {}
    for name, (key, size) in unknown.items():
        if name in replaced:
            dropped[name] = {"key": key, "size": size, "at": time.time(), "adopted": True, "gone": True,
                             "replaced_by": replaced[name]}
            continue
        head = store.head(key) or {}
        found[name] = {"key": key, "size": size, "sha256": head.get("Metadata", {}).get("sha256", ""),
                       "checksum": head.get("ChecksumSHA256", ""), "at": time.time(), "adopted": True}
    if found or dropped:
        catalog_dir.mkdir(parents=True, exist_ok=True)
        with manifest.update(catalog_dir) as m:
            for name, entry in {**found, **dropped}.items():
                m.uploaded.setdefault(name, entry)
            for name in dropped:
                m.watermarks.setdefault(name, dropped[name]["size"])  # its name stays used
                if config.iceberg_catalog:  # the table's rows of it follow its records (engine/iceberg)
                    m.relocations.setdefault(name, 0.0)
            for out, segs in journals.items():  # the journal goes once their objects are deleted
                m.compactions.setdefault(out, segs)
    if dropped:
        log.warning("left out %d segment(s) of node %s that compactions had replaced (%s): their live records "
                    "are in %s; their objects will be deleted", len(dropped), store.node, ", ".join(sorted(dropped)),
                    ", ".join(sorted(set(replaced[n] for n in dropped))))
    if found:
        log.warning("found %d segment(s) of node %s in s3://%s/%s that this data directory did not hold "
                    "(%.1f MB); indexing them from the bucket", len(found), store.node, store.bucket, prefix,
                    sum(e["size"] for e in found.values()) / 1e6)
    return sorted(found)


def tombstones_key(store: ObjectStore) -> str:
    return f"{store.prefix}/{store.node}/tombstones/{tombstones.LOG}".lstrip("/")


def copy_tombstones(data_dir, store: ObjectStore, last: tuple | None) -> tuple | None:
    """PUT the tombstone log whole when it changed since stamp `last`; returns the stamp
    now (the uploader passes it back next time)."""
    stamp = tombstones.stamp(data_dir)
    if stamp is None or stamp == last:
        return stamp
    with open(tombstones.directory(data_dir) / tombstones.LOG, "rb") as f:
        data = f.read()
    store.put(tombstones_key(store), data)
    return stamp


def restore_tombstones(config: Config, store: ObjectStore) -> int:
    """The bucket's copy of the tombstone log, written back where the data directory has
    none; returns its size in bytes (0: nothing to do)."""
    log_path = tombstones.directory(config.data_dir) / tombstones.LOG
    if log_path.exists():
        return 0
    key = tombstones_key(store)
    head = store.head(key)
    if not head or not head.get("ContentLength"):
        return 0
    data = store.get_range(key, 0, int(head["ContentLength"]))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    replace_durably(log_path, data.decode())
    log.warning("found the tombstone log of node %s in s3://%s/%s (%d bytes) that this data directory did not "
                "hold: the instances deleted before are hidden again", store.node, store.bucket, key, len(data))
    return len(data)


class RestoreError(RuntimeError):
    """A fresh data directory and a bucket that cannot be listed: the node cannot know
    which segment names it used already. The message says what to do."""


def restore_from_bucket(config: Config) -> list[str]:
    """At `stowage serve` start-up, before recovery: read evicted segments from the bucket
    in this process and adopt this node's segments the data directory lost. A bucket out
    of reach is only logged for a data directory that holds a manifest (it knows its own
    names); a fresh one refuses to start rather than reuse names."""
    if not config.storage:
        return []
    from stowage.engine.storage.objects import ObjectStoreError
    from stowage.engine.storage.remote import read_from_bucket
    from stowage.engine.storage import wal
    read_from_bucket(config)
    try:
        found = adopt(config)
        wal.replay(config)  # acknowledged records of segments not uploaded yet (durability = object-store)
        if found and not config.iceberg_catalog:  # with Iceberg, the deletions table (engine/iceberg/restore.py)
            restore_tombstones(config, store_for(config))
        return found
    except ObjectStoreError as e:
        if (config.data_dir / "catalog" / manifest.MANIFEST).exists():
            log.error("could not list this node's segments in the bucket (%s); starting from the local data "
                      "directory", e)
            return []
        raise RestoreError(f"{config.data_dir} is empty and the bucket cannot be listed, so this node cannot "
                           f"know which of its segments it holds: {e}. Fix access to {config.storage} and "
                           "start again") from None
