"""`stowage verify` and the background scrub: bytes flipped inside segment records (payload,
header, and a payload whose record CRC was recomputed over the damage) are found, reported
in the CSV, audited, marked; a marked record is failed by storage commitment (0x0110) and
never sent by C-MOVE, C-GET, send or export while the others are; the server's scrub finds
damage by itself and counts it on /metrics. Instances go in with DCMTK storescu."""
from __future__ import annotations

import csv
import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from conftest import CT, HOST, cli, copies, export_all, free_port, storescu
from page_cache import file_system, resident_pages
from test_commitment import Modality
from test_get import _pyn_get, getscu, received
from test_metrics import scrape
from test_move import _pyn_move
from test_send import RLE_SRC, config_with, flip_payload, scps, stowage  # noqa: F401  (scps: fixture)

pytestmark = pytest.mark.timeout(300)



def verify(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`stowage verify -q`, run in this process (conftest.cli: the same command code, exit code
    and output, without a new interpreter's imports, 1.5-3 s a run on the 2-core machine)."""
    return cli("verify", "--data-dir", str(data_dir), "-q", *args)


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def location(data_dir: Path, uid: str) -> tuple[str, int]:
    from stowage.catalog.reader import Catalog
    catalog = Catalog(data_dir / "catalog")
    try:
        row = catalog.lookup(uid)
    finally:
        catalog.close()
    return row["segment"], row["offset"]


def flip_header(data_dir: Path, uid: str) -> None:
    """Flip one bit of the SOP Instance UID inside the record's header (it still decodes)."""
    segment, offset = location(data_dir, uid)
    with open(data_dir / "segments" / segment, "r+b") as f:
        f.seek(offset)
        head = f.read(4096)
        at = head.index(uid.encode()) + len(uid) - 1
        f.seek(offset + at)
        f.write(bytes([head[at] ^ 0x01]))


def flip_under_crc(data_dir: Path, uid: str) -> None:
    """Flip payload bytes of an uncompressed record and recompute its record CRC: damage
    done before the CRC was computed, that only the dataset's CRC-32 can show."""
    from stowage.engine.store.segment import PREFIX_SIZE, crc32
    segment, offset = location(data_dir, uid)
    prefix = struct.Struct("<4sHHIQ")
    with open(data_dir / "segments" / segment, "r+b") as f:
        f.seek(offset)
        raw = f.read(PREFIX_SIZE)
        _magic, _version, flags, hlen, plen = prefix.unpack_from(raw)
        assert flags == 0, "the victim must be stored as it came (an encapsulated syntax)"
        header = f.read(hlen)
        payload = bytearray(f.read(plen))
        mid = plen - 64  # inside the pixel data, at the end of the dataset
        payload[mid:mid + 8] = bytes(b ^ 0xFF for b in payload[mid:mid + 8])
        crc = crc32(bytes(payload), crc32(header, crc32(raw[:prefix.size])))
        f.seek(offset + prefix.size)
        f.write(struct.pack("<I", crc))
        f.seek(offset + PREFIX_SIZE + hlen)
        f.write(payload)


def report_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def audit(data_dir: Path, event: str) -> list[dict]:
    lines = (data_dir / "audit.jsonl").read_text().splitlines()
    return [d for d in map(json.loads, lines) if d.get("event") == event]


def same_study_rle(tmp_path: Path) -> Path:
    """An RLE instance (stored as it came, no zstd) in CT_small's patient and study."""
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    path = copies(RLE_SRC, tmp_path / "rle", 1, "rle")[0]
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.PatientID = ct.StudyInstanceUID, ct.PatientID
    ds.save_as(path)
    return path


def test_verify_marks_flipped_records_and_retrieve_commitment_export_skip_them(make_server, tmp_path, scps):
    dest = scps(tmp_path / "rx", aet="DEST")
    cfg = config_with(tmp_path, DEST=(HOST, dest.port))
    modality = Modality().listen()
    cfg.write_text(cfg.read_text() + f'[remotes.MODALITY]\nhost = "{HOST}"\nport = {modality.port}\n')
    server = make_server("--workers", "2", "--config", str(cfg), STOWAGE_SCRUB_RATE="0")
    try:
        ct = copies(CT, tmp_path / "ct", 5, "ct")
        rle = same_study_rle(tmp_path)
        storescu(server.port, ct)
        storescu(server.port, [rle], "-xr")
        data = server.data_dir

        clean = verify(data, "--report", str(tmp_path / "clean.csv"))  # while serve runs
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "verified 6 record(s)" in clean.stdout and "all intact" in clean.stdout
        assert report_rows(tmp_path / "clean.csv") == []

        payload, header, under = uid_of(ct[1]), uid_of(ct[3]), uid_of(rle)
        flip_payload(data, payload)
        flip_header(data, header)
        flip_under_crc(data, under)
        intact = {uid_of(p) for p in (ct[0], ct[2], ct[4])}

        r = verify(data, "--report", str(tmp_path / "r.csv"))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "3 corrupt record(s)" in r.stdout, r.stdout
        rows = {row["sop_instance_uid"]: row for row in report_rows(tmp_path / "r.csv")}
        assert set(rows) == {payload, header, under}, rows
        for uid, row in rows.items():
            assert (row["segment"], int(row["offset"])) == location(data, uid)
        assert "checksum mismatch" in rows[payload]["problem"]
        assert "checksum mismatch" in rows[header]["problem"]
        assert "dataset CRC-32" in rows[under]["problem"]  # the record CRC holds: only the dataset's shows it
        assert {d["sop_instance_uid"] for d in audit(data, "corrupt")} == {payload, header, under}
        again = verify(data)  # already marked: reported again, not marked twice
        assert again.returncode == 1 and "(0 newly marked)" in again.stdout, again.stdout
        assert len(audit(data, "corrupt")) == 3

        # C-MOVE to DCMTK storescp: the three are failed sub-operations, named; the rest arrive
        study = str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
        rsps = _pyn_move(server.port, "DEST", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        final, ident = rsps[-1]
        assert final.Status == 0xB000
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 3)
        failed = ident.FailedSOPInstanceUIDList
        assert set([failed] if isinstance(failed, str) else failed) == {payload, header, under}
        assert set(dest.received()) == intact  # the record whose CRC holds was not sent either

        # C-GET: DCMTK getscu gets the intact ones; pynetdicom sees the failed counts
        out = tmp_path / "got"
        g = getscu(server.port, "S", out, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        assert g.returncode == 0, g.stderr
        assert set(received(out)) == intact
        rsps, got = _pyn_get(server.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                             classes=[CTImageStorage, MRImageStorage])
        final, ident = rsps[-1]
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 3)
        assert set(got) == intact

        # storage commitment: 0x0110 for the marked ones, committed for the others
        refs = [(CTImageStorage, uid_of(p)) for p in ct] + [(MRImageStorage, under)]
        status, _assoc = modality.request(server.port, refs, release=False)
        assert status.Status == 0
        rep = modality.report(60)
        assert rep.committed() == intact
        assert rep.failed() == {payload: 0x0110, header: 0x0110, under: 0x0110}

        # export and send skip them with a clear line
        e = export_all(data, tmp_path / "exported")
        assert e.returncode != 0
        assert {p.stem for p in (tmp_path / "exported").glob("*.dcm")} == intact
        assert f"{under}: stored record marked corrupt by verify" in e.stderr, e.stderr
        s = stowage("send", "--config", str(cfg), "--data-dir", str(data), "--to", "DEST", "-q",
                    "--instance", under)
        assert s.returncode != 0
        assert "marked corrupt by verify" in s.stdout + s.stderr, s.stdout + s.stderr
    finally:
        modality.stop()


def test_scrub_finds_flipped_bytes_by_itself_and_counts_them(make_server, tmp_path):
    mport = free_port()
    cfg = tmp_path / "stowage.toml"
    cfg.write_text('scrub_rate = "500"   # MB/s: a pass in well under a second here\n')
    server = make_server("--workers", "2", "--config", str(cfg), "--metrics-port", str(mport))
    ct = copies(CT, tmp_path / "ct", 4, "ct")
    storescu(server.port, ct)
    victim = uid_of(ct[2])
    flip_payload(server.data_dir, victim)  # while it runs, after its first pass may have begun
    deadline = time.monotonic() + 90
    while not audit(server.data_dir, "corrupt") and time.monotonic() < deadline:
        time.sleep(0.5)
    found = audit(server.data_dir, "corrupt")
    assert [d["sop_instance_uid"] for d in found] == [victim], server.log()
    assert found[0]["by"] == "scrub"
    assert (found[0]["segment"], found[0]["offset"]) == location(server.data_dir, victim)
    got = scrape(mport)
    assert got["stowage_corrupt_records_found_total"] == 1, got
    assert got["stowage_corrupt_records"] == 1
    assert got["stowage_scrub_passes_total"] >= 1
    state = json.loads((server.data_dir / "corrupt" / "scrub.json").read_text())
    assert state["passes"] >= 1
    # the next passes find it again without marking or auditing it twice
    passes = state["passes"]
    deadline = time.monotonic() + 60
    while json.loads((server.data_dir / "corrupt" / "scrub.json").read_text())["passes"] < passes + 1:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.5)
    assert len(audit(server.data_dir, "corrupt")) == 1
    assert scrape(mport)["stowage_corrupt_records_found_total"] == 1
    assert server.stop() == 0  # the scrub stops with the drain


def test_scrub_resumes_where_it_stopped(make_server, tmp_path):
    """A slow scrub stopped mid-pass saves its position, and goes on from it after a restart.
    Meanwhile it keeps out of the page cache: what it read is dropped within a second or so,
    not at the segment's end (with the writes not cached, the segment's pages behind it are
    gone from the cache)."""
    cfg = tmp_path / "stowage.toml"
    cfg.write_text("scrub_rate = 0.02   # MB/s: 20 KB/s, a pass of about ten seconds\n")
    server = make_server("--workers", "1", "--config", str(cfg), STOWAGE_CACHE_WRITES="false")
    storescu(server.port, copies(CT, tmp_path / "ct", 12, "ct"))
    state_file = server.data_dir / "corrupt" / "scrub.json"
    deadline = time.monotonic() + 60
    while not (state_file.exists() and json.loads(state_file.read_text())["offset"] > 100_000
               and json.loads(state_file.read_text())["segment"]):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    at = json.loads(state_file.read_text())
    if file_system(server.data_dir) not in ("tmpfs", "ramfs"):  # there the cache is the storage
        behind = at["offset"] - 40_000  # at least a record (~30 KB here, 1.5 s at 20 KB/s) behind
        cached, pages = resident_pages(server.data_dir / "segments" / at["segment"], behind)
        assert cached <= 1, f"{cached} of the {pages} pages the scrub read more than a record ago still cached"
    assert server.stop() == 0
    stopped = json.loads(state_file.read_text())
    assert stopped["segment"] and stopped["offset"] > 0, stopped  # mid-pass
    server.start()
    deadline = time.monotonic() + 60
    while "scrub running" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert f"from {stopped['segment']} @ {stopped['offset']}" in server.log(), server.log()


def test_verify_reports_a_cut_segment_and_an_unindexed_record(make_server, tmp_path):
    """Catalog ↔ segment cross-check, with the archive stopped: a catalog row whose record
    was cut off, and a sealed record the catalog lacks."""
    server = make_server("--workers", "1", STOWAGE_SCRUB_RATE="0")
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    storescu(server.port, ct)
    assert server.stop() == 0
    data = server.data_dir
    last = uid_of(ct[2])
    segment, offset = location(data, last)
    # a record the catalog lacks: the first record appended again, the watermark past it
    from stowage.catalog import manifest
    path = data / "segments" / segment
    first = _record_at(path, location(data, uid_of(ct[0]))[1])
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(first)
    with manifest.update(data / "catalog") as m:
        m.watermarks[segment] = size + len(first)
    r = verify(data, "--report", str(tmp_path / "r.csv"))
    assert r.returncode == 1, r.stdout + r.stderr
    rows = report_rows(tmp_path / "r.csv")
    assert [(row["segment"], int(row["offset"])) for row in rows] == [(segment, size)], rows
    assert "not in the catalog" in rows[0]["problem"]
    assert "0 corrupt record(s)" in r.stdout and "1 catalog problem(s)" in r.stdout
    # a catalog row whose record is cut off
    with open(path, "r+b") as f:
        f.truncate(offset + 100)
    r = verify(data, "--report", str(tmp_path / "r2.csv"))
    assert r.returncode == 1
    rows = {row["sop_instance_uid"]: row for row in report_rows(tmp_path / "r2.csv")}
    assert last in rows and int(rows[last]["offset"]) == offset, rows


def _record_at(path: Path, offset: int) -> bytes:
    from stowage.engine.store.segment import open_record
    with open(path, "rb") as f:
        rec, _stored = open_record(f, offset)
        f.seek(offset)
        return f.read(rec.length)


def test_a_restored_record_has_its_mark_lifted(make_server, tmp_path):
    server = make_server("--workers", "1", STOWAGE_SCRUB_RATE="0")
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    storescu(server.port, ct)
    data, victim = server.data_dir, uid_of(ct[1])
    flip_payload(data, victim)
    assert verify(data).returncode == 1
    assert export_all(data, tmp_path / "out1").returncode != 0
    flip_payload(data, victim)  # the same bytes flipped back: as a restore from a backup would
    r = verify(data)
    assert r.returncode == 0 and "(1 corrupt mark(s) lifted)" in r.stdout, r.stdout + r.stderr
    assert [d["sop_instance_uid"] for d in audit(data, "corrupt-cleared")] == [victim]
    e = export_all(data, tmp_path / "out2")
    assert e.returncode == 0, e.stderr
    assert victim in {p.stem for p in (tmp_path / "out2").glob("*.dcm")}


def test_marks_survive_a_torn_line(tmp_path):
    """A mark cut short by a crash marks nothing, and never swallows the next one."""
    from stowage.engine.store.integrity import CorruptMarks
    marks = CorruptMarks(tmp_path)
    assert marks.mark("000-00000001.seg", 100, "1.2.3", "checksum mismatch", "verify")
    with open(marks.path, "ab") as f:
        f.write(b'{"segment": "000-00000001.seg", "offset": 9')  # torn
    other = CorruptMarks(tmp_path)  # another process
    assert other.get("000-00000001.seg", 100).problem == "checksum mismatch"
    assert marks.mark("000-00000001.seg", 200, "1.2.4", "dataset CRC-32 differs", "scrub")
    assert not marks.mark("000-00000001.seg", 200, "1.2.4", "dataset CRC-32 differs", "scrub")
    assert other.get("000-00000001.seg", 200).by == "scrub"
    assert other.get("000-00000001.seg", 9) is None
    assert other.counts() == (2, 2)
    assert marks.clear("000-00000001.seg", 100, "verify")
    assert other.get("000-00000001.seg", 100) is None and other.counts() == (1, 2)


def test_streamed_and_in_memory_checks_agree(tmp_path):
    """Records over IN_MEMORY are checked as a stream of chunks, smaller ones whole: both
    give the same dataset checksum, and both report a flipped byte as a checksum failure."""
    import zstandard
    from stowage.engine.store.integrity import read_back, record_dataset
    from stowage.engine.store.segment import FLAG_SHUFFLE, FLAG_ZSTD, CorruptRecord, crc32, encode_record, open_record, shuffle
    group = b"\x02\x00\x10\x00UI\x06\x001.2.3\x00"
    meta = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(group)) + group
    dataset = bytes(range(256)) * 3000 + b"tail"
    header = {"sop_instance_uid": "1.2.3", "dataset_crc32": crc32(dataset), "dataset_length": len(dataset)}
    payload = zstandard.ZstdCompressor(level=1).compress(shuffle(meta + dataset))
    path = tmp_path / "000-00000001.seg"
    path.write_bytes(encode_record(header, payload, FLAG_ZSTD | FLAG_SHUFFLE))
    with open(path, "rb") as f:
        assert read_back(*open_record(f, 0)) == (crc32(dataset), len(dataset))
        rec, stored = open_record(f, 0)
        assert record_dataset(path, rec, stored) == (crc32(dataset), len(dataset))
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    with open(path, "rb") as f:
        with pytest.raises(CorruptRecord, match="checksum mismatch"):
            read_back(*open_record(f, 0))
        rec, stored = open_record(f, 0)
        with pytest.raises(CorruptRecord, match="checksum mismatch"):
            record_dataset(path, rec, stored)


def test_a_record_of_another_instance_is_refused_not_served(tmp_path, scps):
    """A catalog row that leads to another instance's record (here a segment file put back
    from another archive under the same name, as an administrator restoring a backup to the
    wrong place would) is refused with the reason, never handed out under the row's UID:
    export streams the record, send reads it into memory."""
    archives = {}
    for name in ("a", "b"):
        src = copies(CT, tmp_path / f"in-{name}", 1, name)
        r = cli("import", "--data-dir", str(tmp_path / name), "-q", str(src[0].parent))
        assert r.returncode == 0, r.stderr
        archives[name] = uid_of(src[0])
    segment, offset = location(tmp_path / "a", archives["a"])
    assert location(tmp_path / "b", archives["b"]) == (segment, offset)  # the same name, the same place
    shutil.copyfile(tmp_path / "b" / "segments" / segment, tmp_path / "a" / "segments" / segment)

    e = export_all(tmp_path / "a", tmp_path / "out")
    assert e.returncode != 0
    assert f"holds another instance than {archives['a']}" in e.stdout + e.stderr, e.stdout + e.stderr
    assert not list((tmp_path / "out").rglob("*.dcm"))

    dest = scps(tmp_path / "rx", aet="DEST")
    s = stowage("send", "--data-dir", str(tmp_path / "a"), "--to", f"{HOST}:{dest.port}", "--aec", "DEST", "-q",
                "--instance", archives["a"])
    assert s.returncode != 0
    assert f"holds another instance than {archives['a']}" in s.stdout + s.stderr, s.stdout + s.stderr
    assert dest.received() == {}
