"""`stowage rebuild-catalog`: the catalog thrown away and rebuilt from the segments alone,
with the archive stopped. Above the store: an interrupted compaction is settled first."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from stowage.catalog import manifest
from stowage.engine.lifecycle.compaction import prepare_rebuild
from stowage.engine.store.recovery import recover
from stowage.engine.store.slots import SlotError, slots_present, try_claim


def rebuild(data_dir: Path) -> int:
    """Throw the catalog away and index every segment record again: those on local disk
    and those uploaded to the bucket (the manifest's `uploaded` is kept)."""
    catalog_dir = data_dir / "catalog"
    for number in sorted(slots_present(data_dir)):
        claim = try_claim(data_dir, number)
        if claim is None:
            raise SlotError(errno.EBUSY, f"slot {number:03d} is being written by a live process "
                                         "(stowage serve or import?); stop it first")
        claim.release()
    prepare_rebuild(data_dir)  # else an interrupted compaction's output, or a retired segment, is indexed twice
    kept = manifest.load(catalog_dir)  # where the segments in the bucket are (engine/storage), and
    uploaded = kept.uploaded           # the compactions whose journal there is not deleted yet
    if catalog_dir.exists():
        shutil.rmtree(catalog_dir)
    if uploaded or kept.compactions:
        with manifest.update(catalog_dir) as m:
            m.uploaded, m.compactions = uploaded, kept.compactions
    return recover(data_dir)
