"""De-identification of unusual data, as a research site gets it: standard attributes a
system that did not know them wrote as UN, dates near the start of the calendar, VL
photographs beside Secondary Capture, a DICOMDIR in the folder. Each case is seconds."""
from __future__ import annotations

import errno
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from conftest import HOST
from stowage.engine.deidentify import encoded
from stowage.engine.deidentify.keys import Keyed
from stowage.engine.deidentify.profile import Profile
from stowage.engine.deidentify.project import Project, ProjectConfig, Quarantined
from test_bad_input import tmpfs  # noqa: F401  (fixture)

KEY = bytes(range(32))
ORIGINAL_REF = "1.2.3.4.5.6.7.8.99"


def _encode(ds: Dataset, implicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _mr() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.8.1"
    ds.StudyInstanceUID = "1.2.3.4.5.6.7.8.2"
    ds.SeriesInstanceUID = "1.2.3.4.5.6.7.8.3"
    ds.PatientName, ds.PatientID, ds.Modality = "SECRET^NAME", "MRN123456", "MR"
    return ds


def _with_un_sequence() -> bytes:
    """An Enhanced MR whose Per-frame Functional Groups Sequence an older system wrote as
    Explicit VR UN of defined length (its value Implicit VR, PS3.5 6.2.2): a Source Image
    Sequence in it references another instance by its original UID."""
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", ORIGINAL_REF
    source.PatientName = "SECRET^NAME"
    derivation = Dataset()
    derivation.SourceImageSequence = Sequence([source])
    frame = Dataset()
    frame.DerivationImageSequence = Sequence([derivation])
    holder = Dataset()
    holder.PerFrameFunctionalGroupsSequence = Sequence([frame])
    implicit = _encode(holder, True)
    _tag, length = struct.unpack_from("<II", implicit, 0)
    value = implicit[8:-8] if length == 0xFFFFFFFF else implicit[8:]  # defined length: no delimiter
    un = struct.pack("<HH", 0x5200, 0x9230) + b"UN\0\0" + struct.pack("<I", len(value)) + value
    return _encode(_mr(), False) + un


def test_a_standard_sequence_written_as_un_has_its_uids_replaced_on_the_element_path(tmp_path):
    """Ingest, import and `stowage deidentify` (encoded.py) kept such a sequence as it came:
    the original referenced UID and the patient's name went into the de-identified copy,
    where the pydicom path (export, send) replaced them."""
    raw = _with_un_sequence()
    assert ORIGINAL_REF.encode() in raw
    project = _project(tmp_path)
    result = project.deidentify_bytes(raw, ExplicitVRLittleEndian)  # what ingest calls
    data = result.dataset
    assert ORIGINAL_REF.encode() not in data and b"SECRET" not in data
    out = read_dataset(DicomBytesIO(data), False, True)
    ref = out.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == project.profile.keyed.uid(ORIGINAL_REF)
    assert out.SOPInstanceUID == project.profile.keyed.uid("1.2.3.4.5.6.7.8.1")
    # a private UN element is no reason to leave the element path
    private = struct.pack("<HH", 0x0009, 0x0010) + b"LO\x04\x00ACME" + \
        struct.pack("<HH", 0x0009, 0x1001) + b"UN\0\0" + struct.pack("<I", 4) + b"abcd"
    raw = _encode(_mr(), False)
    at = raw.index(struct.pack("<HH", 0x0010, 0x0010))  # before Patient's Name, in tag order
    raw = raw[:at] + private + raw[at:]
    encoded.deidentify(Profile(frozenset(), Keyed(KEY)), raw, ExplicitVRLittleEndian)
    project.close()


def test_dates_shifted_into_the_first_millennium_keep_eight_digits():
    """strftime's %Y wrote the year 91 as "91": a seven-digit DA that readers refuse."""
    from stowage.engine.deidentify.dates import shift_da, shift_dt
    assert shift_da("01000101", 3000) == "00911015"
    assert shift_da("00100101-00100301", 365) == "00090101-00090301"
    assert shift_dt("01000101120000+0100", 3000) == "00911015120000+0100"
    assert shift_dt("0100", 400) == "0098"
    assert shift_da("00010105", 10) == "00010101"  # before the calendar's start: its first day


def _project(tmp_path: Path, options: frozenset[str] = frozenset()) -> Project:
    return Project.open(ProjectConfig("P", options=options), tmp_path / "data")


def test_a_vl_photograph_is_not_taken_for_a_secondary_capture(tmp_path):
    """VL Photographic (…1.1.77.1.4) shares the digits of Secondary Capture (…1.1.7):
    it was quarantined as 'secondary capture' on both paths."""
    project = _project(tmp_path)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    ds.Modality = "XC"
    raw = _encode(ds, False)
    result = project.deidentify_bytes(raw, ExplicitVRLittleEndian)
    assert result.sop_class_uid == "1.2.840.10008.5.1.4.1.1.77.1.4"
    project.deidentify_dataset(ds)  # the pydicom path
    for sc in ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"):
        other = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        other.SOPClassUID = sc
        try:
            project.deidentify_bytes(_encode(other, False), ExplicitVRLittleEndian)
        except Quarantined as e:
            assert "secondary capture" in str(e)
        else:
            raise AssertionError(f"{sc} was not quarantined")
    project.close()


def test_a_dicomdir_in_the_folder_is_skipped_not_written(tmp_path):
    """`stowage deidentify` wrote a DICOMDIR out as an 'instance' named by a token: every
    patient record under one pseudonym, the original file paths kept, its record offsets
    broken by the rewrite. `stowage import` skips a DICOMDIR; so does the folder now."""
    from stowage.engine.deidentify.folder import one_file
    src = tmp_path / "DICOMDIR"
    shutil.copy(get_testdata_file("DICOMDIR"), src)
    no_preamble = tmp_path / "dicomdir-without-preamble"
    no_preamble.write_bytes(src.read_bytes()[128:])
    out = tmp_path / "out"
    out.mkdir()
    project = _project(tmp_path)
    assert one_file(project, src, out) == ("dicomdirs", str(src))
    assert one_file(project, no_preamble, out) == ("dicomdirs", str(no_preamble))
    assert not list(out.iterdir())
    project.close()


def _fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; the filler, to free it again."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _patient(n: int) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID, ds.PatientName = f"FULL-{n}", f"FULL^{n}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def test_a_full_disk_under_the_project_is_out_of_resources_not_a_bad_instance(make_server, tmpfs, tmp_path):
    """C-STORE to a project whose pseudonym table cannot be written (its disk full) was
    refused 0xC000 'cannot de-identify: OperationalError', which a modality takes for a bad
    instance and does not send again; it is 0xA700 (out of resources), and once there is
    room again the same instance is stored."""
    from pynetdicom import AE
    data = tmp_path / "data"
    tmpfs(data / "projects" / "TRIAL", "256k")
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{data}"\n[projects.TRIAL]\ncalled_ae = "TRIAL"\n')
    server = make_server("--config", str(config), "--workers", "1", data_dir=data)
    ae = AE("MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")

    def store(ds: Dataset) -> Dataset:
        assoc = ae.associate(HOST, server.port, ae_title="TRIAL")
        assert assoc.is_established
        try:
            return assoc.send_c_store(ds)
        finally:
            assoc.release()

    assert store(_patient(1)).Status == 0x0000  # the key, the table and the audit log made
    filler = _fill(data / "projects" / "TRIAL")
    second = _patient(2)
    answer = store(second)
    assert answer.Status == 0xA700, answer
    assert "TRIAL: cannot record pseudonyms" in str(answer.get("ErrorComment", "")), answer
    filler.unlink()
    assert store(second).Status == 0x0000


def test_a_full_disk_keeps_a_de_identifying_forward_entry_pending_not_parked(tmpfs, tmp_path):
    """A forwarding rule with `deidentify` parked every entry it could not record in the
    pseudonym table (a full disk) as 'not de-identified', never to be retried until a
    person ran `stowage queue --retry`; it is a passing condition: the entry stays pending."""
    from stowage.engine.forward.deidentified import rewrite_for
    from stowage.engine.forward.deliver import classify
    from stowage.engine.forward.sending import Answer
    from stowage.engine.transfer.results import Instance, RewriteError
    from stowage.engine.store.filemeta import file_meta
    data = tmp_path / "data"
    tmpfs(data / "projects" / "P", "256k")
    project = _project(tmp_path)
    rewrite = rewrite_for(project)
    ds = _patient(1)
    payload = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian) + _encode(ds, False)
    inst = Instance(ds.SOPInstanceUID, ds.SOPClassUID, ExplicitVRLittleEndian, "000-1.seg", 0, len(payload))
    rewrite(inst, payload)  # the table and log made
    filler = _fill(data / "projects" / "P")
    ds = _patient(2)
    payload = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian) + _encode(ds, False)
    with pytest.raises(RewriteError) as refused:
        rewrite(inst, payload)
    reason = str(refused.value)
    assert classify(Answer(ds.SOPInstanceUID, "failed", None, reason, "", "")) == "retry", reason
    filler.unlink()
    uid, _syntax, _payload = rewrite(inst, payload)
    assert uid == project.profile.keyed.uid(ds.SOPInstanceUID)
    project.close()


def test_a_lost_or_other_key_is_refused_not_silently_replaced(tmp_path):
    """A project whose key file went missing (a restore that skipped the owner-only file)
    got a new key on its next use: every patient and UID a new pseudonym, the research
    archive two of each. A key_file naming another key did the same. Both are refused now,
    in one line, before anything is de-identified; the right key works again."""
    import subprocess
    import sys
    from stowage.engine.deidentify.project import ProjectError, open_project
    data = tmp_path / "data"
    project = open_project({"P": {}}, "P", data)
    project.deidentify_dataset(_patient(1))
    project.close()
    key = data / "projects" / "P" / "key"
    saved = key.read_text()
    key.unlink()
    with pytest.raises(ProjectError, match=r"projects.P: its key .* is missing, but the project has de-identified"):
        open_project({"P": {}}, "P", data)
    assert not key.exists()
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{data}"\n[projects.P]\n')
    (tmp_path / "src").mkdir()
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "deidentify", "--config", str(config), "--project", "P",
                        str(tmp_path / "src"), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "is missing, but the project has de-identified before" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not key.exists()
    other = tmp_path / "other.key"
    other.write_text(bytes(range(32)).hex())
    with pytest.raises(ProjectError, match="is not the one its pseudonym table"):
        open_project({"P": {"key_file": str(other)}}, "P", data)
    key.write_text(saved)
    open_project({"P": {}}, "P", data).close()
    elsewhere = tmp_path / "saved.key"
    elsewhere.write_text(saved)
    open_project({"P": {"key_file": str(elsewhere)}}, "P", data).close()


def test_out_inside_src_is_not_read_again_as_originals(tmp_path):
    """`stowage deidentify study/ study/anon` run twice read the first run's output as
    originals: three runs left three files for one instance, de-identified once, twice and
    three times, and pseudonyms of pseudonyms in the table."""
    from stowage.engine.deidentify.folder import deidentify_folder
    src = tmp_path / "study"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
    for _run in range(3):
        result = deidentify_folder({"P": {}}, "P", tmp_path / "data", src, src / "anon", jobs=1)
        assert (result.written, result.failed, result.quarantined) == (1, [], [])
    assert len(list((src / "anon").iterdir())) == 1
    project = _project(tmp_path)
    assert len(project.pseudonyms.patients()) == 1
    project.close()


@pytest.mark.parametrize("patient_id, name, birth", [(" 4711", "DOE^JOHN", "19600203"),
                                                     ("", " DOE^JOHN", "19600203")],
                         ids=["right-aligned-id", "no-id-padded-name"])
def test_padding_gives_one_patient_one_pseudonym_on_both_paths(tmp_path, patient_id, name, birth):
    """Ingest (encoded.py) read " 4711" as "4711", export and send (pydicom) as " 4711": one
    patient, two pseudonyms, two date offsets, depending on how the study came and went."""
    import warnings
    project = _project(tmp_path, frozenset({"retain_longitudinal_modified_dates"}))
    ds = _patient(1)
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, name, birth
    del ds.file_meta
    fast = project.deidentify_bytes(_encode(ds, False), ExplicitVRLittleEndian).outcome
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = project.deidentify_dataset(read_dataset(DicomBytesIO(_encode(ds, False)), False, True))
    assert (fast.pseudonym, fast.date_offset_days) == (slow.pseudonym, slow.date_offset_days)
    assert len(project.pseudonyms.patients()) == 1
    project.close()


def _regions_project(tmp_path: Path, ds: Dataset) -> Project:
    from stowage.engine.deidentify.pixels import Signature
    signature = Signature(str(ds.get("Manufacturer", "")), str(ds.get("ManufacturerModelName", "")), ds.Rows,
                          ds.Columns, ((0, 0, 5, 5),))
    return Project.open(ProjectConfig("P", options=frozenset({"clean_pixel_data"}), pixel_regions=(signature,)),
                        tmp_path / "data")


def _rgb_two_frames() -> tuple[Dataset, np.ndarray]:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    ds.decompress()
    ds.Modality, ds.BurnedInAnnotation = "US", "YES"
    return ds, ds.pixel_array.copy()


@pytest.mark.parametrize("layout", ["planar", "ybr", "one-bit"])
def test_cleaned_uncompressed_pixels_keep_their_layout(tmp_path, layout):
    """Clean Pixel Data wrote pydicom's decoded array back as it came out: interleaved RGB
    under Planar Configuration 1 (an ultrasound read back with scrambled colours), RGB
    under YBR_FULL (pydicom 3 decodes YBR as RGB), a byte per pixel under Bits Allocated 1."""
    import numpy as np
    from pydicom.pixels import convert_color_space
    if layout == "one-bit":
        ds = pydicom.dcmread(get_testdata_file("liver_1frame.dcm"))
        ds.BurnedInAnnotation = "YES"
        expected = ds.pixel_array.copy()
        expected[:5, :5] = 0
    else:
        ds, rgb = _rgb_two_frames()
        if layout == "planar":
            ds.PlanarConfiguration = 1
            ds.PixelData = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)).tobytes()
            expected = rgb.copy()
        else:
            expected = convert_color_space(rgb, "RGB", "YBR_FULL")
            ds.PhotometricInterpretation = "YBR_FULL"
            ds.PixelData = expected.tobytes()
            expected = expected.copy()
        expected[:, :5, :5] = 0
    project = _regions_project(tmp_path, ds)
    size = len(ds.PixelData)
    project.deidentify_dataset(ds)
    assert len(ds.PixelData) == size and ds.BurnedInAnnotation == "NO"
    ds.pixel_array_options(as_rgb=False)
    assert (ds.pixel_array == expected).all()
    project.close()


def test_bare_data_sets_and_files_starting_with_their_meta_are_de_identified(tmp_path):
    """`stowage import` reads a data set without preamble and file meta (old ACR-NEMA-style
    exports) and a file that starts with its file meta group; `stowage deidentify` counted
    both as "not DICOM" and wrote nothing."""
    from stowage.engine.deidentify.folder import one_file
    from stowage.engine.store.filemeta import file_meta
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    shapes = {}
    for n, shape in enumerate(("bare-implicit", "bare-explicit", "meta-first")):
        ds = _patient(n)
        del ds.file_meta
        if shape == "meta-first":
            data = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian) + _encode(ds, False)
        else:
            data = _encode(ds, shape == "bare-implicit")
        (src / shape).write_bytes(data)
        shapes[shape] = ds
    (src / "notes.txt").write_text("not DICOM\n")
    project = _project(tmp_path)
    for shape, ds in shapes.items():
        assert one_file(project, src / shape, out) == ("written", ""), shape
        written = pydicom.dcmread(out / f"{project.profile.keyed.uid(ds.SOPInstanceUID)}.dcm")
        assert written.PatientName == written.PatientID != ds.PatientID and written.PatientIdentityRemoved == "YES"
    assert one_file(project, src / "notes.txt", out) == ("skipped", "")
    project.close()
