"""`stowage rebuild-catalog`: the catalog thrown away and rebuilt from the segments alone,
with the archive stopped. Above the store: an interrupted compaction is settled first."""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from stowage.catalog import manifest
from stowage.engine.lifecycle.compaction import prepare_rebuild
from stowage.engine.store.recovery import recover
from stowage.engine.store.slots import SlotError, slots_present, try_claim


def discard_unreadable_manifest(catalog_dir: Path) -> str | None:
    """A manifest that cannot be read (cut to nothing, damaged) is what a rebuild is for:
    it is moved aside (kept for an administrator to look at) rather than stopping the
    rebuild that replaces it. Returns what was done, or None when it reads."""
    try:
        manifest.load(catalog_dir)
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors
        aside = catalog_dir.parent / f"{manifest.MANIFEST}.unreadable-{int(time.time())}"
        os.replace(catalog_dir / manifest.MANIFEST, aside)
        return (f"the catalog's manifest could not be read ({type(e).__name__}: {str(e)[:80]}): moved to "
                f"{aside}; the catalog is rebuilt without it")


def rebuild(data_dir: Path) -> int:
    """Throw the catalog away and index every segment record again: those on local disk
    and those uploaded to the bucket (the manifest's `uploaded` is kept)."""
    catalog_dir = data_dir / "catalog"
    discard_unreadable_manifest(catalog_dir)
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
