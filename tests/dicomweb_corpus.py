"""A small corpus for the DICOMweb tests, made once per module: two patients, three
studies, CT series of a few slices (one of them JPEG 2000 lossless), an MR, a multi-frame."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import CT, MR


@dataclass
class Corpus:
    files: list[Path] = field(default_factory=list)
    studies: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # study -> series -> SOP UIDs
    by_uid: dict[str, Path] = field(default_factory=dict)

    def add(self, path: Path, ds: pydicom.Dataset) -> None:
        self.files.append(path)
        self.studies.setdefault(ds.StudyInstanceUID, {}).setdefault(ds.SeriesInstanceUID, []).append(
            ds.SOPInstanceUID)
        self.by_uid[ds.SOPInstanceUID] = path


def _write(out: Path, ds: pydicom.Dataset, corpus: Corpus) -> None:
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    corpus.add(path, ds)


def make_corpus(out: Path) -> Corpus:
    out.mkdir(parents=True, exist_ok=True)
    corpus = Corpus()
    people = (("DOE^JOHN", "PID-1", "20200105", "CHEST CT"), ("Müller^Jürgen", "PID-2", "20210310", "HEAD MR"))
    ct = pydicom.dcmread(CT)
    ct.PatientName, ct.PatientID, ct.StudyDate, ct.StudyDescription = people[0]
    ct.StudyInstanceUID, ct.AccessionNumber = generate_uid(), "ACC-1"
    for series_number in (1, 2):
        ct.SeriesInstanceUID, ct.SeriesNumber, ct.Modality = generate_uid(), series_number, "CT"
        for i in range(3):
            ct.SOPInstanceUID, ct.InstanceNumber = generate_uid(), i + 1
            _write(out, ct, corpus)
    mr = pydicom.dcmread(MR)
    mr.PatientName, mr.PatientID, mr.StudyDate, mr.StudyDescription = people[1]
    mr.SpecificCharacterSet = "ISO_IR 100"
    mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.AccessionNumber = generate_uid(), generate_uid(), "ACC-2"
    for i in range(2):
        mr.SOPInstanceUID, mr.InstanceNumber = generate_uid(), i + 1
        _write(out, mr, corpus)
    j2k = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    j2k.PatientName, j2k.PatientID, j2k.StudyDate = people[1][:3]
    j2k.StudyInstanceUID, j2k.SeriesInstanceUID, j2k.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    j2k.AccessionNumber = "ACC-3"
    _write(out, j2k, corpus)
    multi = pydicom.dcmread(CT)  # three frames, each CT_small's pixels with an offset
    frames = [(multi.pixel_array + 100 * i).astype(multi.pixel_array.dtype) for i in range(3)]
    multi.NumberOfFrames = 3
    multi.PixelData = b"".join(f.astype(frames[0].dtype).tobytes() for f in frames)
    multi.PatientName, multi.PatientID = people[1][:2]
    multi.StudyInstanceUID = j2k.StudyInstanceUID
    multi.SeriesInstanceUID, multi.SOPInstanceUID = generate_uid(), generate_uid()
    _write(out, multi, corpus)
    return corpus
