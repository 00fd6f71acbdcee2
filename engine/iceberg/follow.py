"""Following the Iceberg tables: the data files other nodes added since a snapshot this
node has seen, read from the table's own metadata (snapshot parents and the manifests
each snapshot added), without listing the table whole. The ground of a node's local view
of the whole archive (issue #24, several nodes as one archive): refresh = fetch what
`added_since` names, fold it into the local view, remember the snapshot id."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyiceberg.table import Table


@dataclass
class Added:
    snapshot_id: int | None     # the table's current snapshot: pass it next time
    files: list[str]            # data files added after the given snapshot, oldest first
    rows: int
    complete: bool = True       # False: the given snapshot has expired; the caller must read the table whole
    removed: list[str] = field(default_factory=list)  # data files there before it, removed since (an overwrite)


def added_since(table: "Table", snapshot_id: int | None, skip_node: str = "") -> Added:
    """Data files added to `table` after snapshot `snapshot_id` (None: since the start),
    and those there before it that an overwrite removed since, leaving out those under
    `data/<skip_node>/` (this node's own)."""
    from pyiceberg.manifest import ManifestEntryStatus
    current = table.current_snapshot()
    if current is None:
        return Added(None, [], 0)
    chain = []
    snap = current
    while snap is not None and snap.snapshot_id != snapshot_id:
        chain.append(snap)
        snap = table.snapshot_by_id(snap.parent_snapshot_id) if snap.parent_snapshot_id is not None else None
    complete = snapshot_id is None or snap is not None
    mine = f"/data/{skip_node}/" if skip_node else None
    files: dict[str, int] = {}   # path -> rows, in the order added
    removed: list[str] = []
    for snap in reversed(chain):
        for manifest in snap.manifests(table.io):
            if manifest.added_snapshot_id != snap.snapshot_id or not (
                    manifest.has_added_files() or _has_deleted_files(manifest)):
                continue
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                path = entry.data_file.file_path
                if entry.snapshot_id != snap.snapshot_id or (mine and mine in path):
                    continue
                if entry.status == ManifestEntryStatus.ADDED:
                    files[path] = entry.data_file.record_count
                elif entry.status == ManifestEntryStatus.DELETED:  # an overwrite: the file is no longer the table's
                    if files.pop(path, None) is None:
                        removed.append(path)
    return Added(current.snapshot_id, list(files), sum(files.values()), complete, removed)


def _has_deleted_files(manifest) -> bool:  # pyiceberg's ManifestFile has has_added_files() only
    return manifest.deleted_files_count is None or manifest.deleted_files_count > 0
