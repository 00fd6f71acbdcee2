"""Resource limits that a data set or a stored record runs into (issue #25), each checked as
a user would see it:

- a Deflated data set that inflates to a gigabyte before its catalog attributes is refused
  over a real C-STORE with Cannot Understand and an Error Comment naming
  max_inflated_bytes, the worker's peak memory barely moves, the refusal is counted, and
  the archive goes on serving another peer; one whose gigabyte is Pixel Data is read
  without inflating it; `stowage import` refuses the same bomb in one report line;
  conversion on the way out never inflates past the limit;
- 3,000 nested sequences are refused (max_nesting_depth) by every reader, never with a
  RecursionError, and an import of them beside a good CT stores the CT;
- a C-FIND wildcard like `*a*a*a*a*a*a*a*ab` on an attribute matched in Python answers at
  once, with the same matches as before (a pytest timeout bounds it; nothing is timed);
- a segment record whose zstd frame header declares a terabyte is reported corrupt by
  `stowage verify` running under an address-space limit, and by the segment reader without
  allocating what the frame claims;
- a UID ending in a newline is not a valid UID: an import of it is refused.

Every crafted input is built here. Nothing asserts elapsed time."""
from __future__ import annotations

import csv
import functools
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
import zstandard
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, generate_uid)
from pynetdicom import AE, _config

from conftest import CT, HOST, copies, free_port
from test_metrics import wait_for
from stowage.catalog import attributes, matching
from stowage.catalog.attributes import UnreadableDataset
from stowage.engine.importer.part10 import check_whole
from stowage.engine.store import segment
from stowage.engine.store.archive import valid_uid
from stowage.protocol.status import CANNOT_UNDERSTAND, SUCCESS

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection: parsed whole, for rejection notes
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
VERIFICATION = "1.2.840.10008.1.1"
MiB = 1 << 20
LIMIT = 256 * MiB  # max_inflated_bytes's default
INFLATED_PAST = f"Deflated data set inflates past max_inflated_bytes ({LIMIT})"
NESTED_PAST = "sequences nested deeper than max_nesting_depth (64)"
_BLOCK = 16 * MiB


# --- crafted inputs -----------------------------------------------------------------------


def new_uid() -> str:
    return generate_uid(prefix=None)  # 2.25.<UUID>: room for suffixes within 64 characters


@functools.cache
def _zero_block() -> bytes:
    """Raw deflate of 16 MiB of zeros ending in a full flush: byte-aligned and referring to
    nothing before it, so copies of it (16 KB each) chain into one valid stream."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(bytes(_BLOCK)) + z.flush(zlib.Z_FULL_FLUSH)


def deflated(*parts: bytes | int) -> bytes:
    """A raw deflate stream (PS3.5 A.5) of `parts` in order: bytes as they are, an int n
    as n × 16 MiB of zero bytes (a bomb: a gigabyte costs a megabyte)."""
    out = []
    for part in parts:
        if isinstance(part, int):
            out.append(_zero_block() * part)
        else:
            z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            out.append(z.compress(part) + z.flush(zlib.Z_FULL_FLUSH))
    out.append(zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS).flush())  # the final block
    return b"".join(out)


def encode(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, ds)
    return fp.getvalue()


def identity(uid: str, sop_class: str = CT_STORAGE, **extra: str) -> Dataset:
    """The attributes a store needs, Modality the last of group 0008."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, uid, "CT" if sop_class == CT_STORAGE else "KO"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def patient(uid: str) -> Dataset:
    ds = Dataset()
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "LIMITS", uid + ".1", uid + ".2"
    return ds


def bomb(uid: str, blocks: int, in_pixel_data: bool = False, sop_class: str = CT_STORAGE) -> bytes:
    """A Deflated data set holding `blocks` × 16 MiB of zeros in one OB element: a private
    one between the SOP UIDs and the patient's attributes, or at the end, after the header
    (Pixel Data; Data Set Trailing Padding in a Key Object Selection document)."""
    front, back = encode(identity(uid, sop_class)), encode(patient(uid))
    if in_pixel_data:
        tag = (0x7FE0, 0x0010) if sop_class == CT_STORAGE else (0xFFFC, 0xFFFC)
        return deflated(front + back + struct.pack("<HH2sHL", *tag, b"OB", 0, blocks * _BLOCK), blocks)
    private = encode(Dataset()) + struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"BOMB" \
        + struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, blocks * _BLOCK)
    return deflated(front + private, blocks, back)


def nested(depth: int, endian: str = "<", implicit: bool = False) -> bytes:
    """(0040,A730) Content Sequence whose item holds the next one, `depth` sequences deep,
    all of undefined length (36 bytes a level in explicit VR: 3,000 levels are 108 KB)."""
    if implicit:
        seq = struct.pack(endian + "HHL", 0x0040, 0xA730, 0xFFFFFFFF)
    else:
        seq = struct.pack(endian + "HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack(endian + "HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack(endian + "HHL", 0xFFFE, 0xE00D, 0) + struct.pack(endian + "HHL", 0xFFFE, 0xE0DD, 0)
    return (seq + item) * depth + end * depth


def nested_dataset(uid: str, depth: int, syntax: str) -> bytes:
    """A data set of `syntax` (deflated too) with `depth` nested sequences after its UIDs."""
    implicit, big = syntax == ImplicitVRLittleEndian, syntax == ExplicitVRBigEndian
    ds = identity(uid)
    ds.update(patient(uid))
    plain = encode(ds, implicit, not big) + nested(depth, ">" if big else "<", implicit)
    return deflated(plain) if syntax == DeflatedExplicitVRLittleEndian else plain


def write_part10(path: Path, syntax: str, uid: str, dataset: bytes, sop_class: str = CT_STORAGE) -> Path:
    """A Part-10 file: preamble, file meta (explicit VR little endian), `dataset` as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_file_meta_info(fp, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + dataset)
    return path


def peak_python_bytes(call) -> tuple[object, int]:
    """(what `call()` returned or raised, the most memory Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        try:
            result: object = call()
        except Exception as e:  # handed back to be asserted on
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- Deflated: max_inflated_bytes ---------------------------------------------------------


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process has ever had, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.timeout(240)
def test_a_deflate_bomb_is_refused_without_memory_and_the_archive_serves_on(make_server, tmp_path, monkeypatch):
    """1 MB on the wire that inflates to 1 GiB before the patient's attributes: Cannot
    Understand with an Error Comment a person can act on, counted once; the worker's peak
    resident memory grows by less than 64 MiB (what it may hold: the 1 MB data set, zlib's
    256 KiB steps, the header; the old code held the whole gigabyte, and any bounded copy of
    the inflated bytes would be at least max_inflated_bytes, 256 MiB). Then another peer
    echoes and stores, and 3,000 nested sequences are refused the same way."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes, as they are
    metrics = free_port()
    server = make_server("--workers", "1", "--metrics-port", str(metrics))
    uid = new_uid()
    f = write_part10(tmp_path / "bomb.dcm", DeflatedExplicitVRLittleEndian, uid, bomb(uid, 64))
    assert f.stat().st_size < 2 * MiB
    (worker,) = server.workers()
    before = peak_rss(worker.pid)

    ae = AE("BOMBER")
    ae.add_requested_context(CT_STORAGE, [DeflatedExplicitVRLittleEndian])
    ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(f)
    finally:
        assoc.release()
    assert status.Status == CANNOT_UNDERSTAND, status
    assert status.ErrorComment == INFLATED_PAST
    growth = peak_rss(worker.pid) - before
    assert growth < 64 * MiB, f"the worker's peak RSS grew by {growth / MiB:.0f} MiB"

    other = AE("OTHERPEER")
    other.add_requested_context(VERIFICATION)
    other.add_requested_context(CT_STORAGE, [ExplicitVRLittleEndian])
    assoc = other.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == SUCCESS
        (good,) = copies(CT, tmp_path / "good", 1, "ct")
        assert assoc.send_c_store(good).Status == SUCCESS
        deep_uid = new_uid()
        deep = write_part10(tmp_path / "deep.dcm", ExplicitVRLittleEndian, deep_uid,
                      nested_dataset(deep_uid, 3000, ExplicitVRLittleEndian))
        status = assoc.send_c_store(deep)
    finally:
        assoc.release()
    assert status.Status == CANNOT_UNDERSTAND and status.ErrorComment == NESTED_PAST, status
    got = wait_for(metrics, 'stowage_limit_refusals_total{limit="nesting_depth"}', 1, timeout=20.0)
    assert got['stowage_limit_refusals_total{limit="inflated_bytes"}'] == 1, got
    assert got['stowage_limit_refusals_total{limit="nesting_depth"}'] == 1, got


def test_extract_refuses_a_bomb_before_the_catalog_attributes_and_holds_no_more_than_a_step():
    uid = new_uid()
    data = bomb(uid, 64)
    refused, peak = peak_python_bytes(lambda: attributes.extract(data, DeflatedExplicitVRLittleEndian))
    assert isinstance(refused, UnreadableDataset) and str(refused) == INFLATED_PAST
    assert getattr(refused, "limit", None) == "inflated_bytes"
    assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB held while inflating"


def test_a_deflated_header_is_read_without_inflating_its_pixel_data():
    """A gigabyte of Deflated Pixel Data is not the catalog's business: the attributes and
    the header come from the bytes before it, as from the same data set uncompressed."""
    uid = new_uid()
    got, peak = peak_python_bytes(lambda: attributes.extract(bomb(uid, 64, in_pixel_data=True),
                                                             DeflatedExplicitVRLittleEndian))
    assert isinstance(got, dict), got
    assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB held while reading the header"
    plain = attributes.extract(encode(identity(uid)) + encode(patient(uid)), ExplicitVRLittleEndian)
    assert got == plain and got["patient_id"] == "LIMITS" and got["sop_instance_uid"] == uid


def test_conversion_on_the_way_out_never_inflates_past_the_limit(tmp_path):
    from stowage.engine.transfer.convert import ConversionError, convert_file
    uid = new_uid()
    src = write_part10(tmp_path / "bomb.dcm", DeflatedExplicitVRLittleEndian, uid, bomb(uid, 4, in_pixel_data=True))
    with pytest.raises(ConversionError, match=re.escape(f"max_inflated_bytes ({16 * MiB})")):
        convert_file(src, tmp_path / "out.dcm", ExplicitVRLittleEndian, max_inflated_bytes=16 * MiB)
    small = tmp_path / "small.dcm"
    convert_file(Path(pydicom.data.get_testdata_file("image_dfl.dcm")), small, ExplicitVRLittleEndian)
    assert pydicom.dcmread(small).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_the_catalog_defaults_are_the_configuration_defaults():
    from stowage.catalog import limits
    from stowage.engine.runtime.config import Config
    assert (limits.MAX_INFLATED_BYTES, limits.MAX_NESTING_DEPTH) == (Config.max_inflated_bytes,
                                                                     Config.max_nesting_depth)


# --- nesting: max_nesting_depth -----------------------------------------------------------

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_3000_nested_sequences_are_refused_by_the_catalog_reader(syntax):
    data = nested_dataset(new_uid(), 3000, syntax)
    with pytest.raises(UnreadableDataset) as refused:
        attributes.extract(data, syntax)
    assert str(refused.value) == NESTED_PAST and getattr(refused.value, "limit", None) == "nesting_depth"


@pytest.mark.parametrize("syntax", SYNTAXES[:3])
def test_nesting_up_to_the_limit_is_read_one_more_is_refused(syntax):
    """The scanner, the deflated reader and the import's check agree where the limit is."""
    uid = new_uid()
    assert attributes.extract(nested_dataset(uid, 64, syntax), syntax)["sop_instance_uid"] == uid
    with pytest.raises(UnreadableDataset, match=re.escape(NESTED_PAST)):
        attributes.extract(nested_dataset(uid, 65, syntax), syntax)
    assert attributes.extract(nested_dataset(uid, 9, syntax), syntax, max_nesting_depth=9)
    with pytest.raises(UnreadableDataset, match=re.escape("max_nesting_depth (8)")):
        attributes.extract(nested_dataset(uid, 9, syntax), syntax, max_nesting_depth=8)
    if syntax != DeflatedExplicitVRLittleEndian:
        check_whole(nested_dataset(uid, 64, syntax), syntax)
        for depth in (65, 3000):
            with pytest.raises(UnreadableDataset, match=re.escape(NESTED_PAST)):
                check_whole(nested_dataset(uid, depth, syntax), syntax)


def run_import(data_dir: Path, folder: Path, report: Path) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "import", str(folder), "--data-dir", str(data_dir),
                        "-q", "--report", str(report)], capture_output=True, text=True, timeout=300)
    with open(report, newline="") as f:
        rows = {Path(row["path"]).name: (row["outcome"], row["reason"]) for row in csv.DictReader(f)}
    return r, rows


@pytest.mark.timeout(300)
def test_import_refuses_nesting_and_bombs_and_stores_the_ct_beside_them(tmp_path):
    """Before, the RecursionError took the import thread's whole chunk with it: the CT
    beside the file was left "not attempted". Now each bad file gets its one-line reason.
    A Key Object Selection document is parsed whole (a rejection note?): its gigabyte of
    trailing padding is refused too, where any other instance's would not be read."""
    folder = tmp_path / "in"
    copies(CT, folder, 1, "ct")
    deep_uid, bomb_uid, kos_uid = new_uid(), new_uid(), new_uid()
    write_part10(folder / "deep.dcm", ExplicitVRLittleEndian, deep_uid,
                 nested_dataset(deep_uid, 3000, ExplicitVRLittleEndian))
    write_part10(folder / "bomb.dcm", DeflatedExplicitVRLittleEndian, bomb_uid, bomb(bomb_uid, 64))
    write_part10(folder / "kos.dcm", DeflatedExplicitVRLittleEndian, kos_uid,
                 bomb(kos_uid, 64, in_pixel_data=True, sop_class=KOS), sop_class=KOS)
    r, rows = run_import(tmp_path / "data", folder, tmp_path / "refused.csv")
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"1 stored, .*3 refused", r.stdout) and "not attempted" not in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert rows["deep.dcm"] == ("refused", NESTED_PAST)
    for name in ("bomb.dcm", "kos.dcm"):
        assert rows[name][0] == "refused" and rows[name][1].startswith(INFLATED_PAST), rows
    assert set(rows) == {"deep.dcm", "bomb.dcm", "kos.dcm"}


# --- wildcards matched in Python ----------------------------------------------------------


def reference(pattern: str, value: str) -> bool:
    """PS3.4 C.2.2.2.4 by dynamic programming: `*` any run of characters, `?` any one."""
    row = [True] + [False] * len(value)  # matches of the empty pattern prefix
    for p in pattern:
        nxt = [row[0] and p == "*"] + [False] * len(value)
        for j, c in enumerate(value, 1):
            nxt[j] = (row[j] or nxt[j - 1]) if p == "*" else row[j - 1] and (p == "?" or p == c)
        row = nxt
    return row[-1]


def key(keyword: str, value: str) -> matching.Match:
    ds = Dataset()
    setattr(ds, keyword, value)
    return matching.parse(ds[keyword])


@pytest.mark.timeout(10)
def test_pathological_wildcards_match_at_once():
    """`*a*a*a*a*a*a*a*ab` against sixty a's took 22 s, and twice as long per character
    more; a regex of `.*` backtracks, a wildcard matcher need not."""
    m = key("Manufacturer", "*a*a*a*a*a*a*a*ab")
    assert not matching.matches(m, "a" * 60)
    assert matching.matches(m, "a" * 59 + "b")
    assert not matching.matches(key("Manufacturer", "*a*a*a*a*a*a*a*a*a*a*a*ab"), "a" * 64)
    assert matching.matches(key("ImageComments", "*a?a*b*?c"), "xa" * 4000 + "yaab" + "c" * 4000)
    assert not matching.matches(key("ImageComments", "*a?a*b*?c"), "xa" * 4000 + "yaab" + "c" * 4000 + "d")
    names = key("PerformingPhysicianName", "*a*a*a*a*a*a*a*ab")
    assert not matching.matches(names, "a" * 60) and not matching.matches(names, "a" * 60, pn_insensitive=True)


def test_wildcards_mean_what_they_meant():
    """`*` and `?` on random patterns and values agree with a plain reference; person names
    still fold case and accents only when pn_case_insensitive asks."""
    import random
    rng = random.Random(25)
    for _ in range(3000):
        pattern = "".join(rng.choice("ab*?") for _ in range(rng.randint(1, 7)))
        if pattern.strip("*") == "":
            continue
        value = "".join(rng.choice(["a", "b", "\n"]) for _ in range(rng.randint(1, 9)))
        assert matching.matches(key("Manufacturer", pattern), value) == reference(pattern, value), (pattern, value)
    name = key("PerformingPhysicianName", "dur?n^*")
    assert not matching.matches(name, "DURÁN^José") and matching.matches(name, "DURÁN^José", pn_insensitive=True)
    assert matching.matches(name, "durán^josé") and not matching.matches(name, "duran")
    assert matching.matches(key("PerformingPhysicianName", "*^jos?"), "Durán^José=デュラン^ホセ", pn_insensitive=True)


@pytest.mark.timeout(120)
def test_a_pathological_c_find_wildcard_on_a_header_attribute_answers(server, tmp_path):
    """Manufacturer is matched in Python on the stored header: the query that would have
    kept a worker busy for hours answers at once, with the right matches."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    ds.Manufacturer = "a" * 64
    ae = AE("FINDER")
    ae.add_requested_context(CT_STORAGE, [ExplicitVRLittleEndian])
    ae.add_requested_context(STUDY_ROOT_FIND)
    ae.dimse_timeout = ae.network_timeout = 60  # a bound on the wait, not on speed
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == SUCCESS

        def find(pattern: str) -> list[str]:
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID, q.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
            q.SOPInstanceUID, q.Manufacturer = "", pattern
            found, last = [], None
            for status, identifier in assoc.send_c_find(q, STUDY_ROOT_FIND):
                last = status.Status if status else None
                if identifier is not None and status.Status in (0xFF00, 0xFF01):
                    found.append(identifier.SOPInstanceUID)
            assert last == SUCCESS, f"{pattern}: the C-FIND ended with {last}"
            return found
        assert find("*a*a*a*a*a*a*a*a*a*a*a*ab") == []
        assert find("*a*a*a*a*a*a*a*a*a*a*a*a") == [ds.SOPInstanceUID]
    finally:
        assoc.release()


# --- zstd frames: bounded by the record ----------------------------------------------------


def forged_frame(payload: bytes, claimed: int) -> bytes:
    """A zstd frame of `payload` whose header declares `claimed` bytes of content."""
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(payload)
    descriptor = frame[4]
    assert descriptor & 0xE0 == 0  # no content size, not single-segment: a window byte follows
    return frame[:4] + bytes([descriptor | 0xC0]) + frame[5:6] + struct.pack("<Q", claimed) + frame[6:]


def forge_first_record(seg: Path, claimed: int) -> dict:
    """Rewrite the segment's first record: its own header, its payload in a frame that
    claims `claimed` bytes (checksummed as the writer would); returns the header."""
    with open(seg, "rb") as f:
        rec, _stored = segment.open_record(f, 0)
    payload = bytes(segment.read_payload(seg, 0))
    frame = forged_frame(bytes(segment.shuffle(payload)), claimed)
    seg.write_bytes(segment.encode_record(rec.header, frame, segment.FLAG_ZSTD | segment.FLAG_SHUFFLE))
    return rec.header


RUN_LIMITED = """import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
sys.argv = ["stowage", *sys.argv[1:]]
runpy.run_module("stowage.cli", run_name="__main__")
"""


@pytest.mark.timeout(300)
def test_verify_reports_a_frame_claiming_a_terabyte_as_corrupt(tmp_path):
    """`stowage verify`, its address space capped at 16 GiB: the record whose frame claims
    1 TiB is reported corrupt, marked, and nothing tries to allocate the terabyte."""
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "import", str(CT), "--data-dir", str(data), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (seg,) = (data / "segments").glob("*.seg")
    header = forge_first_record(seg, 1 << 40)
    report = tmp_path / "verify.csv"
    r = subprocess.run([sys.executable, "-c", RUN_LIMITED, "verify", "--data-dir", str(data), "--report", str(report)],
                       capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 1, r.stdout + r.stderr
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["sop_instance_uid"] for row in rows] == [header["sop_instance_uid"]], rows
    assert f"declares {1 << 40} bytes" in rows[0]["problem"], rows


@pytest.mark.parametrize("claimed", [4 << 30, 1 << 40])
def test_the_segment_reader_never_allocates_what_a_frame_claims(tmp_path, claimed):
    payload = b"\x02\x00\x00\x00UL\x04\x00" + bytes(4) + b"data set" * 1000
    header = {"sop_instance_uid": "1.2.3", "meta_length": 12, "dataset_length": len(payload) - 12}
    seg = tmp_path / "000-00000001.seg"
    seg.write_bytes(segment.encode_record(header, forged_frame(payload, claimed), segment.FLAG_ZSTD))
    for read in (lambda: segment.read_payload(seg, 0), lambda: b"".join(segment.stream_payload(seg, 0))):
        refused, peak = peak_python_bytes(read)
        assert peak < 64 * MiB, f"{peak / MiB:.0f} MiB allocated for a {len(payload)}-byte payload"
        assert isinstance(refused, segment.CorruptRecord), refused
        assert f"declares {claimed} bytes" in str(refused)


def test_a_frame_that_yields_more_than_its_record_holds_is_corrupt(tmp_path):
    """No content size in the frame, 256 MiB of zeros in it, a header saying 8 KB: the
    stream stops a chunk past what the header says."""
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(256 * MiB))
    seg = tmp_path / "000-00000001.seg"
    seg.write_bytes(segment.encode_record({"meta_length": 0, "dataset_length": 8192}, frame, segment.FLAG_ZSTD))
    for read in (lambda: segment.read_payload(seg, 0), lambda: b"".join(segment.stream_payload(seg, 0))):
        refused, peak = peak_python_bytes(read)
        assert isinstance(refused, segment.CorruptRecord), refused
        assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB decompressed for an 8 KB record"


# --- UIDs ---------------------------------------------------------------------------------


def test_a_uid_ending_in_a_newline_is_not_valid():
    assert valid_uid("1.2.840.10008.5.1.4.1.1.2") and valid_uid("0") and valid_uid("2.25.0")
    for bad in ("1.2.3\n", "1.2.3\n\n", "\n1.2.3", "1.2.3\r\n", "1.02.3", "1.2.", "", "1" * 65):
        assert not valid_uid(bad), repr(bad)


@pytest.mark.timeout(300)
def test_import_refuses_a_sop_instance_uid_ending_in_a_newline(tmp_path):
    folder = tmp_path / "in"
    copies(CT, folder, 1, "ct")
    uid = new_uid()
    ds = identity(uid + "9")  # pydicom strips whitespace from a UID: the 9 becomes the newline below
    ds.update(patient(uid))
    f = write_part10(folder / "newline.dcm", ExplicitVRLittleEndian, uid + "9", encode(ds))
    raw = f.read_bytes()
    f.write_bytes(raw.replace((uid + "9").encode(), (uid + "\n").encode()))
    assert raw.count((uid + "9").encode()) == 2  # the file meta's and the data set's
    r, rows = run_import(tmp_path / "data", folder, tmp_path / "refused.csv")
    assert r.returncode == 1 and re.search(r"1 stored, .*1 refused", r.stdout), r.stdout + r.stderr
    assert rows["newline.dcm"][0] == "refused", rows
    assert rows["newline.dcm"][1].startswith("SOP Instance UID (0008,0018) is not a valid UID"), rows
