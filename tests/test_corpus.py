"""Tests for the benchmark corpus generator (bench.corpus)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)

from stowage.bench.corpus import generate, main, series_layout


def test_count_and_names(tmp_path: Path) -> None:
    paths = generate(tmp_path, "small", 25)
    assert len(paths) == 25
    assert [p.name for p in paths] == [f"{i:06d}.dcm" for i in range(25)]
    assert sorted(tmp_path.iterdir()) == paths
    assert generate(tmp_path / "empty", "small", 0) == []


def test_same_seed_identical_bytes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", "small", 12, seed=7)
    b = generate(tmp_path / "b", "small", 12, seed=7)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_different_seed_differs(tmp_path: Path) -> None:
    a = pydicom.dcmread(generate(tmp_path / "a", "small", 1, seed=1)[0])
    b = pydicom.dcmread(generate(tmp_path / "b", "small", 1, seed=2)[0])
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert a.PixelData != b.PixelData


def test_shape(tmp_path: Path) -> None:
    paths = generate(tmp_path, "small", 24, patients=3, studies_per_patient=2, series_per_study=2)
    dss = [pydicom.dcmread(p) for p in paths]
    study_patient, series_study = {}, {}
    series_instances: dict[str, list[int]] = defaultdict(list)
    for ds in dss:
        assert study_patient.setdefault(ds.StudyInstanceUID, ds.PatientID) == ds.PatientID
        assert series_study.setdefault(ds.SeriesInstanceUID, ds.StudyInstanceUID) == ds.StudyInstanceUID
        series_instances[ds.SeriesInstanceUID].append(int(ds.InstanceNumber))
    assert len({ds.PatientID for ds in dss}) == 3
    assert len({ds.PatientName for ds in dss}) == 3
    assert len(study_patient) == 6
    assert len(series_study) == 12
    assert all(sorted(v) == [1, 2] for v in series_instances.values())
    assert {int(ds.SeriesNumber) for ds in dss} == {1, 2}
    assert len({ds.SOPInstanceUID for ds in dss}) == 24
    uids = set(study_patient) | set(series_study) | {ds.SOPInstanceUID for ds in dss}
    assert len(uids) == 6 + 12 + 24  # no UID reused across levels


def test_fewer_instances_than_series(tmp_path: Path) -> None:
    dss = [pydicom.dcmread(p) for p in generate(tmp_path, "small", 5, patients=3, series_per_study=2)]
    assert len({ds.SeriesInstanceUID for ds in dss}) == 5
    assert len({ds.SOPInstanceUID for ds in dss}) == 5


@pytest.mark.parametrize("count,n_series", [(10, 3), (3, 10), (0, 4), (100, 1)])
def test_series_layout(count: int, n_series: int) -> None:
    blocks = series_layout(count, n_series)
    assert len(blocks) == n_series
    assert [i for b in blocks for i in b] == list(range(count))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("kind,count,lo,hi", [("small", 20, 8_500, 12_000), ("ct", 3, 520_000, 540_000)])
def test_file_sizes(tmp_path: Path, kind: str, count: int, lo: int, hi: int) -> None:
    sizes = [p.stat().st_size for p in generate(tmp_path, kind, count)]
    assert all(lo <= s <= hi for s in sizes), sizes


@pytest.mark.parametrize(
    "kind,sop_class,modality,size", [("small", MRImageStorage, "MR", 64), ("ct", CTImageStorage, "CT", 512)]
)
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_readable(tmp_path: Path, kind: str, sop_class: str, modality: str, size: int, ts: str) -> None:
    for p in generate(tmp_path, kind, 2, transfer_syntax=ts):
        assert p.read_bytes()[128:132] == b"DICM"
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == ts
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == sop_class
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == modality
        for kw in ("PatientName", "PatientID", "StudyDate", "StudyDescription", "SeriesNumber", "InstanceNumber"):
            assert ds.get(kw) not in (None, ""), kw
        arr = ds.pixel_array
        assert arr.shape == (size, size) and arr.dtype == np.uint16
        assert 0 <= arr.min() and arr.max() <= 4095 and arr.std() > 10  # not flat, fits 12 bits


def test_compressed_syntax_is_lossless(tmp_path: Path) -> None:
    raw = pydicom.dcmread(generate(tmp_path / "raw", "small", 1)[0])
    rle = pydicom.dcmread(generate(tmp_path / "rle", "small", 1, transfer_syntax=RLELossless)[0])
    assert rle.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(raw.pixel_array, rle.pixel_array)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, "pet", 1)
    with pytest.raises(ValueError):
        generate(tmp_path, "small", 1, transfer_syntax=ExplicitVRBigEndian)
    with pytest.raises(ValueError):
        generate(tmp_path, "small", 1, patients=0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--kind", "small", "--count", "3", "--out", str(tmp_path), "--seed", "5"])
    assert len(list(tmp_path.glob("*.dcm"))) == 3
    assert "wrote 3 files" in capsys.readouterr().out


@pytest.mark.parametrize("kind,modality,sop_class,lo,hi", [
    ("sr", "SR", "1.2.840.10008.5.1.4.1.1.88.11", 3_000, 8_000),
    ("mr", "MR", MRImageStorage, 125_000, 140_000),
    ("cr", "CR", "1.2.840.10008.5.1.4.1.1.1", 7_400_000, 7_700_000),
    ("us", "US", "1.2.840.10008.5.1.4.1.1.3.1", 9_100_000, 9_400_000),
])
def test_more_kinds(tmp_path: Path, kind: str, modality: str, sop_class: str, lo: int, hi: int) -> None:
    paths = generate(tmp_path, kind, 2, patients=1, studies_per_patient=1, series_per_study=1)
    assert all(lo <= p.stat().st_size <= hi for p in paths), [p.stat().st_size for p in paths]
    dss = [pydicom.dcmread(p) for p in paths]
    for ds in dss:
        assert ds.Modality == modality and ds.SOPClassUID == sop_class == ds.file_meta.MediaStorageSOPClassUID
        assert ds.PatientID and ds.StudyInstanceUID and ds.SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in dss}) == 2 and len({ds.SeriesInstanceUID for ds in dss}) == 1
    if kind == "sr":
        assert "PixelData" not in dss[0] and dss[0].ValueType == "CONTAINER"
        assert [i.ValueType for i in dss[0].ContentSequence] == ["TEXT"] * 6
        assert dss[0].ContentSequence[0].TextValue != dss[1].ContentSequence[0].TextValue
    elif kind == "us":
        arr = dss[0].pixel_array
        assert arr.shape == (10, 480, 640, 3) and arr.dtype == np.uint8 and arr.std() > 5
        assert int(dss[0].NumberOfFrames) == 10
    else:
        arr = dss[0].pixel_array
        assert arr.shape == (int(dss[0].Rows), int(dss[0].Columns)) and arr.std() > 10


def test_frames_make_multiframe_sizes(tmp_path: Path) -> None:
    (p,) = generate(tmp_path, "us", 1, frames=25)
    ds = pydicom.dcmread(p, stop_before_pixels=True)
    assert int(ds.NumberOfFrames) == 25
    assert 25 * 921_600 <= p.stat().st_size <= 25 * 921_600 + 10_000
    with pytest.raises(ValueError):
        generate(tmp_path / "ct", "ct", 1, frames=4)  # single-frame kind
    with pytest.raises(ValueError):
        generate(tmp_path / "us0", "us", 1, frames=0)


@pytest.mark.parametrize("kind", ["sr", "cr", "us"])
def test_new_kinds_deterministic(tmp_path: Path, kind: str) -> None:
    a = generate(tmp_path / "a", kind, 2, seed=3, frames=2 if kind == "us" else None)
    b = generate(tmp_path / "b", kind, 2, seed=3, frames=2 if kind == "us" else None)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


@pytest.mark.parametrize("syntax,uid", [
    ("deflate", "1.2.840.10008.1.2.1.99"),
    ("rle", RLELossless),
    ("j2k", "1.2.840.10008.1.2.4.90"),
])
@pytest.mark.parametrize("kind", ["small", "ct", "us"])
def test_compressed_and_deflated_syntaxes(tmp_path: Path, syntax: str, uid: str, kind: str) -> None:
    frames = 2 if kind == "us" else None
    (raw,) = generate(tmp_path / "raw", kind, 1, frames=frames)
    (enc,) = generate(tmp_path / syntax, kind, 1, transfer_syntax=syntax, frames=frames)
    a, b = pydicom.dcmread(raw), pydicom.dcmread(enc)
    assert b.file_meta.TransferSyntaxUID == uid
    assert enc.stat().st_size < raw.stat().st_size
    assert np.array_equal(a.pixel_array, b.pixel_array)  # lossless
    assert a.SOPInstanceUID != b.SOPInstanceUID  # another syntax is other instances


def test_sr_in_a_compressed_syntax_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no pixel data"):
        generate(tmp_path, "sr", 1, transfer_syntax="rle")
    assert [pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in generate(tmp_path, "sr", 1, transfer_syntax="deflate")] \
        == ["1.2.840.10008.1.2.1.99"]


def test_cli_syntax_and_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--kind", "us", "--count", "1", "--frames", "2", "--syntax", "rle", "--out", str(tmp_path)])
    ds = pydicom.dcmread(next(tmp_path.glob("*.dcm")), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == RLELossless and int(ds.NumberOfFrames) == 2
