"""Reading the records of other nodes (issue #24, any node serves any instance): a row of
the node's view names its segment `@<node>/<segment>` (catalog/cluster_view.py), so every
reader that opens `segments/<segment>` (C-MOVE, C-GET, WADO-RS, export, storage
commitment) asks for `segments/@<node>/<segment>`, which is never on local disk; the
opener installed here hands it that node's uploaded segment, read by ranged GETs through
the local read cache (engine/storage/remote.open_node_segment). Any other missing
segment goes to the opener of this node's own uploaded segments, as before."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from stowage.catalog.cluster_view import split_segment
from stowage.engine.runtime.config import Config
from stowage.engine.store import segment


class NodeSegments:
    """The opener `segment.open_segment` and `read_payload` call for a segment file that
    is not on local disk."""

    def __init__(self, config: Config, own: Callable[[Path], Any] | None) -> None:
        self.config, self.own = config, own

    def __call__(self, path: Path) -> Any:
        named = split_segment(f"{path.parent.name}/{path.name}") if path.parent.parent.name == "segments" else None
        if named is None:
            return self.own(path) if self.own is not None else None
        from stowage.engine.storage import remote
        node, name = named
        if node == self.config.node:  # this node's own, named the view's way: its own copy
            return segment.open_segment(path.parent.parent / name)
        return remote.open_node_segment(self.config, node, name)


def read_other_nodes(config: Config, own: Callable[[Path], Any] | None) -> None:
    """Install, in this process, the opener of other nodes' segments in front of `own`
    (read_from_bucket's opener of this node's uploaded segments, or None)."""
    if not (config.iceberg_catalog and config.cluster_refresh and config.storage):
        return
    segment.read_elsewhere(NodeSegments(config, own))
