"""The archive's usage against its quota (`max_storage_bytes`), for the store path.

Usage is the bytes of the segment files the archive still needs (segments a compaction
replaced and keeps only for readers' grace are not counted): what the archive takes on
disk, dead records included until compaction reclaims them. The store path asks the file
system at most every 0.25 s and adds what it stored since, as engine/store/freespace.py does;
within 256 MB of the quota, before every store.

The store only reports usage and refuses what would take it past the quota when the
policy says so (`refuse`, or `quota.exhausted` written by the delete-oldest policy of
engine/lifecycle/quota.py, which decides what to delete).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from stowage.catalog import manifest

EXHAUSTED = "quota.exhausted"
# Within this many bytes of the quota the store path asks the file system before each
# store: the figure may be 0.25 s old, and other workers store meanwhile.
_NEAR = 256 << 20
REFUSAL = "storage quota (max_storage_bytes) reached; not stored"


_manifest_cache: dict[Path, tuple[tuple, frozenset[str], dict[str, int]]] = {}


def _segments_known(catalog_dir: Path) -> tuple[frozenset[str], dict[str, int]]:
    """The manifest's retired segments, and the uploaded ones still needed (name -> size),
    read again only when the manifest changes."""
    try:
        st = os.stat(catalog_dir / manifest.MANIFEST)
    except FileNotFoundError:
        return frozenset(), {}
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _manifest_cache.get(catalog_dir)
    if hit is None or hit[0] != stamp:
        m = manifest.load(catalog_dir)
        uploaded = {n: int(e["size"]) for n, e in m.uploaded.items()
                    if not e.get("gone") and n not in m.retired_segments}
        hit = _manifest_cache[catalog_dir] = (stamp, frozenset(m.retired_segments), uploaded)
    return hit[1], hit[2]


def segment_bytes(data_dir: Path) -> int:
    """Bytes of the segments the archive needs (not the retired ones): the files on local
    disk, and the uploaded ones whose local copy was evicted (engine/storage), counted once.
    This node's own segments only: with several nodes the quota is per node."""
    return sum(segment_usage(data_dir))


def segment_usage(data_dir: Path) -> tuple[int, int]:
    """(bytes on local disk, bytes only in the bucket) of the segments `segment_bytes` counts."""
    retired, uploaded = _segments_known(data_dir / "catalog")
    total, local = 0, set()
    try:
        with os.scandir(data_dir / "segments") as it:
            for e in it:
                if e.name.endswith(".seg") and e.name not in retired:
                    total += e.stat().st_size
                    local.add(e.name)
    except FileNotFoundError:
        pass
    return total, sum(size for name, size in uploaded.items() if name not in local)


class Usage:
    """The archive's usage against its quota, for the store path: cheap to ask often."""

    def __init__(self, data_dir: Path, limit: int, policy: str, interval: float = 0.25) -> None:
        self.data_dir = data_dir
        self.limit = limit
        self.policy = policy
        self.interval = interval
        self._bytes = 0
        self._exhausted = False
        self._at = float("-inf")

    def _refresh(self, now: float) -> None:
        self._bytes = segment_bytes(self.data_dir)
        self._exhausted = self.policy == "refuse" or (self.data_dir / EXHAUSTED).exists()
        self._at = now

    def refusal(self, incoming: int) -> str:
        """The Error Comment refusing a store of `incoming` bytes, or "" to store it."""
        if not self.limit:
            return ""
        now = time.monotonic()
        near = self._exhausted and self._bytes + incoming > self.limit - _NEAR
        if near or now - self._at > self.interval:  # near the quota: a fresh figure for every store
            self._refresh(now)
        return REFUSAL if self._bytes + incoming > self.limit and self._exhausted else ""

    def used(self, nbytes: int) -> None:
        self._bytes += nbytes
