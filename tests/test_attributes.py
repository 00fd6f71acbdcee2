"""catalog.attributes against pydicom: the scanner must read what pydicom reads."""
from __future__ import annotations

import random
import struct
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from stowage.catalog import attributes
from stowage.catalog.attributes import HEADER, UnreadableDataset, encode_dataset, header_is_implicit
from stowage.catalog.schema import DICOM_COLUMNS

COLUMNS = [col for col, _ in DICOM_COLUMNS]


def extract(dataset: bytes | memoryview, syntax: str) -> dict[str, str | None]:
    """The catalog columns of attributes.extract (its header is tested on its own below)."""
    got = attributes.extract(dataset, syntax)
    assert isinstance(got.pop(HEADER), (bytes, type(None)))
    return got


# --- helpers -------------------------------------------------------------------------


def _split_file(path: str) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes exactly as they follow the file meta group)."""
    with open(path, "rb") as f:
        read_preamble(f, True)
        meta = _read_file_meta_info(f)
        return str(meta.TransferSyntaxUID), f.read()


def _tidy(value: str | None) -> str | None:
    """The comparison form: each backslash-separated value stripped of padding."""
    if value is None:
        return None
    return "\\".join(v.strip(" \x00") for v in value.split("\\")) or None


def _pydicom_text(ds: Dataset, keyword: str) -> str | None:
    """pydicom's decoded value of keyword in the catalog's string form."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None:
        return None
    if isinstance(value, (list, MultiValue)):
        return _tidy("\\".join(str(v) for v in value))
    return _tidy(str(value))


def _assert_agrees_with_pydicom(got: dict[str, str | None], ds: Dataset) -> None:
    assert list(got) == COLUMNS
    mismatches = {col: (got[col], _pydicom_text(ds, kw)) for col, kw in DICOM_COLUMNS
                  if _tidy(got[col]) != _pydicom_text(ds, kw)}
    assert not mismatches


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element, by hand."""
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"):
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _undefined_sequence(*items: Dataset, item_undefined: bool = True) -> Sequence:
    for item in items:
        item.is_undefined_length_sequence_item = item_undefined
    return Sequence(list(items))


def _study(**extra: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    ds.StudyDate = "20240102"
    ds.Modality = "OT"
    ds.PatientName = "Right^Name"
    ds.PatientID = "PID-1"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.InstanceNumber = "7"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def _nested_sequences(ds: Dataset) -> None:
    """Add, before PatientName, undefined-length sequences nesting another one,
    whose items hold elements with wanted tags that must not be picked up."""
    inner = Dataset()
    inner.CodeValue = "121311"
    inner.PatientName = "Wrong^Inner"
    middle = Dataset()
    middle.ReferencedSOPInstanceUID = "9.9.9"
    middle.PatientID = "WRONG"
    middle.PurposeOfReferenceCodeSequence = _undefined_sequence(inner)
    middle["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    defined = Dataset()
    defined.ReferencedSOPInstanceUID = "8.8.8"
    ds.ReferencedImageSequence = _undefined_sequence(middle, Dataset())
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.ReferencedStudySequence = Sequence([defined])  # defined lengths alongside


EXPECTED_STUDY = {
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
    "sop_instance_uid": "1.2.3.4.5.6",
    "study_date": "20240102",
    "modality": "OT",
    "patient_name": "Right^Name",
    "patient_id": "PID-1",
    "study_instance_uid": "1.2.3",
    "series_instance_uid": "1.2.3.4",
    "instance_number": "7",
}


def _expect(**overrides: str | None) -> dict[str, str | None]:
    return {**dict.fromkeys(COLUMNS), **EXPECTED_STUDY, **overrides}


@pytest.fixture
def fast_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if extract() falls back to pydicom."""
    def refuse(*args: object) -> None:
        raise AssertionError("fell back to the pydicom slow path")
    monkeypatch.setattr(attributes, "_slow_path", refuse)


@pytest.fixture
def slow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if extract() uses the scanner."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("used the scanner")
    monkeypatch.setattr(attributes, "_scan", refuse)


# --- every pydicom test file ---------------------------------------------------------


def _readable_test_files() -> list[str]:
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in get_testdata_files():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if ds.file_meta.get("TransferSyntaxUID"):
                paths.append(path)
    return paths


TEST_FILES = _readable_test_files()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: Path(p).name)
def test_agrees_with_pydicom_on_test_files(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    syntax, body = _split_file(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    mislabelled = any("VR, but found" in str(w.message) for w in caught)  # pydicom says so
    if attributes._syntax(syntax) != "slow" and not mislabelled:
        monkeypatch.setattr(attributes, "_slow_path", lambda *a: pytest.fail("fell back"))
    _assert_agrees_with_pydicom(extract(body, syntax), ds)


def test_test_files_cover_every_path() -> None:
    syntaxes = {_split_file(p)[0] for p in TEST_FILES}
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50"} <= syntaxes
    assert len(TEST_FILES) > 100


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "image_dfl.dcm",
                                  "ExplVR_BigEnd.dcm", "rtdose_expb.dcm"])
def test_big_endian_and_deflated_take_the_slow_path(name: str, slow_only: None) -> None:
    path = get_testdata_file(name)
    syntax, body = _split_file(path)
    expected = pydicom.dcmread(path, stop_before_pixels=True)
    _assert_agrees_with_pydicom(extract(body, syntax), expected)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "CT_small.dcm",
                                  "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_scan_reads_little_endian_files_without_falling_back(name: str) -> None:
    syntax, body = _split_file(get_testdata_file(name))
    buf = memoryview(body)
    raw = attributes._raw(buf, attributes._scan(buf, implicit=syntax == ImplicitVRLittleEndian))
    vr, sop_instance_uid = raw[0x00080018]
    assert vr == "UI" and sop_instance_uid.rstrip(b"\x00")


# --- sequences -----------------------------------------------------------------------


def test_implicit_vr_skips_nested_undefined_length_sequences(fast_only: None) -> None:
    ds = _study()
    _nested_sequences(ds)
    body = encode_dataset(ds, implicit=True)
    assert body.count(b"\xff\xff\xff\xff") >= 4  # the sequences really are undefined length
    assert extract(body, ImplicitVRLittleEndian) == _expect()


def test_explicit_vr_skips_undefined_length_sequences(fast_only: None) -> None:
    ds = _study()
    _nested_sequences(ds)
    body = encode_dataset(ds)
    assert b"SQ\x00\x00\xff\xff\xff\xff" in body
    assert extract(body, ExplicitVRLittleEndian) == _expect()
    assert extract(body, "1.2.840.10008.1.2.4.201") == _expect()  # HTJ2K: explicit VR LE too


def test_explicit_vr_undefined_length_un_holds_implicit_vr(fast_only: None) -> None:
    """PS3.5 6.2.2: an undefined-length UN is a sequence encoded in implicit VR."""
    before = _explicit(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.7\x00")
    item = struct.pack("<HHL", 0x0010, 0x0010, 6) + b"Wrong "  # implicit VR inside
    un = (struct.pack("<HH2sHL", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF)
          + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
          + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    after = _explicit(0x0010, 0x0010, b"PN", b"Right^Name")
    got = extract(before + un + after, ExplicitVRLittleEndian)
    assert got["patient_name"] == "Right^Name"
    assert got["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.7"


def test_implicit_vr_data_labelled_explicit_is_read_as_pydicom_does() -> None:
    body = encode_dataset(_study(), implicit=True)
    with pytest.warns(UserWarning):
        assert extract(body, ExplicitVRLittleEndian) == _expect()


# --- damaged data --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm"])
def test_truncated_data_set_raises_or_returns_only_whole_values(name: str) -> None:
    """A cut inside a value is unreadable; a cut between elements reads as a shorter data set."""
    syntax, body = _split_file(get_testdata_file(name))
    whole = extract(body, syntax)
    header = read_dataset(BytesIO(body), syntax == ImplicitVRLittleEndian, True,
                          stop_when=lambda tag, vr, length: tag > attributes._MAX_TAG)
    elements = [header.get_item(tag, keep_deferred=True) for tag in header.keys()]
    inside_a_value = {cut for elem in elements
                      for cut in range(elem.value_tell + 1, elem.value_tell + elem.length)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cut in range(max(inside_a_value) + 16):
            try:
                got = extract(body[:cut], syntax)
            except UnreadableDataset as exc:
                assert str(exc)
                continue
            assert cut not in inside_a_value
            assert all(got[c] is None or got[c] == whole[c] for c in COLUMNS), cut


def test_truncated_unwanted_element_is_unreadable() -> None:
    body = (_explicit(0x0008, 0x0016, b"UI", b"1.2.3\x00")
            + struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, 5000) + b"\x00" * 100
            + _explicit(0x0010, 0x0010, b"PN", b"Lost^Name"))
    with pytest.raises(UnreadableDataset, match="truncated"):
        extract(body, ExplicitVRLittleEndian)


def test_length_past_the_end_is_unreadable() -> None:
    body = (_explicit(0x0008, 0x0016, b"UI", b"1.2.3\x00")
            + struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 64) + b"1.2")
    with pytest.raises(UnreadableDataset, match="truncated"):
        extract(body, ExplicitVRLittleEndian)
    implicit = struct.pack("<HHL", 0x0008, 0x0016, 200) + b"1.2.3"
    with pytest.raises(UnreadableDataset):
        extract(implicit, ImplicitVRLittleEndian)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
def test_garbage_raises_only_unreadable_dataset(syntax: str) -> None:
    rng = random.Random(1234)
    _, body = _split_file(get_testdata_file("MR_small.dcm"))
    for _ in range(300):
        data = bytearray(body[:1200])
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        for sample in (bytes(data), rng.randbytes(rng.randint(0, 300))):
            try:
                got = extract(sample, syntax)
            except UnreadableDataset:
                continue
            assert list(got) == COLUMNS


def test_empty_data_set() -> None:
    assert extract(b"", ExplicitVRLittleEndian) == dict.fromkeys(COLUMNS)
    assert extract(b"", ImplicitVRLittleEndian) == dict.fromkeys(COLUMNS)


def test_memoryview_into_a_larger_buffer(fast_only: None) -> None:
    body = encode_dataset(_study())
    buffer = bytearray(b"junk" + body + b"more junk")
    assert extract(memoryview(buffer)[4:4 + len(body)], ExplicitVRLittleEndian) == _expect()


# --- character sets ------------------------------------------------------------------


def test_windows_1252_labelled_latin_1_does_not_crash(fast_only: None) -> None:
    body = (_explicit(0x0008, 0x0005, b"CS", b"ISO_IR 100")
            + _explicit(0x0010, 0x0010, b"PN", b"M\x9fller\x93^Jos\xe9 "))
    got = extract(body, ExplicitVRLittleEndian)
    assert got["patient_name"] == "M\x9fller\x93^José"
    assert got["specific_character_set"] == "ISO_IR 100"


def test_non_ascii_without_charset_does_not_crash(fast_only: None) -> None:
    body = (_explicit(0x0008, 0x0060, b"CS", b"M\xc3")
            + _explicit(0x0010, 0x0010, b"PN", b"M\xc3\xbcller^\xff\xfe")
            + _explicit(0x0010, 0x0020, b"LO", b"\x80\x81"))
    got = extract(body, ExplicitVRLittleEndian)
    assert got["patient_name"] == "MÃ¼ller^ÿþ"  # latin-1, as pydicom
    assert got["patient_id"] == "\x80\x81"
    assert got["modality"] == "MÃ"


def test_invalid_utf8_is_replaced(fast_only: None) -> None:
    body = (_explicit(0x0008, 0x0005, b"CS", b"ISO_IR 192")
            + _explicit(0x0010, 0x0010, b"PN", b"Bad\xff^Byte "))
    assert extract(body, ExplicitVRLittleEndian)["patient_name"] == "Bad\ufffd^Byte"


def test_unknown_charset_and_bad_escape_do_not_crash() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for charset, name in ((b"ISO_IR 999", b"Caf\xe9"),
                              (b"\\ISO 2022 IR 87", b"\x1b$B\xff\xff\x1b(B"),
                              (b"GB18030 ", b"\x81\x30"),
                              (b"\\ISO 2022 IR 87", b"\x1b%Zjunk ")):
            body = (_explicit(0x0008, 0x0005, b"CS", charset)
                    + _explicit(0x0010, 0x0010, b"PN", name))
            assert isinstance(extract(body, ExplicitVRLittleEndian)["patient_name"], str)


@pytest.mark.parametrize("implicit", [False, True])
def test_iso_2022_ir_87_japanese_name(implicit: bool, fast_only: None) -> None:
    ds = _study()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    body = encode_dataset(ds, implicit)
    assert b"\x1b$B" in body  # really encoded with escape sequences
    got = extract(body, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    assert got == _expect(patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
                          specific_character_set="\\ISO 2022 IR 87")


def test_iso_ir_192_utf8_name(fast_only: None) -> None:
    ds = _study(StudyDescription="Ünïcödé ☃ study")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Wang^XiaoDong=王^小东"
    got = extract(encode_dataset(ds), ExplicitVRLittleEndian)
    assert got == _expect(patient_name="Wang^XiaoDong=王^小东",
                          study_description="Ünïcödé ☃ study",
                          specific_character_set="ISO_IR 192")


def test_multi_valued_and_padding(fast_only: None) -> None:
    body = (_explicit(0x0008, 0x0005, b"CS", b"\\ISO 2022 IR 87 ")
            + _explicit(0x0008, 0x0018, b"UI", b"1.2.3\x00")
            + _explicit(0x0008, 0x0060, b"CS", b" MR\\CT ")
            + _explicit(0x0008, 0x1030, b"LO", b"    ")
            + _explicit(0x0020, 0x0013, b"IS", b" 12 "))
    got = extract(body, ExplicitVRLittleEndian)
    assert got["specific_character_set"] == "\\ISO 2022 IR 87"
    assert got["sop_instance_uid"] == "1.2.3"
    assert got["modality"] == "MR\\CT"
    assert got["study_description"] is None
    assert got["instance_number"] == "12"


def test_unknown_transfer_syntax_is_explicit_vr_little_endian(fast_only: None) -> None:
    assert extract(encode_dataset(_study()), "1.2.3.4.5.6.7") == _expect()


# --- the header: top-level non-bulk elements, as encoded -----------------------------


def _header_of(body: bytes, syntax: str) -> Dataset:
    header = attributes.extract(body, syntax)[HEADER]
    assert header is not None
    return read_dataset(BytesIO(header), header_is_implicit(syntax), True)


def _comparable(ds: Dataset) -> dict[int, object]:
    """Top-level values below Pixel Data that are not bulk, by tag."""
    out = {}
    for elem in ds:
        if elem.tag >= 0x7FE00000 or elem.tag in attributes._BULK_TAGS:
            continue
        value = elem.value
        if elem.VR == "SQ":
            value = len(value)
        elif isinstance(value, bytes) and len(value) > attributes._MAX_VALUE:
            continue
        out[int(elem.tag)] = value
    return out


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "CT_small.dcm",
                                  "MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG2000.dcm",
                                  "UN_sequence.dcm", "rtdose_rle.dcm"])
def test_header_holds_every_top_level_non_bulk_element(name: str) -> None:
    path = get_testdata_file(name)
    syntax, body = _split_file(path)
    got = _header_of(body, syntax)
    assert "PixelData" not in got
    assert _comparable(got) == _comparable(pydicom.dcmread(path, stop_before_pixels=True))


def test_header_leaves_out_bulk_values_and_keeps_small_ones(fast_only: None) -> None:
    body = (encode_dataset(_study())
            + _explicit(0x0029, 0x0010, b"LO", b"ACME")
            + _explicit(0x0029, 0x1010, b"OB", b"\x01" * 20000)  # a private blob: bulk
            + _explicit(0x0029, 0x1011, b"OB", b"\x02" * 64)     # small: kept
            + _explicit(0x0042, 0x0011, b"OB", b"%PDF" * 300)   # Encapsulated Document
            + _explicit(0x7FE0, 0x0010, b"OW", b"\x00" * 32))
    got = _header_of(body, ExplicitVRLittleEndian)
    assert 0x00291010 not in got and 0x00420011 not in got and 0x7FE00010 not in got
    assert got[0x00291011].value == b"\x02" * 64 and got.PatientName == "Right^Name"


def test_header_of_a_truncated_head_ends_before_the_cut_element(fast_only: None) -> None:
    """A spooled instance is scanned from its first megabytes: an element past the catalog's
    tags that runs past them ends the header, and the store goes on."""
    body = encode_dataset(_study()) + _explicit(0x0028, 0x0010, b"US", b"\x40\x00")
    cut = body + _explicit(0x0040, 0x0275, b"SQ", b"\xfe\xff\x00\xe0" + b"\x00" * 100)[:30]
    got = attributes.extract(cut, ExplicitVRLittleEndian)
    assert got["patient_name"] == "Right^Name"
    assert read_dataset(BytesIO(got[HEADER]), False, True).Rows == 64


def test_header_keeps_undefined_length_sequences(fast_only: None) -> None:
    ds = _study()
    _nested_sequences(ds)
    ds.ProcedureCodeSequence = _undefined_sequence(Dataset())
    ds.ProcedureCodeSequence[0].CodeValue = "CT123"
    ds["ProcedureCodeSequence"].is_undefined_length = True
    for implicit in (False, True):
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        got = _header_of(encode_dataset(ds, implicit), syntax)
        assert got.ProcedureCodeSequence[0].CodeValue == "CT123"
        assert got.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "9.9.9"
