"""De-identification (issue #22): Table E.1-1 applied attribute by attribute, at every
nesting depth and in the file meta, under the basic profile and each option; keyed,
consistent pseudonyms across processes and projects; dciodvfy finds no new IOD error."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from stowage.engine.deidentify import table
from stowage.engine.deidentify.keys import Keyed
from stowage.engine.deidentify.profile import Profile
from stowage.engine.deidentify.project import ProjectConfig, Project, Quarantined, parse
from stowage.engine.deidentify.pixels import Signature

REPO = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
NAME, PID = "Doe^Jane^Q", "MRN123456"
DATED = {"DA": "20200315", "DT": "20200315101500", "TM": "101500"}


def _value_for(vr: str, tag: int):
    """An identifying-looking value of the right VR for table row `tag`."""
    if vr == "SQ":
        return None
    return {"UI": f"1.2.826.0.1.3680043.2.{tag}.7", "DA": DATED["DA"], "DT": DATED["DT"], "TM": DATED["TM"],
            "PN": NAME, "AS": "045Y", "IS": "7", "DS": "1.5", "US": 7, "SS": 7, "UL": 7, "SL": 7, "FL": 1.5,
            "FD": 1.5, "AE": "CTSCANNER01", "CS": "SECRET", "AT": 0x00100010,
            "OB": b"Jane", "OW": b"Jane", "UN": b"Jane", "UR": "http://hospital.example/jane"}.get(
        vr, f"Jane {PID}")


def _rows() -> list[dict]:
    """Rows of Table E.1-1 pydicom knows a VR for (the 50xx/60xx patterns are tested apart)."""
    out = []
    for row in table.load()["attributes"]:
        if "X" in row["tag"]:
            continue
        try:
            vr = pydicom.datadict.dictionary_VR(int(row["tag"], 16))
        except KeyError:
            continue
        out.append({**row, "int": int(row["tag"], 16), "vr": vr.split(" or ")[0]})
    return out


def _item(depth: int) -> Dataset:
    """A sequence item with identifying values, holding another such item `depth` more times."""
    item = Dataset()
    item.PatientName, item.ReferencedSOPInstanceUID = NAME, "1.2.826.0.1.3680043.2.99.1"
    item.ContentDate, item.StudyDescription, item.StationName = DATED["DA"], f"Jane {PID}", "CTSCANNER01"
    if depth:
        item.ReferencedImageSequence = Sequence([_item(depth - 1)])
        item.add_new(0x00101002, "SQ", Sequence([_item(depth - 1)]))  # Other Patient IDs Sequence
    return item


def _fill(ds: Dataset) -> None:
    """Every listed attribute; every sequence holds items three deep."""
    for row in _rows():
        tag, vr = row["int"], row["vr"]
        if tag >> 16 in (0x0000, 0x0002):  # command set and file meta: not in a stored data set
            continue
        if vr == "SQ":
            ds.add_new(tag, "SQ", Sequence([_item(2)]))
        else:
            ds.add_new(tag, vr, _value_for(vr, tag))


def identified() -> Dataset:
    """An instance with identifying values everywhere the annex lists them: top level,
    sequences three deep, private blocks of three creators (one safe), overlays, curves."""
    ds = Dataset()
    _fill(ds)
    ds.PatientName, ds.PatientID = NAME, PID
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1.1"
    ds.Modality = "CT"
    blk = ds.private_block(0x0009, "ACME SECRET", create=True)
    blk.add_new(0x10, "LO", NAME)
    deep = Dataset()
    deep.private_block(0x0011, "OTHER VENDOR", create=True).add_new(0x01, "SH", PID)
    blk.add_new(0x11, "SQ", Sequence([deep]))
    safe = ds.private_block(0x7053, "Philips PET Private Group", create=True)
    safe.add_new(0x00, "DS", "1.23")   # SUV Factor: Table E.3.10-1
    safe.add_new(0x05, "LO", NAME)     # not in the table
    ds.add_new(0x60003000, "OB", b"\x01" * 8)
    ds.add_new(0x60000010, "US", 2)
    ds.add_new(0x50003000, "OB", b"\x01" * 8)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "CTSCANNER01"
    return ds


def _expected(row: dict, options: frozenset[str]) -> str:
    picked = [row["options"][o] for o in options if o in row["options"]]
    action = min(picked, key=lambda a: {"K": 0, "C": 1}.get(a, 9)) if picked else row["basic"]
    return {"X/Z": "Z", "Z/D": "D", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}.get(action, action)


def _check(before: Dataset, after: Dataset, options: frozenset[str], where: str) -> int:
    """Assert, for every Table E.1-1 attribute present in `before`, that `after` shows its action."""
    checked = 0
    for row in _rows():
        tag = row["int"]
        if tag not in before or tag in (0x00100010, 0x00100020):
            continue
        old, action, vr = before[tag].value, _expected(row, options), row["vr"]
        what = f"{where}{row['name']} {row['tag']} ({action})"
        checked += 1
        if action == "X":
            assert tag not in after, what
            continue
        assert tag in after, what
        new = after[tag].value
        if vr == "SQ":
            if action == "Z":
                assert len(new) == 0, what
            else:
                for a, b in zip(old, new):
                    checked += _check(a, b, options, f"{what} > ")
        elif action == "Z":
            assert new in (None, "", b""), what
        elif action == "K":
            assert new == old, what
        elif action == "U":
            assert str(new).startswith("2.25.") and new != old, what
        elif action == "D":
            assert new not in (None, "") and new != old or vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS"), what
        elif action == "C":
            if vr in ("DA", "DT") and "retain_longitudinal_modified_dates" in options:
                assert new != old and len(str(new)) == len(str(old)), what
            elif vr == "AE":
                assert new != old and str(new).startswith("AE"), what
            elif vr in ("LO", "LT", "SH", "ST", "UT", "UC", "PN"):
                assert "Jane" not in str(new) and PID not in str(new), what
    return checked


OPTION_SETS = [frozenset()] + [frozenset({o}) for o in table.options() if o not in table.PIXEL_OPTIONS]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda s: "+".join(sorted(s)) or "basic")
def test_every_listed_attribute_gets_its_action_at_every_depth(options):
    before = identified()
    after = copy.deepcopy(before)
    Profile(options, Keyed(KEY)).apply(after)
    assert _check(before, after, options, "") > 600
    assert str(after.PatientName) == after.PatientID != PID
    assert after.PatientIdentityRemoved == "YES"
    codes = [i.CodeValue for i in after.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100" and len(codes) == 1 + len(options)
    assert all(g not in {t >> 16 for t in after.keys()} for g in (0x5000, 0x6000))
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    if "retain_device_identity" not in options:
        assert "SourceApplicationEntityTitle" not in after.file_meta
    private = {t for t in after.keys() if (t >> 16) & 1}
    if "retain_safe_private" in options:
        block = after.private_block(0x7053, "Philips PET Private Group")
        assert block[0x00].value == "1.23" and 0x05 not in block
        assert private == {0x70530010, 0x70531000}
    else:
        assert not private
    written = pydicom.filebase.DicomBytesIO()
    after.save_as(written, enforce_file_format=True)
    keeps = any(r["options"].get(o) == "K" for r in table.load()["attributes"] for o in options)
    if not keeps and "retain_safe_private" not in options:  # kept values are the test's, and may hold "Jane"
        assert b"Jane" not in written.getvalue() and PID.encode() not in written.getvalue()


def test_uids_are_keyed_consistent_and_referenced_alike():
    a, b = identified(), identified()
    b.SOPInstanceUID = "1.2.826.0.1.3680043.2.1.2"
    b.ReferencedImageSequence[0].ReferencedSOPInstanceUID = a.SOPInstanceUID
    one = Profile(frozenset(), Keyed(KEY))
    out_a, out_b = one.apply(a), one.apply(b)
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID == out_a.sop_instance_uid[1]
    assert out_a.pseudonym == out_b.pseudonym
    other = identified()
    Profile(frozenset(), Keyed(bytes(32))).apply(other)
    assert other.SOPInstanceUID != a.SOPInstanceUID and other.PatientID != a.PatientID


def test_modified_dates_keep_intervals_between_studies_of_one_patient():
    p = Profile(frozenset({"retain_longitudinal_modified_dates"}), Keyed(KEY))
    first, later = identified(), identified()
    first.StudyDate, later.StudyDate = "20200101", "20200415"
    p.apply(first), p.apply(later)
    import datetime as dt
    d = [dt.datetime.strptime(x.StudyDate, "%Y%m%d") for x in (first, later)]
    assert (d[1] - d[0]).days == 105 and first.StudyDate != "20200101"
    assert first.LongitudinalTemporalInformationModified == "MODIFIED"


def _derive_in_a_new_process(key_hex: str) -> dict:
    code = ("import json,sys; from stowage.engine.deidentify.keys import Keyed; "
            f"k=Keyed(bytes.fromhex('{key_hex}')); print(json.dumps([k.uid('1.2.3'), "
            f"k.token('patient','id::{PID}'), k.date_offset_days('id::{PID}')]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.integration
def test_the_same_key_gives_the_same_pseudonyms_in_another_process_and_another_key_does_not():
    here = Keyed(KEY)
    assert _derive_in_a_new_process(KEY.hex()) == [here.uid("1.2.3"), here.token("patient", f"id::{PID}"),
                                                   here.date_offset_days(f"id::{PID}")]
    assert _derive_in_a_new_process("ab" * 32)[:2] != [here.uid("1.2.3"), here.token("patient", f"id::{PID}")]


def test_the_table_records_its_sources_and_editions():
    doc = table.load()
    assert doc["sources"]["table_E.1-1"]["edition"] == doc["sources"]["table_E.3.10-1"]["edition"] == "2026d"
    assert doc["edition"] == "PS3.15 2026d" and "pymedphys" in doc["sources"]["table_E.3.10-1"]["origin"]
    assert len(doc["attributes"]) > 650 and len(doc["safe_private"]) > 470
    assert doc["private_attributes"] == {"name": "Private Attributes", "basic": "X",
                                         "options": {"retain_safe_private": "C"}}
    codes = {a for r in doc["attributes"] for a in [r["basic"], *r["options"].values()]}
    assert codes <= {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


def test_projects_configuration_is_checked():
    with pytest.raises(ValueError, match="unknown de-identification option"):
        parse({"P": {"options": ["retain_everything"]}})
    with pytest.raises(ValueError, match="exclude each other"):
        parse({"P": {"options": ["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"]}})
    with pytest.raises(ValueError, match="clean_pixel_data"):
        parse({"P": {"pixel_regions": [{"manufacturer": "A", "model": "B", "rows": 1, "columns": 1,
                                        "regions": [[0, 0, 1, 1]]}]}})


def _sc(tmp_path: Path, compressed: bool) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    if not compressed:
        ds.decompress()
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "SONO 1"
    ds.PatientName, ds.PatientID = NAME, PID
    return ds


@pytest.mark.parametrize("compressed", [False, True], ids=["uncompressed", "rle"])
def test_burned_in_instances_are_quarantined_unless_their_device_has_regions(tmp_path, compressed):
    bare = Project.open(ProjectConfig("P", options=frozenset()), tmp_path)
    with pytest.raises(Quarantined, match="secondary capture"):
        bare.deidentify_dataset(_sc(tmp_path, compressed))
    region = Signature("ACME", "SONO 1", 100, 100, ((0, 0, 100, 20),))
    cleaning = Project.open(ProjectConfig("Q", options=frozenset({"clean_pixel_data"}), pixel_regions=(region,)),
                            tmp_path)
    ds = _sc(tmp_path, compressed)
    before = ds.pixel_array.copy()
    cleaning.deidentify_dataset(ds)
    path = tmp_path / "out.dcm"
    ds.save_as(path, enforce_file_format=True)
    again = pydicom.dcmread(path)
    assert again.file_meta.TransferSyntaxUID == (pydicom.uid.RLELossless if compressed
                                                 else pydicom.uid.ExplicitVRLittleEndian)
    pixels = again.pixel_array
    assert not pixels[:20].any() and before[:20].any()
    assert (pixels[20:] == before[20:]).all()  # lossless outside the regions
    assert again.BurnedInAnnotation == "NO"
    audit = [json.loads(line) for line in (tmp_path / "projects" / "P" / "audit.jsonl").read_text().splitlines()]
    assert audit[0]["event"] == "quarantined"
    bare.close(), cleaning.close()


def _dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.split(" - ", 1)[-1].strip() for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error")}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "waveform_ecg.dcm"])
@pytest.mark.parametrize("options", [frozenset(), frozenset({"retain_longitudinal_modified_dates",
                                                              "retain_patient_characteristics", "clean_descriptors",
                                                              "retain_device_identity"})],
                         ids=["basic", "research"])
def test_dciodvfy_finds_no_new_iod_error(tmp_path, name, options):
    """Both paths: through pydicom (export, send) and element by element (ingest, import)."""
    from stowage.engine.deidentify.folder import one_file
    src = Path(get_testdata_file(name))
    project = Project.open(ProjectConfig("P", options=options), tmp_path)
    ds = pydicom.dcmread(src)
    project.deidentify_dataset(ds)
    through_pydicom = tmp_path / "pydicom.dcm"
    ds.save_as(through_pydicom, enforce_file_format=True)
    (tmp_path / "out").mkdir()
    assert one_file(project, src, tmp_path / "out") == ("written", "")
    (encoded,) = (tmp_path / "out").iterdir()
    before = _dciodvfy_errors(src)
    for out in (through_pydicom, encoded):
        new = _dciodvfy_errors(out) - before
        assert not new, (out.name, new)
    project.close()


@pytest.mark.integration
def test_pydicom_test_files_all_pass_through_the_command(tmp_path):
    """Every file pydicom ships is de-identified or, burned-in, quarantined: none fails."""
    from pydicom.data import get_testdata_files
    src = tmp_path / "src"
    src.mkdir()
    for i, f in enumerate(f for f in get_testdata_files("*") if Path(f).is_file()):
        shutil.copy(f, src / f"{i:03d}-{Path(f).name}")
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[projects.P]\n'
                      'options = ["retain_longitudinal_modified_dates", "clean_descriptors"]\n')
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "deidentify", "--config", str(config), "--project", "P",
                        str(src), str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and " 0 failed" in r.stdout, r.stdout + r.stderr[-3000:]
    written = int(r.stdout.split()[0])
    # pydicom ships one instance in several transfer syntaxes: one SOP Instance UID, one output name
    assert written > 30 and 15 < len(list((tmp_path / "out").iterdir())) <= written
    for path in (tmp_path / "out").iterdir():
        ds = pydicom.dcmread(path, force=True)
        assert ds.PatientIdentityRemoved == "YES"


def _encoded(ds: Dataset, implicit: bool) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def _flat(ds: Dataset, path: str = "") -> dict:
    out = {}
    for e in ds:
        if e.VR == "SQ":
            out[path + str(e.tag)] = len(e.value)
            for i, item in enumerate(e.value):
                out.update(_flat(item, f"{path}{e.tag}[{i}]."))
        else:
            out[path + str(e.tag)] = e.value if isinstance(e.value, bytes) else str(e.value)
    return out


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda s: "+".join(sorted(s)) or "basic")
def test_the_element_by_element_path_gives_what_the_pydicom_path_gives(options, implicit):
    """encoded.py (ingest's fast path) and profile.py agree on every element, at every depth."""
    from pydicom.filereader import read_dataset

    from stowage.engine.deidentify import encoded
    src = identified()
    del src.file_meta
    for extra in ("CT_small.dcm", "rtplan.dcm"):
        other = pydicom.dcmread(get_testdata_file(extra))
        for tag in other.keys():
            if tag not in src and tag >> 16 != 0x7FE0:
                src[tag] = other[tag]
    raw = _encoded(src, implicit)
    syntax = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    profile = Profile(options, Keyed(KEY))
    data, fast_outcome, _cls = encoded.deidentify(profile, raw, syntax)
    fast = read_dataset(pydicom.filebase.DicomBytesIO(data), implicit, True)
    slow = read_dataset(pydicom.filebase.DicomBytesIO(raw), implicit, True)
    slow_outcome = profile.apply(slow)
    slow = read_dataset(pydicom.filebase.DicomBytesIO(_encoded(slow, implicit)), implicit, True)
    assert _flat(fast) == _flat(slow)
    assert fast_outcome.sop_instance_uid == slow_outcome.sop_instance_uid
    assert fast_outcome.pseudonym == slow_outcome.pseudonym


@pytest.mark.integration
def test_serve_refuses_a_bad_project_in_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nbind = "127.0.0.1"\nport = 1\nhttp_port = 0\n'
                      '[projects.X]\ncalled_ae = "X"\nkey_file = "/nonexistent/key"\n')
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "serve", "--config", str(config)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1 and "projects.X: cannot read key file /nonexistent/key" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_date_shifts_keep_the_form_of_ranges_partial_datetimes_and_offsets():
    from stowage.engine.deidentify.dates import shift_da, shift_dt
    assert shift_da("20200301", 1) == "20200229"
    assert shift_da("20200301-20200310", 10) == "20200220-20200229"
    assert shift_da("-20200310", 10) == "-20200229"
    assert shift_da("garbage", 3) == ""
    assert shift_dt("20200301101500.123+0100", 1) == "20200229101500.123+0100"
    assert shift_dt("202003", 1) == "202002"   # a year-month moves as its first day does
    assert shift_dt("2020", 1) == "2019"
