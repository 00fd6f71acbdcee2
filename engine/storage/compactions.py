"""The compactions' journal in the bucket: which segments each compaction output replaced,
so that a node whose disk is lost inside `compact_grace` does not adopt both
(docs/scale-out.md, "A lost disk").

A compaction copies the live records of sparse segments into an output `999-<seq>.seg`;
the replaced segments' objects stay in the bucket until their grace has passed (readers
of other nodes may still be sent there). Until then the bucket holds each live record
twice. The compaction's manifest swap records output -> replaced (`Manifest.compactions`);
the uploader PUTs that record as `<prefix>/<node>/compactions/<output>.json` *before* it
uploads the output, and deletes it once no replaced segment's object is left. A restore
that finds an output in the bucket with its journal marks the segments it names as gone
(`replaced`): they are never indexed, and the uploader deletes their objects as it would
have (after the relocation of their rows in the Iceberg table, with publication on).

A journal whose output never reached the bucket (the disk was lost between the two PUTs)
names nothing to drop: the replaced objects are then the only copies of their records.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from stowage.catalog import manifest
from stowage.engine.storage.objects import ObjectStore

log = logging.getLogger("stowage.storage")


def journal_prefix(store: ObjectStore) -> str:
    return f"{store.prefix}/{store.node}/compactions/".lstrip("/")


def journal_key(store: ObjectStore, output: str) -> str:
    return f"{journal_prefix(store)}{output}.json"


def write(store: ObjectStore, output: str, replaced: list[str]) -> None:
    """The journal of compaction output `output`: PUT before the output itself."""
    store.put(journal_key(store, output), json.dumps({"output": output, "replaced": sorted(replaced)}).encode())


def forget(data_dir: Path, store: ObjectStore) -> int:
    """Delete the journals nothing needs any more (the output uploaded, no replaced
    segment's object left in the bucket; or the output itself replaced before it was
    uploaded); returns how many."""
    catalog_dir = Path(data_dir) / "catalog"
    m = manifest.load(catalog_dir)
    done = [out for out, replaced in m.compactions.items()
            if (out in m.uploaded and not any(s in m.uploaded for s in replaced))
            or (out not in m.uploaded and out in m.retired_segments)]
    for out in done:
        store.delete(journal_key(store, out))
    if done:
        with manifest.update(catalog_dir) as m:
            for out in done:
                m.compactions.pop(out, None)
    return len(done)


def replaced_in_bucket(store: ObjectStore, objects: set[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """For a restore: ({replaced segment: the output holding its live records}, {output:
    replaced} of the journals that count), from the journals whose output is in `objects`
    (segment names in the bucket) or was itself replaced by one that counts."""
    journals: dict[str, list[str]] = {}
    for key, size in store.list(journal_prefix(store)).items():
        if not key.endswith(".json") or not size:
            continue
        try:
            data = json.loads(store.get_range(key, 0, size))
            journals[str(data["output"])] = [str(n) for n in data["replaced"]]
        except (ValueError, KeyError, TypeError) as e:  # its segments are adopted: twice held, nothing lost
            log.warning("unreadable compaction journal s3://%s/%s (%s); ignored", store.bucket, key, e)
    counts = {out for out in journals if out in objects}
    replaced: dict[str, str] = {}
    while counts:
        out = counts.pop()
        for seg in journals[out]:
            if seg not in replaced:
                replaced[seg] = out
                if seg in journals:  # an output compacted again: its own journal counts too
                    counts.add(seg)
    used = {out: journals[out] for out in set(replaced.values())}
    return replaced, used
