"""The catalog on its own: sealing, size-tiered compaction, the manifest, dedup views."""
from __future__ import annotations

import pyarrow as pa

from catalog import manifest
from catalog.reader import Catalog
from catalog.schema import SCHEMA
from catalog.sealer import Sealer, _pick, compact


def row(uid: str, seg: str, offset: int, at: int, crc: int = 1) -> dict:
    r = {name: None for name in SCHEMA.names}
    r.update(sop_instance_uid=uid, study_instance_uid="1.2", series_instance_uid="1.2.3", segment=seg,
             offset=offset, record_length=10, dataset_length=5, stored_length=5, dataset_crc32=crc,
             received_at=at)
    return r


def test_tail_rows_are_visible_at_once_and_after_sealing(tmp_path):
    s = Sealer(tmp_path, 0, compact_min_files=100)
    c = Catalog(tmp_path)
    s.commit([row("1.1", "000-00000001.seg", 0, 1), row("1.2", "000-00000001.seg", 10, 2)])
    assert c.lookup("1.1") is not None and c.lookup("1.2") is not None
    s.seal()
    assert list((tmp_path / "tails").iterdir()) == [], "a sealed tail file is removed"
    assert c.execute("SELECT count(*) FROM records")[1] == [(2,)]
    assert manifest.load(tmp_path).watermarks == {"000-00000001.seg": 20}
    s.close()
    c.close()


def test_duplicates_view_follows_policy(tmp_path):
    s = Sealer(tmp_path, 0)
    s.commit([row("1.1", "000-00000001.seg", 0, 1, crc=10)])
    s.seal()
    s.commit([row("1.1", "000-00000001.seg", 10, 2, crc=20)])
    assert Catalog(tmp_path, "keep-newest").lookup("1.1")["dataset_crc32"] == 20
    assert Catalog(tmp_path, "keep-first").lookup("1.1")["dataset_crc32"] == 10
    assert len(Catalog(tmp_path).versions("1.1")) == 2


def test_compaction_is_size_tiered(tmp_path):
    files = {f"a{i}": 100 for i in range(7)} | {"big": 5000}
    assert _pick(files, 8) == []
    files["a7"] = 100
    assert _pick(files, 8) == sorted(f"a{i}" for i in range(8))
    assert "big" not in _pick(files | {f"b{i}": 4000 for i in range(7)}, 8)


def test_compaction_merges_and_keeps_every_row(tmp_path):
    s = Sealer(tmp_path, 0, compact_min_files=1000)
    for i in range(8):
        s.commit([row(f"1.{i}.{j}", "000-00000001.seg", (i * 3 + j) * 10, i) for j in range(3)])
        s.seal()
    assert len(manifest.load(tmp_path).files) == 8
    assert compact(tmp_path, 8) is not None
    m = manifest.load(tmp_path)
    assert len(m.files) == 1 and len(m.retired) == 8
    assert Catalog(tmp_path).execute("SELECT count(DISTINCT sop_instance_uid) FROM instances")[1] == [(24,)]
