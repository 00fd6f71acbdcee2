"""The local view of the other nodes of a multi-node archive (issue #24): what they
published to the Iceberg tables, folded into `<data_dir>/cluster/` so that C-FIND, QIDO
and retrieval answer from local disk, not the network.

    cluster/view.json        which snapshot of each table the view is at, its files, a generation
    cluster/<node>--<file>   a data file of another node's: instances (with its study
                             summary beside it) or deletions
    cluster/versions-<id>.parquet  the records of UIDs held by more than one node

An instances file is the node's sealed catalog file with one change: its `segment` column
names the node too, `@<node>/<segment>`, so that a reader asking for
`segments/@<node>/<segment>` reaches that node's segment in the object store (engine/iceberg/
nodes.py) and every other reader (compaction, verify, quota) never opens a view at all.
The refresher (engine/iceberg/view.py) writes files first, then replaces view.json
atomically; readers open only the files view.json names.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stowage.catalog.durable import file_stamp, replace_durably

DIRECTORY = "cluster"
VIEW = "view.json"
MARK = "@"   # a segment of another node: "@<node>/<segment>"
_NODE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class View:
    snapshots: dict[str, int | None] = field(default_factory=dict)  # table -> snapshot id folded up to
    instances: dict[str, str] = field(default_factory=dict)          # local file name -> node
    deletions: dict[str, str] = field(default_factory=dict)          # local file name -> node
    rows: int = 0                                                    # instance rows in the view
    # every record of each UID that this node and another, or two others, both hold (the
    # versions table's columns, catalog/versions_table.py): "" when there is none
    versions: str = ""
    generation: int = 0
    refreshed_at: float = 0.0                                        # time.time() of the last refresh that looked


def directory(data_dir: Path) -> Path:
    return Path(data_dir) / DIRECTORY


def load(view_dir: Path) -> View:
    try:
        with open(view_dir / VIEW, "rb") as f:
            return View(**json.load(f))
    except FileNotFoundError:
        return View()


def save(view_dir: Path, view: View) -> None:
    view_dir.mkdir(parents=True, exist_ok=True)
    replace_durably(view_dir / VIEW, json.dumps(asdict(view)))


def stamp(view_dir: Path) -> tuple | None:
    """A value that changes whenever view.json is replaced (None: no view)."""
    return file_stamp(view_dir / VIEW)


DELETIONS_MARK = "deletions.gen"  # replaced whenever the view's deletions change


def mark_deletions(view_dir: Path, generation: int) -> None:
    """Say that the view's deletions changed (the store path's cache of what is served
    watches this one small file, as it watches the tombstone log)."""
    replace_durably(view_dir / DELETIONS_MARK, str(generation))


def deletions_stamp(view_dir: Path | None) -> tuple | None:
    """A value that changes whenever the view's deletions change (None: none yet)."""
    if view_dir is None:
        return None
    try:
        st = os.stat(view_dir / DELETIONS_MARK)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def node_segment(node: str, segment: str) -> str:
    """The `segment` value of another node's record in the view."""
    return f"{MARK}{node}/{segment}"


def split_segment(value: str) -> tuple[str, str] | None:
    """(node, segment) of a view's `segment` value; None for this node's own segments
    (or a value that names no node safely: it never becomes a path)."""
    if not value.startswith(MARK) or value.count("/") != 1:
        return None
    node, segment = value[1:].split("/")
    if not _NODE.match(node) or node in (".", "..") or not segment.endswith(".seg") or "/" in segment \
            or segment.startswith("."):
        return None
    return node, segment


class ViewUids:
    """The store path's "certainly not held by another node?" gate: a Bloom filter of the
    SOP Instance UIDs in the view's instance files, each file's UIDs read once (a table
    read whole starts it afresh). Fixed size, like the filter of this node's own UIDs."""

    def __init__(self, data_dir: Path) -> None:
        from stowage.catalog.bloom import UidFilter
        self._new = UidFilter
        self.dir = directory(data_dir)
        self.filter = UidFilter()
        self._stamp: tuple | None = None
        self._read: set[str] = set()

    def refresh(self) -> None:
        import pyarrow.parquet as pq
        now = stamp(self.dir)
        if now == self._stamp:
            return
        self._stamp = now
        files = set(load(self.dir).instances)
        if self._read - files:
            self.filter, self._read = self._new(), set()
        for name in sorted(files - self._read):
            try:
                uids = pq.read_table(self.dir / name, columns=["sop_instance_uid"])["sop_instance_uid"]
            except FileNotFoundError:  # swept meanwhile: the view no longer names it
                continue
            self.filter.update(u for u in uids.to_pylist() if u)
            self._read.add(name)

    def may_hold(self, uid: str) -> bool:
        return uid in self.filter


class ViewRejections:
    """The store path's "rejected on another node?" check (rejected_reaccept off): the SOP
    Instance UIDs that the view's deletions reject (reason `rejected:<code>`), so that a
    copy sent to any node is refused as the node that received the note refuses it. Read
    again only when the view's deletions change: one stat() per question."""

    def __init__(self, data_dir: Path) -> None:
        import threading
        self.dir = directory(data_dir)
        self._stamp: object = ()          # never a stamp: the first question reads
        self._read: set[str] = set()      # deletions files read
        self._uids: dict[str, str] = {}   # uid -> CID 7011 code
        self._lock = threading.Lock()

    def code(self, uid: str) -> str | None:
        now = deletions_stamp(self.dir)
        if now != self._stamp:
            with self._lock:
                self._reload()
                self._stamp = now
        return self._uids.get(uid)

    def _reload(self) -> None:
        import pyarrow.parquet as pq
        files = set(load(self.dir).deletions)
        if self._read - files:  # a table read whole: start afresh
            self._read, self._uids = set(), {}
        for name in sorted(files - self._read):
            try:
                t = pq.read_table(self.dir / name, columns=["sop_instance_uid", "reason"])
            except FileNotFoundError:  # swept meanwhile: the view no longer names it
                continue
            for uid, reason in zip(t["sop_instance_uid"].to_pylist(), t["reason"].to_pylist()):
                if uid and reason and reason.startswith("rejected:"):
                    self._uids[uid] = reason[len("rejected:"):]
            self._read.add(name)
