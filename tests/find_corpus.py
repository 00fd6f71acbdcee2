"""A small archive for C-FIND tests: three patients with studies, series and instances
whose values exercise every matching type, plus the DICOM character set examples that
pydicom ships (PS3.5 Annex H/I/J: Japanese, Korean, Chinese, Greek, ...) and a
Windows-1252 name mislabelled ISO_IR 100.

`datasets()` gives Part-10 datasets; `catalog_of()` seals their catalog rows directly (no
network), `write()` puts them in files for a real C-STORE.
"""
from __future__ import annotations

import time
from pathlib import Path

from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from stowage.catalog.attributes import encode_dataset, extract

CT, MR, SR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.88.11"
ROOT = "1.2.826.0.1.3680043.10.1138"  # a test UID root
INJECTION = "X' OR '1'='1"
CHARSET_FILES = ["chrFren.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrRuss.dcm", "chrArab.dcm", "chrHbrw.dcm",
                 "chrH31.dcm", "chrH32.dcm", "chrI2.dcm", "chrJapMulti.dcm", "chrKoreanMulti.dcm", "chrX1.dcm", "chrX2.dcm"]

# patient -> studies -> series -> instances; every UID derives from ROOT
PATIENTS = [
    dict(PatientID="PAT-1", PatientName="SMITH^JOHN", PatientBirthDate="19700101", PatientSex="M",
         PatientBirthTime="0830", studies=[
             dict(key=1, StudyDate="20240110", StudyTime="101500", AccessionNumber="ACC-1", StudyID="1",
                  StudyDescription="CT CHEST", ReferringPhysicianName="HOUSE^GREGORY",
                  procedure=("CT123", "LOCAL", "CT chest w/o"), series=[
                      dict(key=1, Modality="CT", SeriesNumber="1", SeriesDescription="axial", sop=CT, n=3),
                      dict(key=2, Modality="SR", SeriesNumber="99", SeriesDescription="report", sop=SR, n=1)]),
             dict(key=2, StudyDate="20240215", StudyTime="230000", AccessionNumber="ACC-2", StudyID="2",
                  StudyDescription="MR HEAD", ReferringPhysicianName="WILSON^JAMES",
                  procedure=("MR001", "LOCAL", "MR head"), series=[
                      dict(key=1, Modality="MR", SeriesNumber="1", SeriesDescription="t1", sop=MR, n=2)])]),
    dict(PatientID="PAT-2", PatientName="SMYTHE^JANE^^^", PatientBirthDate="19851231", PatientSex="F",
         studies=[
             dict(key=1, StudyDate="20231231", StudyTime="235959", AccessionNumber="ACC-3", StudyID="7",
                  StudyDescription="100%_SURE", ReferringPhysicianName="HOUSE^GREGORY",
                  procedure=("CT123", "LOCAL", "CT chest w/o"), series=[
                      dict(key=1, Modality="CT", SeriesNumber="2", SeriesDescription="axial", sop=CT, n=2)])]),
    dict(PatientID=INJECTION, PatientName="O'BRIEN^SEAN", PatientBirthDate="20000229", PatientSex="M",
         studies=[
             dict(key=1, StudyDate="20240101", StudyTime="000000", AccessionNumber="ACC-4", StudyID="1",
                  StudyDescription="XR; DROP TABLE records;--", ReferringPhysicianName="",
                  procedure=None, series=[
                      dict(key=1, Modality="CR", SeriesNumber="1", SeriesDescription="pa", sop=CT, n=1)])]),
]


def uid(*parts: object) -> str:
    return ".".join([ROOT, *map(str, parts)])


def _instance(p: int, patient: dict, study: dict, series: dict, i: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = series["sop"]
    ds.SOPInstanceUID = uid(p, study["key"], series["key"], i + 1)
    ds.StudyDate, ds.StudyTime = study["StudyDate"], study["StudyTime"]
    ds.ContentDate, ds.ContentTime = study["StudyDate"], f"{int(study['StudyTime'][:2]):02d}{i:02d}00"
    ds.AcquisitionDateTime = study["StudyDate"] + study["StudyTime"] + ".000000"
    ds.AccessionNumber = study["AccessionNumber"]
    ds.Modality = series["Modality"]
    ds.Manufacturer = "ACME"
    ds.InstitutionName = "General Hospital"
    ds.ReferringPhysicianName = study["ReferringPhysicianName"]
    ds.StudyDescription = study["StudyDescription"]
    ds.SeriesDescription = series["SeriesDescription"]
    if study["procedure"]:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = study["procedure"]
        ds.ProcedureCodeSequence = Sequence([code])
    ds.PatientName = patient["PatientName"]
    ds.PatientID = patient["PatientID"]
    ds.PatientBirthDate = patient["PatientBirthDate"]
    if "PatientBirthTime" in patient:
        ds.PatientBirthTime = patient["PatientBirthTime"]
    ds.PatientSex = patient["PatientSex"]
    ds.OtherPatientIDs = [f"OTHER-{p}", f"ALT-{p}"]
    ds.SliceThickness = "2.5"
    ds.StudyInstanceUID = uid(p, study["key"])
    ds.SeriesInstanceUID = uid(p, study["key"], series["key"])
    ds.StudyID = study["StudyID"]
    ds.SeriesNumber = series["SeriesNumber"]
    ds.InstanceNumber = str(i + 1)
    if series["sop"] == SR:
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
        ds.ConceptNameCodeSequence = Sequence([concept])
    else:
        ds.Rows = ds.Columns = 2
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = b"\x00\x01" * 4
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def datasets() -> list[Dataset]:
    """The three patients' instances (12 in all)."""
    out = []
    for p, patient in enumerate(PATIENTS, 1):
        for study in patient["studies"]:
            for series in study["series"]:
                out.extend(_instance(p, patient, study, series, i) for i in range(series["n"]))
    return out


def charset_datasets() -> list[Dataset]:
    """pydicom's character set examples (each its own patient and study), and a
    Windows-1252 name labelled ISO_IR 100."""
    out = [dcmread(get_charset_files(name)[0]) for name in CHARSET_FILES]
    study = dict(PATIENTS[1]["studies"][0], StudyDate="19990101", AccessionNumber="CP", StudyDescription="MISLABELLED",
                 procedure=None)
    bad = _instance(9, dict(PATIENTS[1], PatientID="CP1252", PatientName="X"), study, study["series"][0], 0)
    bad.SOPInstanceUID = uid(9, 9, 9, 9)
    bad.StudyInstanceUID, bad.SeriesInstanceUID = uid(9, 9), uid(9, 9, 9)
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    bad["PatientName"].value = b"M\x9fller\x93^Jos\xe9"  # Windows-1252 bytes, labelled ISO_IR 100
    out.append(bad)
    return out


def rows(dss: list[Dataset], segment: str = "000-00000001.seg", start: int = 0) -> list[dict]:
    """Catalog rows as the store path makes them (extract() of the encoded data set)."""
    out = []
    for i, ds in enumerate(dss):
        body = encode_dataset(ds)
        row = extract(body, ExplicitVRLittleEndian)
        row.update(transfer_syntax_uid=ExplicitVRLittleEndian, segment=segment, offset=(start + i) * 1000,
                   record_length=1000, dataset_length=len(body), stored_length=len(body), dataset_crc32=i,
                   calling_ae="TEST", called_ae="STOWAGE", received_at=time.time_ns() // 1000 + start + i)
        out.append(row)
    return out


def write(dss: list[Dataset], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in dss:
        p = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def identifier(level: str, charset: str | None = None, **keys) -> Dataset:
    """A C-FIND request identifier: the level, an optional Specific Character Set, the keys."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
