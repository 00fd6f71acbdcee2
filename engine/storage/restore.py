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
"object-store"` those are in the bucket's write-ahead objects: engine/storage/wal.py),
and what lives only on local disk: the tombstone log (a deletion made before the loss
shows again until it is deleted again).
"""
from __future__ import annotations

import logging
import os
import re
import time

from stowage.catalog import manifest
from stowage.engine.runtime.config import Config
from stowage.engine.storage.objects import segment_key, store_for

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
    found: dict[str, dict] = {}
    for key, size in sorted(store.list(prefix).items()):
        name = key[len(prefix):]
        if not _SEGMENT.match(name) or name in local or name in known.uploaded or name in known.retired_segments \
                or size == 0:
            continue
        head = store.head(key) or {}
        found[name] = {"key": key, "size": size, "sha256": head.get("Metadata", {}).get("sha256", ""),
                       "checksum": head.get("ChecksumSHA256", ""), "at": time.time(), "adopted": True}
    if found:
        catalog_dir.mkdir(parents=True, exist_ok=True)
        with manifest.update(catalog_dir) as m:
            for name, entry in found.items():
                m.uploaded.setdefault(name, entry)
        log.warning("found %d segment(s) of node %s in s3://%s/%s that this data directory did not hold "
                    "(%.1f MB); indexing them from the bucket", len(found), store.node, store.bucket, prefix,
                    sum(e["size"] for e in found.values()) / 1e6)
    return sorted(found)


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
        return found
    except ObjectStoreError as e:
        if (config.data_dir / "catalog" / manifest.MANIFEST).exists():
            log.error("could not list this node's segments in the bucket (%s); starting from the local data "
                      "directory", e)
            return []
        raise RestoreError(f"{config.data_dir} is empty and the bucket cannot be listed, so this node cannot "
                           f"know which of its segments it holds: {e}. Fix access to {config.storage} and "
                           "start again") from None
