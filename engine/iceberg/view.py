"""Refreshing this node's view of the other nodes (catalog/cluster_view.py) from the
Iceberg tables: the data files they committed since the snapshot the view is at
(follow.added_since, this node's own left out), copied into `<data_dir>/cluster/`, then the
view's record replaced in one rename. A snapshot the tables have expired since is no
place to go on from: the view then reads the table's current data files whole and drops
what is no longer there.

A refresh costs the catalog one table load per table and, per new data file, one GET of
it: the nodes' C-FIND and QIDO never reach the network.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stowage.catalog import cluster_view, manifest, studies, tombstones, versions_table
from stowage.engine.iceberg.follow import added_since
from stowage.engine.iceberg.tables import DELETIONS, INSTANCES, ensure_tables, open_catalog
from stowage.engine.runtime.config import Config

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

log = logging.getLogger("stowage.cluster")

_NODE_IN_PATH = re.compile(r"/data/([A-Za-z0-9._-]{1,64})/([^/]+)$")


@dataclass
class Refreshed:
    instance_files: int = 0
    instance_rows: int = 0
    deletion_rows: int = 0
    whole: list[str] = field(default_factory=list)   # tables read whole (their snapshot had expired)
    seconds: float = 0.0


class Refresher:
    """Folds the other nodes' data files into the view; one at a time per data directory
    (the publisher's process runs it)."""

    def __init__(self, config: Config, catalog: "Catalog | None" = None) -> None:
        self.config = config
        self.node = config.node
        self.dir = cluster_view.directory(config.data_dir)
        self.catalog = catalog or open_catalog(config)
        ensure_tables(self.catalog, config.iceberg_namespace)
        self._versions_key: tuple | None = None

    def _table(self, name: str) -> "Table":
        return self.catalog.load_table(f"{self.config.iceberg_namespace}.{name}")

    def refresh(self) -> Refreshed:
        started = time.monotonic()
        done = Refreshed()
        view = cluster_view.load(self.dir)
        held_deletions = sorted(view.deletions)
        self.dir.mkdir(parents=True, exist_ok=True)
        changed = False
        for name in (INSTANCES, DELETIONS):
            table = self._table(name)
            held = view.instances if name == INSTANCES else view.deletions
            # this node's own instances are in its catalog; its own deletions are kept too, since
            # its tombstone log forgets those of other nodes' records once pruned
            mine = self.node if name == INSTANCES else ""
            added = added_since(table, view.snapshots.get(name), skip_node=mine)
            files = added.files
            for path in added.removed:  # an overwrite (a relocation) replaced it
                local = self._local_name(path)
                if held.pop(local, None) is not None:
                    changed = True
                    if name == INSTANCES:
                        view.rows -= self._rows(local)
            if not added.complete:  # that snapshot expired: the table's files now, whole
                done.whole.append(name)
                files = self._current_files(table)
                wanted = {self._local_name(p) for p in files}
                for gone in [n for n in held if n not in wanted]:
                    del held[gone]
                    changed = True
                files = [p for p in files if self._local_name(p) not in held]
            for path in files:
                node, local = self._node_of(path), self._local_name(path)
                if node is None or node == mine:
                    continue
                rows = self._fold(table, path, node, local, name)
                held[local] = node
                changed = True
                if name == INSTANCES:
                    done.instance_files += 1
                    done.instance_rows += rows
                    view.rows += rows
                else:
                    done.deletion_rows += rows
            if added.snapshot_id != view.snapshots.get(name):
                view.snapshots[name] = added.snapshot_id
                changed = True
        if done.whole:
            view.rows = sum(pq.ParquetFile(self.dir / n).metadata.num_rows for n in view.instances)
        self._note_versions(view)
        view.refreshed_at = time.time()
        deletions_changed = sorted(view.deletions) != held_deletions
        if changed:
            view.generation += 1
        cluster_view.save(self.dir, view)  # refreshed_at too: the view's age is on record
        if deletions_changed:
            cluster_view.mark_deletions(self.dir, view.generation)
        self._sweep(view)
        done.seconds = time.monotonic() - started
        return done

    # -- one data file -----------------------------------------------------------------

    def _fold(self, table: "Table", path: str, node: str, local: str, name: str) -> int:
        """Copy one data file into the view (written whole, fsync'd, renamed into place):
        instances with their segments named after the node, and a study summary."""
        with table.io.new_input(path).open() as f:
            data = pq.read_table(pa.BufferReader(f.read()))
        if name == INSTANCES:
            segs = data["segment"]
            data = data.set_column(data.schema.get_field_index("segment"), "segment",
                                   pc.binary_join_element_wise(pa.scalar(f"{cluster_view.MARK}{node}/"), segs, ""))
            studies.write(self.dir, local, data)
        else:
            data = data.select(tombstones.SCHEMA.names).cast(tombstones.SCHEMA)
        tmp = self.dir / f".{local}.{os.getpid()}.tmp"
        pq.write_table(data, tmp, compression="zstd", row_group_size=65536, write_statistics=True)
        with open(tmp, "rb+") as out:
            os.fsync(out.fileno())
        os.replace(tmp, self.dir / local)
        return data.num_rows

    def _note_versions(self, view: cluster_view.View) -> None:
        """The records of every UID held by this node and another (or by two others): the
        same instance received by two nodes. Readers add them to the versions table, so the
        duplicates policy chooses among them as among one node's records. Recomputed when
        this node's sealed files or the view's files changed, at most once per refresh (one
        scan of the UID column of both, in this background process, not in every reader)."""
        catalog_dir = Path(self.config.data_dir) / "catalog"
        m = manifest.load(catalog_dir)
        key = (tuple(sorted(m.files)), tuple(sorted(view.instances)))
        if key == self._versions_key:
            return
        if not view.instances:
            view.versions, self._versions_key = "", key
            return
        files = [str(catalog_dir / n) for n in sorted(m.files)] + [str(self.dir / n) for n in sorted(view.instances)]
        con = duckdb.connect(":memory:", config={"threads": 1, "memory_limit": "512MB"})
        try:
            both = con.sql(
                "WITH r AS (SELECT sop_instance_uid, received_at, segment, \"offset\", study_instance_uid "
                "FROM read_parquet(?, union_by_name=true)) SELECT * FROM r WHERE sop_instance_uid IN "
                "(SELECT sop_instance_uid FROM r GROUP BY sop_instance_uid HAVING count(*) > 1 "
                f"AND bool_or(starts_with(segment, '{cluster_view.MARK}')))", params=[files]).to_arrow_table()
        except duckdb.IOException:  # a file compacted away meanwhile: the next refresh
            return
        finally:
            con.close()
        self._versions_key = key
        if both.num_rows == 0:
            view.versions = ""
            return
        name = f"versions-{uuid.uuid4().hex}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(both.cast(versions_table.VERSIONS_SCHEMA), tmp, compression="zstd")
        with open(tmp, "rb+") as out:
            os.fsync(out.fileno())
        os.replace(tmp, self.dir / name)
        view.versions = name

    def _rows(self, local: str) -> int:
        try:
            return pq.ParquetFile(self.dir / local).metadata.num_rows
        except FileNotFoundError:
            return 0

    def _current_files(self, table: "Table") -> list[str]:
        if table.current_snapshot() is None:
            return []
        return [t.file.file_path for t in table.scan().plan_files()]

    @staticmethod
    def _node_of(path: str) -> str | None:
        m = _NODE_IN_PATH.search(path)
        return m.group(1) if m and m.group(1) not in (".", "..") else None

    @staticmethod
    def _local_name(path: str) -> str:
        m = _NODE_IN_PATH.search(path)
        return f"{m.group(1)}--{m.group(2)}" if m else ""

    def _sweep(self, view: cluster_view.View) -> None:
        """Files the view no longer names (a table read whole), after readers had time
        to let go of them."""
        keep = set(view.instances) | set(view.deletions) | {view.versions}
        keep |= {studies.companion(n) for n in view.instances}
        now = time.time()
        for p in self.dir.iterdir():
            if p.name == cluster_view.VIEW or p.name in keep or p.name.startswith("."):
                continue
            try:
                if now - p.stat().st_mtime > 120:
                    p.unlink()
            except FileNotFoundError:
                pass


def refresh_until(config: Config, stop: threading.Event) -> None:
    """A refresh every cluster_refresh seconds until `stop`; a failed one is logged and
    the next tries again."""
    refresher = None
    while not stop.is_set():
        try:
            if refresher is None:
                refresher = Refresher(config)
            done = refresher.refresh()
            if done.instance_files or done.deletion_rows or done.whole:
                log.info("cluster view: %d file(s) (%d instance(s)) and %d deletion(s) of other nodes folded in "
                         "%.2f s%s", done.instance_files, done.instance_rows, done.deletion_rows, done.seconds,
                         f"; {', '.join(done.whole)} read whole (snapshot expired)" if done.whole else "")
        except Exception as e:  # noqa: BLE001 - the catalog away: the view stays as it is, older
            log.error("cluster view: a refresh failed (%s: %s); trying again in %g s", type(e).__name__, e,
                      config.cluster_refresh)
            refresher = None
        stop.wait(config.cluster_refresh)
