"""The catalog row: which attributes each stored instance contributes, and their types.

The DICOM columns are the unique and required keys of the PS3.4 C.6 query/retrieve
tables plus the most-asked optional ones; `header` holds every other top-level,
non-bulk attribute of the instance, as encoded (see catalog.attributes); the location
columns say where the instance's record lives in the segment store.
"""
from __future__ import annotations

import pyarrow as pa

# (column name, DICOM keyword) for every text attribute the catalog indexes.
# Values are stored decoded (str) with the instance's own Specific Character Set.
DICOM_COLUMNS: tuple[tuple[str, str], ...] = (
    # patient
    ("patient_id", "PatientID"),
    ("patient_name", "PatientName"),
    ("patient_birth_date", "PatientBirthDate"),
    ("patient_sex", "PatientSex"),
    ("issuer_of_patient_id", "IssuerOfPatientID"),
    # study
    ("study_instance_uid", "StudyInstanceUID"),
    ("study_date", "StudyDate"),
    ("study_time", "StudyTime"),
    ("accession_number", "AccessionNumber"),
    ("study_id", "StudyID"),
    ("referring_physician_name", "ReferringPhysicianName"),
    ("study_description", "StudyDescription"),
    # series
    ("series_instance_uid", "SeriesInstanceUID"),
    ("modality", "Modality"),
    ("series_number", "SeriesNumber"),
    ("series_description", "SeriesDescription"),
    ("series_date", "SeriesDate"),
    ("body_part_examined", "BodyPartExamined"),
    # instance
    ("sop_instance_uid", "SOPInstanceUID"),
    ("sop_class_uid", "SOPClassUID"),
    ("instance_number", "InstanceNumber"),
    ("content_date", "ContentDate"),
    ("content_time", "ContentTime"),
    ("specific_character_set", "SpecificCharacterSet"),
)

# Columns describing the stored record, filled by the store, not by the dataset.
RECORD_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("transfer_syntax_uid", pa.string()),
    ("segment", pa.string()),          # segment file name, relative to segments/
    ("offset", pa.int64()),            # byte offset of the record in the segment
    ("record_length", pa.int64()),     # bytes of the whole record on disk
    ("dataset_length", pa.int64()),    # bytes of the dataset as received
    ("stored_length", pa.int64()),     # bytes of the payload on disk (after zstd)
    ("dataset_crc32", pa.int64()),     # CRC-32 of the dataset bytes as received
    ("calling_ae", pa.string()),
    ("called_ae", pa.string()),
    ("received_at", pa.timestamp("us", tz="UTC")),
)

# The top-level, non-bulk elements of the data set as encoded: little endian, implicit
# VR when the transfer syntax is Implicit VR Little Endian, else explicit VR. Null in
# catalogs written before it existed (`stowage rebuild-catalog` fills it in).
HEADER_COLUMN = ("header", pa.binary())

SCHEMA = pa.schema(
    [pa.field(name, pa.string()) for name, _ in DICOM_COLUMNS]
    + [pa.field(name, dtype) for name, dtype in RECORD_COLUMNS]
    + [pa.field(*HEADER_COLUMN)]
)

COLUMN_NAMES: tuple[str, ...] = tuple(SCHEMA.names)
KEYWORD_TO_COLUMN: dict[str, str] = {kw: col for col, kw in DICOM_COLUMNS}
