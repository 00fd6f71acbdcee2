"""The catalog on its own: sealing, size-tiered compaction, the manifest, dedup views."""
from __future__ import annotations

import pyarrow as pa

from stowage.catalog import manifest, sealed_uids
from stowage.catalog.reader import Catalog
from stowage.catalog.schema import SCHEMA
from stowage.catalog.sealer import Sealer, _pick, compact


def row(uid: str, seg: str, offset: int, at: int, crc: int = 1, patient: str | None = None) -> dict:
    r = {name: None for name in SCHEMA.names}
    r.update(sop_instance_uid=uid, study_instance_uid="1.2", series_instance_uid="1.2.3", segment=seg,
             offset=offset, record_length=10, dataset_length=5, stored_length=5, dataset_crc32=crc,
             received_at=at, patient_id=patient)
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


# --- duplicates: the versions table, the sealed-UID filter, tails ----------------------


def _kept(c: Catalog, uid: str) -> int | None:
    row = c.lookup(uid)
    return row["dataset_crc32"] if row else None


def test_duplicates_across_sealed_files_are_in_the_versions_table(tmp_path):
    s = Sealer(tmp_path, 0, compact_min_files=100)
    s.commit([row("1.1", "000-00000001.seg", 0, 1, crc=10), row("1.2", "000-00000001.seg", 10, 1)])
    s.seal()
    assert manifest.load(tmp_path).duplicates == ""  # nothing duplicated yet
    s.commit([row("1.1", "000-00000001.seg", 20, 2, crc=20)])
    s.seal()
    m = manifest.load(tmp_path)
    assert m.duplicates and (tmp_path / m.duplicates).exists()
    assert _kept(Catalog(tmp_path, "keep-newest"), "1.1") == 20
    assert _kept(Catalog(tmp_path, "keep-first"), "1.1") == 10
    c = Catalog(tmp_path)
    assert c.execute("SELECT count(*) FROM instances")[1] == [(2,)]
    assert c.execute("SELECT count(*) FROM records")[1] == [(3,)]


def test_a_tail_row_duplicating_a_sealed_one_is_resolved_at_read_time(tmp_path):
    s = Sealer(tmp_path, 0, compact_min_files=100)
    s.commit([row("1.1", "000-00000001.seg", 0, 1, crc=10, patient="OLD")])
    s.seal()
    other = Sealer(tmp_path, 1, compact_min_files=100)  # another worker's tail
    other.commit([row("1.1", "001-00000001.seg", 0, 2, crc=20, patient="NEW")])
    newest, first = Catalog(tmp_path, "keep-newest"), Catalog(tmp_path, "keep-first")
    assert _kept(newest, "1.1") == 20 and _kept(first, "1.1") == 10
    # a filter on instances sees only the kept record, never an older one that matches
    sql = "SELECT dataset_crc32 FROM instances WHERE patient_id = ?"
    assert newest.execute(sql, ["OLD"])[1] == [] and newest.execute(sql, ["NEW"])[1] == [(20,)]
    assert first.execute(sql, ["NEW"])[1] == [] and first.execute(sql, ["OLD"])[1] == [(10,)]
    other.seal()
    assert _kept(Catalog(tmp_path, "keep-newest"), "1.1") == 20
    assert _kept(Catalog(tmp_path, "keep-first"), "1.1") == 10


def test_two_tails_holding_the_same_uid(tmp_path):
    a, b = Sealer(tmp_path, 0, compact_min_files=100), Sealer(tmp_path, 1, compact_min_files=100)
    a.commit([row("1.1", "000-00000001.seg", 0, 1, crc=10)])
    b.commit([row("1.1", "001-00000001.seg", 0, 2, crc=20)])
    assert _kept(Catalog(tmp_path, "keep-newest"), "1.1") == 20
    assert _kept(Catalog(tmp_path, "keep-first"), "1.1") == 10
    a.seal()
    b.seal()  # sealed in either order, the versions table has both
    assert _kept(Catalog(tmp_path, "keep-newest"), "1.1") == 20
    assert _kept(Catalog(tmp_path, "keep-first"), "1.1") == 10
    assert Catalog(tmp_path).execute("SELECT count(*) FROM instances")[1] == [(1,)]


def test_a_lost_or_stale_uid_filter_is_rebuilt(tmp_path):
    s = Sealer(tmp_path, 0, compact_min_files=100)
    s.commit([row("1.1", "000-00000001.seg", 0, 1, crc=10)])
    s.seal()
    (tmp_path / sealed_uids.FILTER).unlink()
    c = Catalog(tmp_path)
    s.commit([row("1.1", "000-00000001.seg", 10, 2, crc=20)])  # no filter: tails are checked exactly
    assert _kept(c, "1.1") == 20
    s.seal()  # rebuilds the filter from the sealed files, and finds the duplicate
    assert manifest.load(tmp_path).duplicates
    assert _kept(Catalog(tmp_path, "keep-first"), "1.1") == 10


def test_old_parquet_files_without_newer_columns_still_read_and_compact(tmp_path):
    import pyarrow.parquet as pq
    old = SCHEMA.remove(SCHEMA.get_field_index("header"))
    for i in range(2):
        table = pa.Table.from_pylist([row(f"1.{i}", "000-00000001.seg", i * 10, i)], schema=old)
        pq.write_table(table, tmp_path / f"old-{i}.parquet")
    with manifest.update(tmp_path) as m:
        m.files.update({"old-0.parquet": 1, "old-1.parquet": 1})
    s = Sealer(tmp_path, 0, compact_min_files=100)
    s.commit([row("1.9", "000-00000001.seg", 100, 9)])
    s.seal()
    c = Catalog(tmp_path)
    assert c.execute("SELECT count(*), count(header) FROM instances")[1] == [(3, 0)]
    assert compact(tmp_path, 2) is not None
    assert Catalog(tmp_path).execute("SELECT count(*) FROM instances")[1] == [(3,)]


def test_tail_uids_reads_each_new_row_once_and_skips_our_own_tail(tmp_path):
    from stowage.catalog.tail import TailUids, TailWriter
    other = TailWriter(tmp_path / "001-99-00000001.tail")
    mine = TailWriter(tmp_path / "000-98-00000001.tail")
    learner = TailUids(tmp_path, skip_prefix="000-")
    assert learner.read() == []
    other.append([{"sop_instance_uid": "1.1"}, {"sop_instance_uid": "1.2"}])
    mine.append([{"sop_instance_uid": "9.9"}])
    assert learner.read() == ["1.1", "1.2"]
    assert learner.read() == []
    with open(other.path, "ab") as f:  # half a batch: a writer in the middle of its write
        import msgpack
        data = msgpack.packb([{"sop_instance_uid": "1.3"}], use_bin_type=True)
        f.write(data[:5])
        f.flush()
        assert learner.read() == []
        f.write(data[5:])
    assert learner.read() == ["1.3"]
    other.path.unlink()  # sealed and removed: forgotten
    assert learner.read() == []


def test_batches_packed_by_many_threads_read_back_whole_and_as_msgpack_packs_them(tmp_path):
    """Tails and record headers are packed with a msgpack Packer kept per thread (not one
    made per call): every thread's batches must be the bytes msgpack.packb gives, and read
    back row for row, whichever thread packed them."""
    import threading

    import msgpack

    from stowage.catalog.tail import TailReader, TailWriter, packb
    batches = [[row(f"1.2.{t}.{b}.{i}", "000-00000001.seg", i * 100, 1_700_000_000_000_000 + i, crc=i)
                for i in range(1 + (t * 7 + b) % 20)] for t in range(4) for b in range(25)]
    packed: dict[int, bytes] = {}

    def pack(t: int) -> None:
        for b in range(25):
            packed[t * 25 + b] = packb(batches[t * 25 + b])

    threads = [threading.Thread(target=pack, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [packed[i] for i in range(100)] == [msgpack.packb(b, use_bin_type=True) for b in batches]
    tail = TailWriter(tmp_path / "000-1-00000001.tail")
    for b in batches:
        tail.append(b)
    tail.close()
    assert tail.path.read_bytes() == b"".join(packed[i] for i in range(100))
    assert TailReader(tmp_path).read()["sop_instance_uid"].to_pylist() == [r["sop_instance_uid"] for b in batches
                                                                            for r in b]


def test_filter_positions_are_the_formulas_whether_the_digest_was_kept_or_not():
    """The store path probes several filters with one UID and the filters keep the last
    UID's digest (catalog/bloom.py): the positions must stay the on-disk formula, for the
    same UID twice, for UIDs that share a prefix or a length, and with threads interleaving."""
    import hashlib
    import struct
    import threading

    from stowage.catalog.bloom import UidFilter, positions

    def formula(uid: str, bits: int) -> list[int]:
        h1, h2 = struct.unpack("<QQ", hashlib.blake2b(uid.encode(), digest_size=16).digest())
        return [(h1 + i * h2) % bits for i in range(4)]

    uids = [f"1.2.826.0.1.{i % 7}.{i}" for i in range(400)] + ["1.2.3", "1.2.3", "1.2.4", "1.2.30"]
    wrong: list[str] = []

    def probe(offset: int) -> None:
        for uid in uids[offset:] + uids[:offset]:
            for bits in (1 << 27, 1 << 28, 1000003):
                if list(positions(uid, bits, 4)) != formula(uid, bits):
                    wrong.append(uid)

    threads = [threading.Thread(target=probe, args=(k * 97,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    f = UidFilter()
    f.add("1.2.3")
    assert "1.2.3" in f and "1.2.30" not in f and "1.2.4" not in f


def test_tail_uids_are_found_whatever_else_a_row_holds_and_wherever_a_read_stops(tmp_path):
    """The learner finds UIDs in the msgpack bytes by their key, unpacking nothing: a value
    or a header holding the key's bytes must not hide a real UID, at any cut of the stream."""
    import msgpack
    from stowage.catalog.tail import TailUids
    uids = ["1.2.840.10008.1", "1." + "2" * 40, "1.2." + "3" * 58, "9"]  # fixstr and str8 lengths, 64 at most
    rows = [{"patient_name": "sop_instance_uid", "sop_instance_uid": uids[0], "header": b"\xb0sop_instance_uid"},
            {"header": b"x\xb0sop_instance_uid\xa31.9", "sop_instance_uid": uids[1]},  # a fake field: a UID too many
            {"study_description": "sop_instance_uid", "sop_instance_uid": uids[2]},
            {"header": b"\xb0sop_instance_uid\xd9", "sop_instance_uid": uids[3], "z": "a" * 300}]
    data = msgpack.packb(rows[:2], use_bin_type=True) + msgpack.packb(rows[2:], use_bin_type=True)
    for cut in range(len(data) + 1):
        path = tmp_path / f"{cut}" / "001-99-00000001.tail"
        path.parent.mkdir()
        learner = TailUids(path.parent, skip_prefix="000-")
        path.write_bytes(data[:cut])
        got = learner.read()
        with open(path, "ab") as f:
            f.write(data[cut:])
        got += learner.read()
        assert [u for u in got if u != "1.9"] == uids, cut
        assert learner.read() == []


def test_a_sealed_files_study_summary_is_what_the_readers_sql_makes_of_its_rows():
    """catalog.studies summarises a seal with pyarrow; readers summarise tails and files
    without a summary with studies.summary_sql in DuckDB: both must agree, nulls included."""
    import duckdb

    from stowage.catalog import studies

    def r(uid, study, series, modality, at, header, patient=None, date=None):
        x = row(uid, "000-00000001.seg", int(uid.split(".")[-1]) * 10, at, patient=patient)
        x.update(study_instance_uid=study, series_instance_uid=series, modality=modality, header=header,
                 study_date=date, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid=f"ts{at}")
        return x
    table = pa.Table.from_pylist([
        r("1.1", "2.1", "3.1", "MR", 5, b"old", "P1", "20240101"),
        r("1.2", "2.1", "3.2", None, 9, None, None, "20250101"),   # newest, but no header: the older one's is kept
        r("1.3", "2.1", "3.1", "SR", 7, b"mid", "P0", None),
        r("1.4", "2.2", "3.9", None, 1, None),                      # nothing but nulls to summarise
    ], schema=SCHEMA)
    mine = studies.summarise(table)
    con = duckdb.connect()
    con.register("t", table)
    theirs = con.sql(studies.summary_sql("t") + " ORDER BY study_instance_uid").to_arrow_table()
    con.close()
    assert mine.column_names == list(studies.COLUMNS) == theirs.column_names
    for name in studies.COLUMNS:
        a, b = mine[name].to_pylist(), theirs[name].to_pylist()
        if name in ("series", "modalities", "sop_classes"):
            a, b = [sorted(v) for v in a], [sorted(v) for v in b]
        assert a == b, name
    assert mine["header"].to_pylist() == [b"mid", None] and mine["instances"].to_pylist() == [3, 1]
    assert sorted(mine["modalities"].to_pylist()[0]) == ["MR", "SR"] and mine["modalities"].to_pylist()[1] == []
