"""A deterministic archive for query benchmarks, in two forms that hold the same values:
catalog rows (sealed straight into a catalog: 10^6 instances in minutes) and Part-10
files (for the realistic path: C-STORE into stowage and Orthanc).

Shape: `patients` patients, 2 studies each, 4 series per study, 25 instances per series
(10^6 instances = 5,000 patients). Names are upper-case surnames drawn from a fixed list
(about 2 % start with "SM"), study dates spread over ten years (2015-2024), modalities
CT, MR, CR, US by series.
"""
from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from stowage.catalog.attributes import encode_dataset

STUDIES_PER_PATIENT, SERIES_PER_STUDY, INSTANCES_PER_SERIES = 2, 4, 25
PER_PATIENT = STUDIES_PER_PATIENT * SERIES_PER_STUDY * INSTANCES_PER_SERIES
SURNAMES = ("SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ", "MARTINEZ",
            "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR", "MOORE", "JACKSON", "MARTIN",
            "LEE", "PEREZ", "THOMPSON", "WHITE", "HARRIS", "SANCHEZ", "CLARK", "RAMIREZ", "LEWIS", "ROBINSON",
            "WALKER", "YOUNG", "ALLEN", "KING", "WRIGHT", "SCOTT", "TORRES", "NGUYEN", "HILL", "FLORES",
            "GREEN", "ADAMS", "NELSON", "BAKER", "HALL", "RIVERA", "CAMPBELL", "MITCHELL", "CARTER", "ROBERTS",
            "MUELLER", "SCHMIDT", "SCHNEIDER", "FISCHER", "WEBER", "MEYER", "WAGNER", "BECKER", "SCHULZ", "HOFFMANN",
            "ROSSI", "RUSSO", "FERRARI", "ESPOSITO", "BIANCHI", "ROMANO", "COLOMBO", "RICCI", "MARINO", "GRECO",
            "DUBOIS", "DURAND", "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFEBVRE", "MICHEL", "DAVID", "BERTRAND",
            "KOWALSKI", "NOWAK", "WISNIEWSKI", "TANAKA", "SUZUKI", "SATO", "WATANABE", "KIM", "PARK", "CHOI",
            "SILVA", "SANTOS", "OLIVEIRA", "SOUZA", "NOVAK", "OLSEN", "HANSEN", "JENSEN", "NIELSEN", "SMALL")
GIVEN = ("ANNA", "BEN", "CHIARA", "DAVID", "EVA", "FARID", "GRACE", "HUGO", "INES", "JONAS", "KAI", "LENA")
MODALITIES = ("CT", "MR", "CR", "US")
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
             "CR": "1.2.840.10008.5.1.4.1.1.1", "US": "1.2.840.10008.5.1.4.1.1.6.1"}
_NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:stowage-bench:query")


def uid(*parts: object) -> str:
    return f"2.25.{uuid.uuid5(_NS, '|'.join(map(str, parts))).int}"


def _mix(*parts: int) -> int:
    """A cheap deterministic hash of small integers."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass(frozen=True)
class Series:
    patient: int
    study: int
    series: int
    attrs: dict  # every attribute of the series' instances but the instance ones

    @property
    def instances(self) -> range:
        return range(INSTANCES_PER_SERIES)


def patient_attrs(p: int) -> dict:
    h = _mix(p)
    return {"PatientID": f"PID{p:07d}", "PatientName": f"{SURNAMES[h % len(SURNAMES)]}^{GIVEN[(h >> 8) % len(GIVEN)]}",
            "PatientBirthDate": (dt.date(1930, 1, 1) + dt.timedelta(days=int(h >> 16) % 30000)).strftime("%Y%m%d"),
            "PatientSex": "FM"[(h >> 40) & 1], "IssuerOfPatientID": "BENCH"}


def study_date(p: int, s: int) -> str:
    return (dt.date(2015, 1, 1) + dt.timedelta(days=_mix(p, s, 7) % 3650)).strftime("%Y%m%d")


def series_list(patients: int) -> Iterator[Series]:
    for p in range(patients):
        pa = patient_attrs(p)
        for s in range(STUDIES_PER_PATIENT):
            h = _mix(p, s)
            study = {**pa, "StudyInstanceUID": uid("study", p, s), "StudyDate": study_date(p, s),
                     "StudyTime": f"{7 + h % 11:02d}{(h >> 8) % 60:02d}{(h >> 16) % 60:02d}",
                     "AccessionNumber": f"A{p:07d}{s}", "StudyID": str(s + 1),
                     "ReferringPhysicianName": "REFERRER^RITA", "StudyDescription": "BENCH STUDY"}
            for r in range(SERIES_PER_STUDY):
                modality = MODALITIES[(h >> (4 * r)) % len(MODALITIES)] if r else MODALITIES[h % 2]
                yield Series(p, s, r, {**study, "SeriesInstanceUID": uid("series", p, s, r), "Modality": modality,
                                       "SeriesNumber": str(r + 1), "SeriesDescription": f"{modality} SERIES {r + 1}",
                                       "SeriesDate": study["StudyDate"], "BodyPartExamined": "CHEST",
                                       "SOPClassUID": SOP_CLASS[modality], "Manufacturer": "STOWAGE-BENCH",
                                       "InstitutionName": "BENCH HOSPITAL", "StationName": f"STATION{r}",
                                       "SliceThickness": "1.25"})


def dataset(series: Series, i: int, pixels: bool = True) -> Dataset:
    """One instance as a pydicom data set (file meta included)."""
    a = series.attrs
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    for keyword in ("SOPClassUID",):
        setattr(ds, keyword, a[keyword])
    ds.SOPInstanceUID = uid("instance", series.patient, series.study, series.series, i)
    ds.StudyDate, ds.SeriesDate, ds.ContentDate = a["StudyDate"], a["SeriesDate"], a["StudyDate"]
    ds.StudyTime, ds.ContentTime = a["StudyTime"], a["StudyTime"]
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = a["AccessionNumber"], a["Modality"], a["Manufacturer"]
    ds.InstitutionName, ds.ReferringPhysicianName, ds.StationName = a["InstitutionName"], a["ReferringPhysicianName"], a["StationName"]
    ds.StudyDescription, ds.SeriesDescription = a["StudyDescription"], a["SeriesDescription"]
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = a["PatientName"], a["PatientID"], a["IssuerOfPatientID"]
    ds.PatientBirthDate, ds.PatientSex = a["PatientBirthDate"], a["PatientSex"]
    ds.BodyPartExamined, ds.SliceThickness = a["BodyPartExamined"], a["SliceThickness"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = a["StudyInstanceUID"], a["SeriesInstanceUID"]
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = a["StudyID"], a["SeriesNumber"], str(i + 1)
    ds.FrameOfReferenceUID = uid("for", series.patient, series.study)
    ds.ImagePositionPatient = [-100, -100, i * 1.25]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels:
        ds.PixelData = bytes(128)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


_COLUMNS = {"patient_id": "PatientID", "patient_name": "PatientName", "patient_birth_date": "PatientBirthDate",
            "patient_sex": "PatientSex", "issuer_of_patient_id": "IssuerOfPatientID",
            "study_instance_uid": "StudyInstanceUID", "study_date": "StudyDate", "study_time": "StudyTime",
            "accession_number": "AccessionNumber", "study_id": "StudyID",
            "referring_physician_name": "ReferringPhysicianName", "study_description": "StudyDescription",
            "series_instance_uid": "SeriesInstanceUID", "modality": "Modality", "series_number": "SeriesNumber",
            "series_description": "SeriesDescription", "series_date": "SeriesDate",
            "body_part_examined": "BodyPartExamined", "sop_class_uid": "SOPClassUID"}


def rows(patients: int, first: int = 0) -> Iterator[dict]:
    """Catalog rows of patients [first, patients), as the store path writes them (the
    header comes from one encoding per series, with each instance's own elements)."""
    offset = 0
    now = time.time_ns() // 1000
    for series in series_list(patients):
        if series.patient < first:
            continue
        template = encode_dataset(dataset(series, 0, pixels=False))
        sop0 = dataset(series, 0, pixels=False).SOPInstanceUID
        base = {col: series.attrs[kw] for col, kw in _COLUMNS.items()}
        base.update(content_date=series.attrs["StudyDate"], content_time=series.attrs["StudyTime"],
                    specific_character_set="ISO_IR 100", transfer_syntax_uid=ExplicitVRLittleEndian,
                    segment=f"{series.patient % 2:03d}-{series.patient // 1000 + 1:08d}.seg", calling_ae="BENCH",
                    called_ae="STOWAGE", record_length=1500, dataset_length=1400, stored_length=900)
        for i in series.instances:
            sop = uid("instance", series.patient, series.study, series.series, i)
            # same length UIDs are not guaranteed: rebuild the UID element, keep the rest as encoded
            header = template.replace(_ui(sop0), _ui(sop), 1)
            row = dict(base, sop_instance_uid=sop, instance_number=str(i + 1), header=header,
                       offset=offset, dataset_crc32=i, received_at=now + offset)
            offset += 1500
            yield row


def _ui(value: str) -> bytes:
    raw = value.encode() + (b"\0" if len(value) % 2 else b"")
    return b"\x08\x00\x18\x00UI" + len(raw).to_bytes(2, "little") + raw


def write_files(patients: int, out: Path) -> list[Path]:
    """Part-10 files of every instance of `patients` patients (8x8 pixels: queries do not
    care about pixel size)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for series in series_list(patients):
        for i in series.instances:
            ds = dataset(series, i)
            p = out / f"{series.patient:07d}-{series.study}-{series.series}-{i:03d}.dcm"
            if not p.exists():
                ds.save_as(p, enforce_file_format=True)
            paths.append(p)
    return paths
