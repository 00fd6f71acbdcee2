"""engine/web/native_frame.py against pydicom on real files: wherever the walk finds frame 1
it is byte for byte the frame pydicom cuts (engine/web/pixels.py), and it leaves to pydicom
what it must (compressed, multi-frame, 1-bit, YBR_FULL_422, truncated, lying lengths)."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import pydicom.data
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import CT, MR
from stowage.engine.store.filemeta import PREAMBLE
from stowage.engine.web import pixels
from stowage.engine.web.native_frame import frame_one


def _payload(path_or_bytes) -> bytes:
    """A record's payload (file meta + data set) of a Part-10 file."""
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    assert raw[128:132] == b"DICM"
    return raw[132:]


def _pydicom_frame(payload: bytes) -> bytes | None:
    try:
        ds = pixels.read(PREAMBLE + payload)
        pixels.check(ds, [1])
        return pixels.stored(ds, [1])[1][0]
    except pixels.FrameError:
        return None


def _part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_every_frame_found_is_pydicom_s_frame():
    taken = []
    for f in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("**/*.dcm")):  # no downloads
        raw = Path(f).read_bytes()
        if raw[128:132] != b"DICM":
            continue
        got = frame_one(raw[132:])
        if got is not None:
            assert bytes(got) == _pydicom_frame(raw[132:]), f
            taken.append(Path(f).name)
    # the usual slices take the walk; the rest is pydicom's
    assert {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "examples_rgb_color.dcm"} <= set(taken), taken
    for name in ("MR_small_RLE.dcm", "rtdose.dcm", "liver_1frame.dcm", "SC_ybr_full_422_uncompressed.dcm",
                 "MR_truncated.dcm", "badVR.dcm"):  # compressed, 15 frames, 1-bit, 4:2:2, cut short, '1A' frames
        assert frame_one(_payload(get_testdata_file(name))) is None, name


def test_sequences_of_undefined_length_are_walked_over():
    ds = pydicom.dcmread(CT)
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3"
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    nested = Dataset()
    nested.CodeValue, nested.CodingSchemeDesignator, nested.CodeMeaning = "1", "DCM", "x"
    inner.PurposeOfReferenceCodeSequence = Sequence([nested])
    ds.ReferencedImageSequence = Sequence([inner, inner])
    ds["ReferencedImageSequence"].is_undefined_length = True
    for item in ds.ReferencedImageSequence:
        item.is_undefined_length_sequence_item = True
    ds.PurposeOfReferenceCodeSequence = Sequence([nested])  # also one of defined length
    payload = _payload(_part10(ds))
    assert b"\xfe\xff\xdd\xe0" in payload and b"\xfe\xff\x0d\xe0" in payload  # sequence and item delimiters
    got = frame_one(payload)
    assert got is not None and bytes(got) == ds.PixelData


@pytest.mark.parametrize("change", ["rows", "frames", "bits", "no pixels", "float pixels"])
def test_what_does_not_add_up_is_left_to_pydicom(change):
    ds = pydicom.dcmread(MR)
    if change == "rows":
        ds.Rows += 1  # the value no longer holds rows x columns
    elif change == "frames":
        ds.NumberOfFrames = 2
        ds.Rows //= 2
    elif change == "bits":
        ds.BitsAllocated = 12
    elif change == "no pixels":
        del ds.PixelData
    else:
        ds.FloatPixelData = ds.PixelData[:4]
        del ds.PixelData
    assert frame_one(_payload(_part10(ds))) is None
