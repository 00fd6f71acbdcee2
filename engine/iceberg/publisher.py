"""The Iceberg publisher: commits this node's sealed catalog files to the `instances`
table and its tombstone batches to the `deletions` table.

- Instances: the files the manifest's outbox names (catalog/iceberg_outbox.py) are copied
  byte for byte into the table's location, `<table>/data/<node>/<file>`, and added with
  `add_files` (no rewrite: the sealed files are already Parquet with Iceberg's types; the
  node name in the path keeps nodes from ever writing the same one).
- Deletions: the tombstone log entries after the published position are written once as
  a Parquet file (with a `node` column) and added the same way.
- Relocations: after a compaction, this node's data files holding rows of the replaced
  segments are rewritten and committed in their place as one overwrite
  (engine/iceberg/relocations.py).
- Each batch goes through the ledger (engine/iceberg/ledger.py) first. A commit that
  loses a race to another writer (CommitFailedException: the table moved on) is made
  again on the new head with the same data files, after a jittered back-off; a commit
  whose outcome is unknown (a lost answer, a locked database) is looked up in the table
  (snapshot property `stowage.batch`) before it is tried again.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stowage.catalog import iceberg_outbox, manifest, tombstones
from stowage.engine.iceberg import ledger as ledgers
from stowage.engine.iceberg import relocations
from stowage.engine.iceberg.ledger import Batch
from stowage.engine.iceberg.tables import DELETIONS, INSTANCES, ensure_tables, open_catalog
from stowage.engine.runtime.config import Config

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

log = logging.getLogger("stowage.iceberg")

BATCH_PROPERTY, NODE_PROPERTY = "stowage.batch", "stowage.node"
COMMIT_ATTEMPTS = 30
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 5.0
COPY_CHUNK = 8 << 20
FAULT_ENV = "STOWAGE_ICEBERG_FAULT"  # tests: kill -9 ourselves at "<table>-uploaded" or "<table>-committed"


class PublishError(RuntimeError):
    """A batch could not be committed now; it stays in the ledger and the next pass retries it."""


class CatalogRebuilt(PublishError):
    """The local catalog was rebuilt after its rows were published: publishing it again
    would count them twice (docs/scale-out.md says what to do)."""


@dataclass
class Pass:
    instance_files: int = 0
    instance_rows: int = 0
    deletion_rows: int = 0
    relocated_rows: int = 0
    commit_seconds: list[float] = field(default_factory=list)  # one per commit that landed
    conflicts: int = 0


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class Publisher:
    def __init__(self, config: Config, catalog: "Catalog | None" = None) -> None:
        self.config = config
        self.node = config.node
        self.data_dir = Path(config.data_dir)
        self.catalog_dir = self.data_dir / "catalog"
        self.home = self.data_dir / "iceberg"
        self.outbox = self.home / "outbox"   # deletion batches written here before they are copied
        self.catalog = catalog or open_catalog(config)
        self.namespace = config.iceberg_namespace
        self.tables = ensure_tables(self.catalog, self.namespace)
        self.ledger = ledgers.load(self.home)
        self.last = Pass()

    # -- one pass ---------------------------------------------------------------------

    def start(self) -> int:
        return enable(self.data_dir, self.namespace)

    def run_once(self) -> Pass:
        """Finish a batch left by a crash, then publish everything queued."""
        self.last = Pass()
        self._resume()
        while names := iceberg_outbox.pending(self.catalog_dir)[:self.config.iceberg_batch_files]:
            self._publish_instances(names)
        self._publish_relocations()
        self._publish_deletions()
        # pruning keeps what is not published yet: a deletion of another node's record must reach the table
        tombstones.mark_published(self.data_dir, self.ledger.log_ino, self.ledger.log_offset)
        return self.last

    def _resume(self) -> None:
        batch = self.ledger.batch
        if batch is None:
            return
        if self._landed(batch):
            log.info("iceberg: batch %s (%s) had landed before a restart", batch.id, batch.table)
        else:
            log.info("iceberg: committing batch %s (%s) again after a restart", batch.id, batch.table)
            self._upload(batch)
            self._commit(batch)
        self._finish(batch)

    # -- instances and deletions ------------------------------------------------------

    def _publish_instances(self, names: list[str]) -> None:
        location = self.tables[INSTANCES].location().rstrip("/")
        uploaded = manifest.load(self.catalog_dir).uploaded
        # a restored node: its segments found in the bucket, or written back from write-ahead objects
        adopted = {n for n, e in uploaded.items() if e.get("adopted")} | set(self.ledger.rewritten)
        replaced = {n for n, e in uploaded.items() if e.get("replaced_by")}  # engine/storage/compactions.py
        files, rows, held = [], 0, []
        for name in names:
            local = self.catalog_dir / name
            if adopted:  # a restored node: what the table holds of its adopted segments is not added again
                local = self._restored(local, adopted, replaced)
                if local is None:
                    held.append(name)
                    continue
            rows += pq.ParquetFile(local).metadata.num_rows
            files.append({"name": name, "local": str(local), "path": f"{location}/data/{self.node}/{local.name}",
                          "bytes": local.stat().st_size})
        if held:  # every row already in the table (published before the data directory was lost)
            iceberg_outbox.done(self.catalog_dir, held)
        if files:
            self._run(Batch(uuid.uuid4().hex, INSTANCES, files, rows))

    def _restored(self, local: Path, adopted: set[str], replaced: set[str]) -> Path | None:
        """`local` itself, or a copy without the rows the table already holds for this node
        (engine/iceberg/restore.py), or None when it holds all of them."""
        from stowage.engine.iceberg.restore import unpublished
        if not set(pc.unique(pq.read_table(local, columns=["segment"])["segment"]).to_pylist()) & adopted:
            return local  # rows of segments written since the restore only
        data = pq.read_table(local)
        left = unpublished(data, adopted, self._table(INSTANCES), self.node, replaced)
        if left.num_rows == data.num_rows:
            return local
        if left.num_rows == 0:
            return None
        self.outbox.mkdir(parents=True, exist_ok=True)
        copy = self.outbox / f"restored-{local.name}"
        pq.write_table(left, copy, compression="zstd", write_statistics=True)
        with open(copy, "rb+") as f:
            os.fsync(f.fileno())
        return copy

    def _publish_relocations(self) -> None:
        """Rewrite this node's data files that hold rows of segments a compaction replaced,
        each row at its record's place now, and commit them in place of the old ones."""
        m = manifest.load(self.catalog_dir)
        segments = relocations.pending(m)
        if not segments or relocations.waiting(self.catalog_dir, m, segments):
            return
        table = self._table(INSTANCES)
        batch = Batch(uuid.uuid4().hex, INSTANCES, [], 0, relocates=segments)
        used: set[str] = set()
        for path in sorted(relocations.affected(table, self.node, segments)):
            used |= self._relocate_file(table, path, batch)
        m = manifest.load(self.catalog_dir)
        if self.config.storage and any(s not in m.uploaded or m.uploaded[s].get("gone") for s in used):
            for f in batch.files:  # never point a reader at a segment the bucket does not hold yet
                Path(f["local"]).unlink(missing_ok=True)
            return
        if batch.replaces:
            self._run(batch)
        else:  # no published row named them: nothing to rewrite
            self._finish(batch)

    def _relocate_file(self, table: "Table", path: str, batch: Batch) -> set[str]:
        """Add to `batch` the rewrite of data file `path` (if it holds rows of the batch's
        segments); returns the segments its moved rows name now."""
        with table.io.new_input(path).open() as f:
            data = pq.read_table(pa.BufferReader(f.read()))
        mask = relocations.rows_in(data, batch.relocates)
        if not pc.any(mask).as_py():
            return set()  # its bounds spanned the segments, its rows are elsewhere
        here = relocations.places(self.catalog_dir, pc.filter(data["sop_instance_uid"], mask).to_pylist())
        new, used = relocations.relocated(data, batch.relocates, here)
        batch.replaces.append(path)
        batch.rows += int(pc.sum(mask).as_py() or 0)
        if new.num_rows:
            name = f"relocated-{batch.id}-{len(batch.files):05d}.parquet"
            self.outbox.mkdir(parents=True, exist_ok=True)
            local = self.outbox / name
            pq.write_table(new, local, compression="zstd", write_statistics=True)
            with open(local, "rb+") as out:
                os.fsync(out.fileno())
            batch.files.append({"name": name, "local": str(local), "bytes": local.stat().st_size,
                                "path": f"{table.location().rstrip('/')}/data/{self.node}/{name}"})
        return used

    def _publish_deletions(self) -> None:
        entries, ino, end = tombstones.read_from(tombstones.directory(self.data_dir), self.ledger.log_ino,
                                                 self.ledger.log_offset)
        if (ino, end) == (self.ledger.log_ino, self.ledger.log_offset):
            return
        if self.ledger.log_offset and ino != self.ledger.log_ino:  # pruned (rewritten): read afresh
            entries = self._unpublished(entries)
        if entries.num_rows == 0:
            self.ledger.log_ino, self.ledger.log_offset = ino, end
            ledgers.save(self.home, self.ledger)
            return
        table = entries.append_column("node", pa.array([self.node] * entries.num_rows, pa.string()))
        batch_id = uuid.uuid4().hex
        name = f"deletions-{self.node}-{batch_id}.parquet"
        self.outbox.mkdir(parents=True, exist_ok=True)
        local = self.outbox / name
        pq.write_table(table, local, compression="zstd")
        with open(local, "rb+") as f:
            os.fsync(f.fileno())
        location = self.tables[DELETIONS].location().rstrip("/")
        files = [{"name": name, "local": str(local), "path": f"{location}/data/{self.node}/{name}",
                  "bytes": local.stat().st_size}]
        self._run(Batch(batch_id, DELETIONS, files, table.num_rows, ino, end))

    def _unpublished(self, entries: pa.Table) -> pa.Table:
        """The entries of a rewritten log that the deletions table does not hold yet, by
        (uid, at, reason): a rewrite keeps those and may null received_at."""
        from pyiceberg.expressions import EqualTo
        done = self._table(DELETIONS).scan(row_filter=EqualTo("node", self.node),
                                           selected_fields=("sop_instance_uid", "at", "reason")).to_arrow()
        seen = set(zip(done["sop_instance_uid"].to_pylist(), pc.cast(done["at"], pa.int64()).to_pylist(),
                       done["reason"].to_pylist()))
        keys = zip(entries["sop_instance_uid"].to_pylist(), pc.cast(entries["at"], pa.int64()).to_pylist(),
                   entries["reason"].to_pylist())
        return entries.filter(pa.array([k not in seen for k in keys], pa.bool_()))

    # -- a batch: ledger, copy, commit, done ------------------------------------------

    def _run(self, batch: Batch) -> None:
        self.ledger.batch = batch
        ledgers.save(self.home, self.ledger)
        self._upload(batch)
        _fault(f"{batch.table}-uploaded")
        self._commit(batch)
        _fault(f"{batch.table}-committed")
        self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        if batch.relocates:
            now = time.time()
            with manifest.update(self.catalog_dir) as m:
                for seg in batch.relocates:
                    if seg in m.uploaded:  # its object goes compact_grace from now (storage/uploader.py)
                        m.relocations[seg] = now
                    else:  # never uploaded: no reader elsewhere could have read it
                        m.relocations.pop(seg, None)
            self.ledger.relocated_rows += batch.rows
            self.last.relocated_rows += batch.rows
        elif batch.table == INSTANCES:
            iceberg_outbox.done(self.catalog_dir, [f["name"] for f in batch.files])
            self.ledger.instance_files += len(batch.files)
            self.ledger.instance_rows += batch.rows
            self.last.instance_files += len(batch.files)
            self.last.instance_rows += batch.rows
        else:
            self.ledger.log_ino, self.ledger.log_offset = batch.log_ino, batch.log_end
            self.ledger.deletion_rows += batch.rows
            self.last.deletion_rows += batch.rows
        self.ledger.batch = None
        ledgers.save(self.home, self.ledger)
        for f in batch.files:  # copies written for the batch (not the sealed files themselves)
            if Path(f["local"]).parent == self.outbox:
                Path(f["local"]).unlink(missing_ok=True)

    def _upload(self, batch: Batch) -> None:
        """Copy the batch's files into the warehouse, once: a file already there whole (an
        earlier attempt's) is not copied again."""
        io = self.tables[batch.table].io
        for f in batch.files:
            remote = io.new_input(f["path"])
            if remote.exists() and len(remote) == f["bytes"]:
                continue
            if f["path"].startswith("file://"):
                _copy_local(Path(f["local"]), Path(f["path"][len("file://"):]))
                continue
            with open(f["local"], "rb") as src, io.new_output(f["path"]).create(overwrite=True) as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)

    def _table(self, name: str) -> "Table":
        return self.catalog.load_table(f"{self.namespace}.{name}")

    def _commit(self, batch: Batch) -> None:
        from pyiceberg.exceptions import CommitFailedException
        paths = [f["path"] for f in batch.files]
        props = {BATCH_PROPERTY: batch.id, NODE_PROPERTY: self.node}
        delay = RETRY_FIRST_S
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            started = time.monotonic()
            try:
                if batch.relocates:
                    self._overwrite(batch, props)
                else:
                    self._table(batch.table).add_files(paths, snapshot_properties=props, check_duplicate_files=False)
                self.last.commit_seconds.append(time.monotonic() - started)
                self.ledger.commits += 1
                return
            except CommitFailedException:  # another writer moved the table: the same files on the new head
                self.ledger.conflicts += 1
                self.last.conflicts += 1
            except Exception as e:  # the outcome is unknown: look before trying again
                log.warning("iceberg: committing batch %s to %s: %s (attempt %d)", batch.id, batch.table, e, attempt)
                try:
                    if self._landed(batch):
                        self.ledger.commits += 1
                        return
                except Exception as look:
                    log.warning("iceberg: cannot tell whether batch %s landed: %s", batch.id, look)
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, RETRY_MAX_S)
        raise PublishError(f"batch {batch.id} ({len(paths)} file(s) for {self.namespace}.{batch.table}) was not "
                           f"committed after {COMMIT_ATTEMPTS} attempts; the next pass tries again")

    def _overwrite(self, batch: Batch, props: dict[str, str]) -> None:
        """One snapshot that deletes the data files `batch.replaces` and adds `batch.files`."""
        from pyiceberg.io.pyarrow import parquet_file_to_data_file
        table = self._table(batch.table)
        held = relocations.affected(table, self.node, batch.relocates)
        missing = [p for p in batch.replaces if p not in held]
        if missing:
            raise PublishError(f"batch {batch.id}: data files {', '.join(missing)} are no longer in the table")
        with table.transaction() as tx:
            with tx.update_snapshot(snapshot_properties=props).overwrite() as change:
                for path in batch.replaces:
                    change.delete_data_file(held[path])
                for f in batch.files:
                    change.append_data_file(parquet_file_to_data_file(table.io, tx.table_metadata, f["path"]))

    def _landed(self, batch: Batch) -> bool:
        """Whether the table holds the batch: a snapshot that names it, or (its snapshot
        expired since) one of its data files among the table's."""
        table = self._table(batch.table)
        if any(s.summary is not None and s.summary.get(BATCH_PROPERTY) == batch.id for s in table.snapshots()):
            return True
        if table.current_snapshot() is None:
            return False
        present = table.inspect.data_files().column("file_path")
        if batch.relocates:  # an overwrite landed when the files it replaces are gone
            replaced = pa.array(batch.replaces, pa.string())
            return not bool(pc.any(pc.is_in(present, value_set=replaced)).as_py() or False)
        paths = pa.array([f["path"] for f in batch.files], pa.string())
        return bool(pc.any(pc.is_in(present, value_set=paths)).as_py() or False)


def enable(data_dir: Path, namespace: str) -> int:
    """Turn the outbox on, queueing what was sealed before (returns how many files); refuse
    a catalog rebuilt since it was published (CatalogRebuilt)."""
    catalog_dir, home = Path(data_dir) / "catalog", Path(data_dir) / "iceberg"
    published = ledgers.load(home).instance_files
    if not iceberg_outbox.enabled(catalog_dir) and published:
        raise CatalogRebuilt(
            f"{catalog_dir} was rebuilt after {published} of its files were published to {namespace}.{INSTANCES}: "
            f"publishing it again would count its rows twice; remove this node's files from the table "
            f"(docs/scale-out.md) and {home / ledgers.LEDGER}, then start again")
    return iceberg_outbox.enable(catalog_dir)


def _copy_local(src: Path, dst: Path) -> None:
    """A warehouse on a local file system: copy, fsync, rename, so a crash never leaves a
    torn data file under the name a commit refers to."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with open(src, "rb") as a, open(tmp, "wb") as b:
        shutil.copyfileobj(a, b, COPY_CHUNK)
        b.flush()
        os.fsync(b.fileno())
    os.replace(tmp, dst)
