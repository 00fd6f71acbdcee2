"""What issue #22's "Verified by" asks that the other de-identification tests do not show
end to end: the same patient de-identified by two processes on two different days (the
second under libfaketime) gets the same pseudonym, UIDs and date offset; two projects give
different ones and neither key leaves its project; compressed (JPEG 2000) pixel data of a
burned-in instance is cleaned on the ingest path: decoded, blanked, re-encoded losslessly."""
from __future__ import annotations

import csv
import datetime as dt
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from stowage.engine.deidentify.pixels import Signature
from stowage.engine.deidentify.project import Project, ProjectConfig, Quarantined

REPO = Path(__file__).resolve().parent.parent
OPTIONS = '["retain_longitudinal_modified_dates", "retain_patient_characteristics"]'


def _cli(*args: str, faketime: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stowage.cli", *args]
    if faketime:
        cmd = ["faketime", faketime, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180)


def _sources(tmp_path: Path) -> Path:
    """Two studies of one patient: CT_small and MR_small made his (MR a year later)."""
    src = tmp_path / "src"
    src.mkdir()
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for ds in (ct, mr):
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^John", "MRN-4711", "19600203"
    ct.StudyDate = "20200110"
    mr.StudyDate = "20210110"
    ct.save_as(src / "ct.dcm", enforce_file_format=True)
    mr.save_as(src / "mr.dcm", enforce_file_format=True)
    return src


def _outputs(folder: Path) -> dict[str, tuple]:
    """Per modality: (file name, patient, study, series, frame of reference UIDs, study date)."""
    out = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        out[ds.Modality] = (path.name, str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                            ds.get("FrameOfReferenceUID", ""), ds.StudyDate)
    return out


@pytest.mark.integration
def test_another_process_on_another_day_gives_the_same_pseudonyms_uids_and_date_offset(tmp_path):
    probe = subprocess.run(["faketime", "+400 days", sys.executable, "-c", "import datetime; print(datetime.date.today())"],
                           capture_output=True, text=True, timeout=60)
    assert dt.date.fromisoformat(probe.stdout.strip()) - dt.date.today() >= dt.timedelta(days=399)
    src = _sources(tmp_path)
    config = tmp_path / "stowage.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[projects.TRIAL]\noptions = {OPTIONS}\n')
    today = _cli("deidentify", "--config", str(config), "--project", "TRIAL", str(src), str(tmp_path / "today"))
    assert today.returncode == 0 and "2 de-identified" in today.stdout, today.stderr
    another = _cli("deidentify", "--config", str(config), "--project", "TRIAL", "--jobs", "1", str(src),
                   str(tmp_path / "later"), faketime="+400 days")
    assert another.returncode == 0 and "2 de-identified" in another.stdout, another.stderr
    first, second = _outputs(tmp_path / "today"), _outputs(tmp_path / "later")
    assert first == second
    ct, mr = first["CT"], first["MR"]
    assert ct[2] == mr[2] != "MRN-4711" and ct[1] == ct[2]          # one patient, one pseudonym
    assert ct[3] != mr[3] and not {ct[3], mr[3]} & {"", None}       # two studies, keyed UIDs
    assert all(u.startswith("2.25.") for u in (*ct[3:6], *mr[3:6]))
    moved = [dt.date.fromisoformat(f"{d[:4]}-{d[4:6]}-{d[6:]}") for d in (ct[6], mr[6])]
    assert (moved[1] - moved[0]).days == 366 and ct[6] != "20200110"  # one offset for the patient
    rows = list(csv.reader(io.StringIO(_cli("pseudonyms", "--config", str(config), "--project", "TRIAL").stdout)))
    assert rows[1:] == [[ct[2], "MRN-4711", "Doe^John", str((dt.date(2020, 1, 10) - moved[0]).days)]]


@pytest.mark.integration
def test_two_projects_give_different_pseudonyms_uids_and_dates_and_keep_their_keys(tmp_path):
    src = _sources(tmp_path)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "a").write_text("11" * 32 + "\n")
    (keys / "b").write_text("22" * 32 + "\n")
    config = tmp_path / "stowage.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n'
                      f'[projects.A]\noptions = {OPTIONS}\nkey_file = "{keys / "a"}"\n'
                      f'[projects.B]\noptions = {OPTIONS}\nkey_file = "{keys / "b"}"\n'
                      f'[projects.C]\noptions = {OPTIONS}\n')
    outs = {}
    for name in "ABC":
        r = _cli("deidentify", "--config", str(config), "--project", name, str(src), str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        outs[name] = _outputs(tmp_path / name)
    for x, y in (("A", "B"), ("A", "C"), ("B", "C")):
        for modality in ("CT", "MR"):
            a, b = outs[x][modality], outs[y][modality]
            assert a[0] != b[0] and a[2] != b[2] and a[3] != b[3] and a[4] != b[4] and a[6] != b[6], (x, y)
    generated = tmp_path / "data" / "projects" / "C" / "key"  # C's key: made on first use, owner-only
    assert generated.stat().st_mode & 0o777 == 0o600
    key = bytes.fromhex(generated.read_text().strip())
    for name in "ABC":
        for path in (tmp_path / name).iterdir():
            data = path.read_bytes()
            assert key not in data and key.hex().encode() not in data and b"11" * 32 not in data


def _j2k_burned_in() -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.BurnedInAnnotation = "YES"
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "MR 1"
    ds.PatientName, ds.PatientID = "Doe^John", "MRN-4711"
    return ds


def _encoded(ds: pydicom.Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def test_jpeg_2000_pixels_are_cleaned_on_the_ingest_path_or_quarantined(tmp_path):
    """Project.deidentify_bytes is what C-STORE to a project and `stowage import --project` call."""
    src = _j2k_burned_in()
    assert src.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    before = src.pixel_array.copy()
    bare = Project.open(ProjectConfig("P"), tmp_path)
    with pytest.raises(Quarantined, match="Burned In Annotation"):
        bare.deidentify_bytes(_encoded(src), pydicom.uid.JPEG2000Lossless)
    region = Signature("ACME", "MR 1", 64, 64, ((0, 0, 64, 10), (50, 50, 14, 14)))
    cleaning = Project.open(ProjectConfig("Q", options=frozenset({"clean_pixel_data"}), pixel_regions=(region,)),
                            tmp_path)
    result = cleaning.deidentify_bytes(_encoded(src), pydicom.uid.JPEG2000Lossless)
    assert result.transfer_syntax == pydicom.uid.RLELossless
    out = pydicom.dataset.Dataset()
    out = pydicom.filereader.read_dataset(pydicom.filebase.DicomBytesIO(result.dataset), False, True)
    out.file_meta = pydicom.dataset.FileMetaDataset()
    out.file_meta.TransferSyntaxUID = result.transfer_syntax
    pixels = out.pixel_array
    mask = np.zeros(before.shape, bool)
    mask[0:10, :] = mask[50:64, 50:64] = True
    assert before[mask].any() and not pixels[mask].any()
    assert (pixels[~mask] == before[~mask]).all()  # lossless everywhere else
    assert out.BurnedInAnnotation == "NO" and out.PatientID != "MRN-4711"
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]  # Clean Pixel Data Option
    bare.close(), cleaning.close()
    shutil.rmtree(tmp_path / "projects")


def test_what_one_profile_remembers_between_instances_changes_nothing(tmp_path):
    """encoded.py remembers rewritten elements per profile (one series repeats them): a series
    of two patients interleaved through one profile comes out byte for byte as each instance
    does through a fresh profile, UIDs mapped alike."""
    from stowage.engine.deidentify import encoded
    from stowage.engine.deidentify.keys import Keyed
    from stowage.engine.deidentify.profile import Profile
    options = frozenset({"retain_longitudinal_modified_dates", "retain_device_identity", "clean_descriptors"})
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    instances = []
    for i in range(6):
        ds = base.copy()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1.{i}"
        ds.PatientID, ds.PatientName = ("MRN-1", "Doe^John") if i % 2 else ("MRN-2", "Roe^Jane")
        ds.StudyDescription = f"CT of {ds.PatientName} {ds.PatientID}"
        instances.append(_encoded(ds))
    shared = Profile(options, Keyed(bytes(range(32))))
    assert not shared.acted
    for raw in instances * 2:
        fresh = Profile(options, Keyed(bytes(range(32))))
        got, got_outcome, _ = encoded.deidentify(shared, raw, pydicom.uid.ExplicitVRLittleEndian)
        want, want_outcome, _ = encoded.deidentify(fresh, raw, pydicom.uid.ExplicitVRLittleEndian)
        assert got == want
        assert got_outcome.uids == want_outcome.uids and got_outcome.sop_instance_uid == want_outcome.sop_instance_uid
    assert len(shared.acted) > 10


def test_encapsulated_pixel_data_passes_the_element_by_element_path_as_it_came(tmp_path):
    """A compressed instance without burned-in text: its fragments are copied byte for byte
    (undefined length, items walked over, never decoded) and what is around them de-identified."""
    from stowage.engine.deidentify import encoded
    src = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    src.PatientName, src.PatientID = "Doe^John", "MRN-4711"
    project = Project.open(ProjectConfig("P"), tmp_path)
    parts, outcome, _ = encoded.deidentify_parts(project.profile, _encoded(src), pydicom.uid.JPEG2000Lossless)
    out = pydicom.filereader.read_dataset(pydicom.filebase.DicomBytesIO(b"".join(parts)), False, True)
    out.file_meta = pydicom.dataset.FileMetaDataset()
    out.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    assert out.PixelData == src.PixelData and (out.pixel_array == src.pixel_array).all()
    assert out.PatientID != "MRN-4711" and out.SOPInstanceUID == outcome.sop_instance_uid[1] != src.SOPInstanceUID
    project.close()
