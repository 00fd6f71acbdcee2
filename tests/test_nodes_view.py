"""A node's local view of the other nodes (catalog/cluster_view.py, engine/iceberg/view.py):
what two nodes published to one SQLite Iceberg catalog, folded by each into local Parquet
and read through the catalog as one archive. No servers: the real publisher, the real
refresher, the real catalog reader, on real files (tests/test_nodes.py runs the nodes)."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stowage.catalog import cluster_view, tombstones
from stowage.catalog.reader import Catalog
from stowage.catalog.schema import SCHEMA
from stowage.catalog.sealer import seal_rows
from stowage.engine.iceberg.view import Refresher
from stowage.engine.runtime.config import Config
from stowage.engine.store.served_versions import ServedVersions
from test_iceberg_catalog import _catalog, _publish_here, _sqlite

T0 = 1_700_000_000_000_000


def _seal(node: Path, uids: list[str], study: str, at: int = T0, segment: str = "000-00000001.seg") -> None:
    (node / "catalog").mkdir(parents=True, exist_ok=True)
    seal_rows(node / "catalog", [{**{c: None for c in SCHEMA.names}, "sop_instance_uid": uid,
                                  "study_instance_uid": study, "series_instance_uid": study + ".1",
                                  "patient_id": "P", "segment": segment, "offset": i * 100, "record_length": 100,
                                  "dataset_crc32": at % 1000, "received_at": at + i} for i, uid in enumerate(uids)])


@pytest.fixture
def two(tmp_path):
    uri, warehouse = _sqlite(tmp_path), (tmp_path / "warehouse").as_uri()
    nodes = {n: tmp_path / n for n in ("node-a", "node-b")}

    def publish(name: str) -> None:
        code, out = _publish_here(nodes[name], uri, STOWAGE_ICEBERG_WAREHOUSE=warehouse)
        assert code == 0, out

    def refresher(name: str) -> Refresher:
        return Refresher(Config(data_dir=nodes[name], iceberg_catalog=uri, iceberg_warehouse=warehouse,
                                node_name=name))
    return nodes, publish, refresher, uri


def _uids(catalog: Catalog, study: str | None = None) -> list[str]:
    sql = "SELECT sop_instance_uid FROM instances" + (" WHERE study_instance_uid = ?" if study else "") + " ORDER BY 1"
    return [r[0] for r in catalog.execute(sql, [study] if study else [])[1]]


def test_each_node_folds_the_others_rows_and_names_their_segments(two):
    nodes, publish, refresher, _uri = two
    _seal(nodes["node-a"], ["1.1", "1.2"], "9.1")
    _seal(nodes["node-b"], ["2.1"], "9.2")
    publish("node-a")
    publish("node-b")
    done = refresher("node-b").refresh()
    assert (done.instance_files, done.instance_rows) == (1, 2), "a's file only, not b's own"
    whole = Catalog(nodes["node-b"] / "catalog", cluster=True)
    assert _uids(whole) == ["1.1", "1.2", "2.1"]
    cols, rows = whole.execute("SELECT segment FROM instances WHERE sop_instance_uid = '1.1'")
    assert rows == [("@node-a/000-00000001.seg",)]
    assert cluster_view.split_segment(rows[0][0]) == ("node-a", "000-00000001.seg")
    # study-level answers come from the view's study summaries too
    _c, studies = whole.execute("SELECT study_instance_uid, sum(instances) FROM study_parts GROUP BY 1 ORDER BY 1")
    assert studies == [("9.1", 2), ("9.2", 1)]
    own = Catalog(nodes["node-b"] / "catalog")  # compaction, verify, quota: this node's records only
    assert _uids(own) == ["2.1"]
    # new files of a's arrive at the next refresh, and only those are fetched
    _seal(nodes["node-a"], ["1.3"], "9.1", at=T0 + 50)
    publish("node-a")
    again = refresher("node-b").refresh()
    assert (again.instance_files, again.instance_rows, again.whole) == (1, 1, [])
    assert _uids(whole, "9.1") == ["1.1", "1.2", "1.3"], "the open reader sees the refreshed view"


def test_a_deletion_on_one_node_hides_the_record_on_the_other(two):
    nodes, publish, refresher, _uri = two
    _seal(nodes["node-b"], ["3.1", "3.2"], "9.3")
    _seal(nodes["node-a"], ["3.9"], "9.9")  # a holds records of its own too
    publish("node-b")
    refresher("node-a").refresh()
    on_a = Catalog(nodes["node-a"] / "catalog", cluster=True)
    assert _uids(on_a, "9.3") == ["3.1", "3.2"]
    # a deletes b's record (the row a's view holds) and publishes it; b folds it
    tombstones.append(nodes["node-a"], [tombstones.Tombstone("3.1", T0, "deleted", "9.3")])
    assert _uids(on_a, "9.3") == ["3.2"], "hidden on a at once: its own tombstone"
    publish("node-a")
    on_b = Catalog(nodes["node-b"] / "catalog", cluster=True)
    assert _uids(on_b, "9.3") == ["3.1", "3.2"]
    served = ServedVersions(on_b)  # the store path's cache of what b serves, per study
    assert served.get("9.3", "3.1") is not None
    done = refresher("node-b").refresh()
    assert done.deletion_rows == 1
    assert _uids(on_b, "9.3") == ["3.2"], "hidden on b after its view's refresh"
    assert served.get("9.3", "3.1") is None, "a copy sent again to b is stored, not answered as held"
    _c, gone = on_b.execute("SELECT sop_instance_uid, reason FROM deleted")
    assert gone == [("3.1", "deleted")]
    # a's tombstone of b's record leaves a's own log (pruning: no record of a's holds it);
    # a keeps hiding it, from its own deletions in the table
    tombstones.prune(nodes["node-a"], {("3.1", T0)})
    refresher("node-a").refresh()
    assert _uids(Catalog(nodes["node-a"] / "catalog", cluster=True), "9.3") == ["3.2"]


@pytest.mark.parametrize("policy, served", [("keep-newest", "node-b"), ("keep-first", "node-a")])
def test_one_uid_on_two_nodes_is_served_once_by_the_policy(two, policy, served):
    nodes, publish, refresher, _uri = two
    _seal(nodes["node-a"], ["4.1", "4.2"], "9.4", at=T0)          # a received it first
    _seal(nodes["node-b"], ["4.1"], "9.4", at=T0 + 1_000_000)    # b a second later
    publish("node-a")
    publish("node-b")
    for name in nodes:
        refresher(name).refresh()
    for name in nodes:
        whole = Catalog(nodes[name] / "catalog", policy, cluster=True)
        assert _uids(whole) == ["4.1", "4.2"], f"one row per UID on {name}"
        _c, rows = whole.execute("SELECT segment FROM instances WHERE sop_instance_uid = '4.1'")
        seg = rows[0][0]
        holder = cluster_view.split_segment(seg)[0] if seg.startswith("@") else name
        assert holder == served, (name, policy, seg)
        _c, count = whole.execute("SELECT sum(instances) FROM study_parts WHERE study_instance_uid = '9.4'")
        assert count == [(2,)], "the study counts the instance once"


def test_an_expired_snapshot_reads_the_table_whole(two):
    nodes, publish, refresher, uri = two
    _seal(nodes["node-a"], ["5.1"], "9.5")
    publish("node-a")
    b = refresher("node-b")
    b.refresh()
    _seal(nodes["node-a"], ["5.2"], "9.5", at=T0 + 10)
    publish("node-a")
    _seal(nodes["node-a"], ["5.3"], "9.5", at=T0 + 20)
    publish("node-a")
    table = _catalog(uri).load_table("stowage.instances")
    seen = cluster_view.load(cluster_view.directory(nodes["node-b"])).snapshots["instances"]
    current = table.current_snapshot().snapshot_id
    table.maintenance.expire_snapshots().by_ids(
        [s.snapshot_id for s in table.snapshots() if s.snapshot_id != current]).commit()
    assert seen not in {s.snapshot_id for s in _catalog(uri).load_table("stowage.instances").snapshots()}
    done = b.refresh()
    assert done.whole == ["instances"] and done.instance_files == 2, done
    view = cluster_view.load(cluster_view.directory(nodes["node-b"]))
    assert view.rows == 3 and len(view.instances) == 3
    assert _uids(Catalog(nodes["node-b"] / "catalog", cluster=True)) == ["5.1", "5.2", "5.3"]
    for name in view.instances:
        assert pq.ParquetFile(cluster_view.directory(nodes["node-b"]) / name).metadata.num_rows == 1


def test_a_deletion_is_not_pruned_before_it_is_published(two):
    """a deletes b's record; a's compaction would prune the tombstone at once (no record of
    a's holds it), but it stays in a's log until a's publisher has put it in the table."""
    nodes, publish, refresher, _uri = two
    a = nodes["node-a"]
    _seal(nodes["node-b"], ["7.1"], "9.7")
    _seal(a, ["7.9"], "9.8")
    publish("node-b")
    publish("node-a")
    tombstones.append(a, [tombstones.Tombstone("7.1", T0, "deleted", "9.7")])
    assert tombstones.prune(a, {("7.1", T0)}) == 0, "not in the deletions table yet: kept"
    publish("node-a")
    assert tombstones.prune(a, {("7.1", T0)}) == 1, "published: pruned"
    refresher("node-b").refresh()
    assert _uids(Catalog(nodes["node-b"] / "catalog", cluster=True), "9.7") == []


def test_a_compaction_is_relocated_in_the_table_and_in_the_other_views(two):
    """The catalog side of a compaction on node a (catalog/relocate.py, as compaction calls
    it), published as one overwrite of a's data files (engine/iceberg/relocations.py): a
    reader of the table and b's view find a's live records in the new segment at their new
    offsets, the dropped one nowhere; a record in a segment not compacted stays put."""
    from stowage.catalog import manifest, relocate
    nodes, publish, refresher, uri = two
    a = nodes["node-a"]
    _seal(a, ["6.1", "6.2", "6.3"], "9.6")                          # 000-00000001.seg, offsets 0, 100, 200
    _seal(a, ["6.9"], "9.6", at=T0 + 9, segment="000-00000002.seg")
    publish("node-a")
    b = refresher("node-b")
    b.refresh()
    old = sorted(cluster_view.load(cluster_view.directory(nodes["node-b"])).instances)
    # 6.2 dead (dropped), 6.1 and 6.3 copied into 999-00000001.seg
    moves = {("000-00000001.seg", 0): 0, ("000-00000001.seg", 200): 100}
    catalog_dir = a / "catalog"
    files = relocate.holding(catalog_dir, sorted(manifest.load(catalog_dir).files), ["000-00000001.seg"])
    rewritten = relocate.rewrite(catalog_dir, files, ["000-00000001.seg"], "999-00000001.seg", moves, "compact-t-")
    relocate.commit(catalog_dir, rewritten, ["000-00000001.seg"], "999-00000001.seg", 200, moves, "compact-t-")
    assert manifest.load(catalog_dir).relocations == {"000-00000001.seg": 0.0}
    publish("node-a")
    assert manifest.load(catalog_dir).relocations == {}, "relocated; never uploaded, so nothing to keep"
    table = _catalog(uri).load_table("stowage.instances")
    assert table.current_snapshot().summary.operation.value == "overwrite"
    rows = table.scan(selected_fields=("sop_instance_uid", "segment", "offset")).to_arrow().sort_by("sop_instance_uid")
    assert rows.to_pylist() == [{"sop_instance_uid": "6.1", "segment": "999-00000001.seg", "offset": 0},
                                {"sop_instance_uid": "6.3", "segment": "999-00000001.seg", "offset": 100},
                                {"sop_instance_uid": "6.9", "segment": "000-00000002.seg", "offset": 0}]
    done = b.refresh()
    view = cluster_view.load(cluster_view.directory(nodes["node-b"]))
    assert done.instance_files == 1 and view.rows == 3
    assert len(set(old) & set(view.instances)) == 1 and len(view.instances) == 2, "the rewritten file replaced"
    _c, got = Catalog(nodes["node-b"] / "catalog", cluster=True).execute(
        "SELECT sop_instance_uid, segment, \"offset\" FROM instances ORDER BY 1")
    assert got == [("6.1", "@node-a/999-00000001.seg", 0), ("6.3", "@node-a/999-00000001.seg", 100),
                   ("6.9", "@node-a/000-00000002.seg", 0)]


@pytest.mark.parametrize("value", ["000-00000001.seg", "@../x.seg", "@a/../x.seg", "@a/b/c.seg", "@./x.seg",
                                   "@a/x.txt", "@a b/x.seg", "@a/.x.seg"])
def test_a_segment_value_names_another_node_only_safely(value):
    assert cluster_view.split_segment(value) is None
