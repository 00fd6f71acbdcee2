"""Read-only SQL over the catalog, for `stowage query`: the `records` and `instances` views
of catalog.reader, summary views per patient, study and series, and a function that
reads any attribute from an instance's stored header.

Read-only means: one SELECT (or WITH ... SELECT, VALUES, DESCRIBE, SUMMARIZE) per call,
and DuckDB's file system access limited to the catalog directory for reading, with the
configuration locked, so a query can neither write files nor read any other file.
"""
from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path
from typing import Any

import duckdb
from pydicom.datadict import tag_for_keyword
from pydicom.filereader import read_dataset

from stowage.catalog.attributes import header_is_implicit
from stowage.catalog.reader import Catalog
from stowage.catalog.schema import DICOM_COLUMNS, RECORD_COLUMNS

ALLOWED = {duckdb.StatementType.SELECT}

SUMMARY_VIEWS = {
    "patients": """
        SELECT patient_id, issuer_of_patient_id, max(patient_name) AS patient_name,
               max(patient_birth_date) AS patient_birth_date, max(patient_sex) AS patient_sex,
               count(DISTINCT study_instance_uid) AS studies, count(DISTINCT series_instance_uid) AS series,
               count(*) AS instances, sum(dataset_length) AS bytes,
               min(received_at) AS first_received, max(received_at) AS last_received
        FROM instances GROUP BY patient_id, issuer_of_patient_id""",
    "studies": """
        SELECT study_instance_uid, max(patient_id) AS patient_id, max(patient_name) AS patient_name,
               max(study_date) AS study_date, max(study_time) AS study_time,
               max(accession_number) AS accession_number, max(study_description) AS study_description,
               list_sort(list_distinct(list(modality))) AS modalities,
               count(DISTINCT series_instance_uid) AS series, count(*) AS instances,
               sum(dataset_length) AS bytes, min(received_at) AS first_received, max(received_at) AS last_received
        FROM instances GROUP BY study_instance_uid""",
    "series": """
        SELECT series_instance_uid, max(study_instance_uid) AS study_instance_uid, max(modality) AS modality,
               max(series_number) AS series_number, max(series_description) AS series_description,
               max(body_part_examined) AS body_part_examined, count(*) AS instances,
               sum(dataset_length) AS bytes, min(received_at) AS first_received, max(received_at) AS last_received
        FROM instances GROUP BY series_instance_uid""",
}

# For `stowage query --schema`: what each table is, then what each column holds.
TABLES = {
    "records": "every durable record, duplicates and deleted ones included (one row per C-STORE that was kept)",
    "instances": "one row per SOP Instance UID: the record the duplicates policy serves (never a deleted one)",
    "deleted": "records a tombstone hides (delete, rejection note, quota): reason, deleted_at, actor, comment",
    "tombstones": "the tombstone log: sop_instance_uid, received_at, study_instance_uid, reason, at, actor, comment",
    "patients": "one row per Patient ID and issuer (over instances)",
    "studies": "one row per Study Instance UID (over instances)",
    "series": "one row per Series Instance UID (over instances)",
}
RECORD_DESCRIPTIONS = {
    "transfer_syntax_uid": "transfer syntax the data set was received (and is stored) in",
    "segment": "segment file holding the record, under <data-dir>/segments/",
    "offset": "byte offset of the record in its segment",
    "record_length": "bytes of the whole record on disk",
    "dataset_length": "bytes of the data set as received",
    "stored_length": "bytes of the payload on disk (after zstd)",
    "dataset_crc32": "CRC-32 of the data set as received",
    "calling_ae": "AE title that sent the instance",
    "called_ae": "AE title it was sent to",
    "received_at": "when the record was written (UTC)",
    "header": "top-level non-bulk elements as encoded; read them with dicom_attribute()",
}


def dicom_attribute(header: bytes | None, transfer_syntax_uid: str | None, key: str | None) -> str | None:
    """The value of attribute `key` (a keyword, or a tag as 'GGGGEEEE') in a stored header,
    as text (values joined with backslashes; a sequence as its item count)."""
    if not header or not key:
        return None
    try:
        tag = tag_for_keyword(key) or int(key.strip("()").replace(",", ""), 16)
        ds = read_dataset(BytesIO(header), header_is_implicit(transfer_syntax_uid or ""), True)
        if tag not in ds:
            return None
        value = ds[tag].value
    except Exception:
        return None
    if value is None:
        return None
    if ds[tag].VR == "SQ":
        return str(len(value))
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


class QueryRefused(ValueError):
    """A statement `stowage query` does not run; the message says why."""


class ReadOnlyCatalog(Catalog):
    """A Catalog whose connection runs only read-only statements."""

    REOPEN_RETIRED = None  # one query per process; a new connection would lack the settings locked below

    def __init__(self, directory: Path, duplicates: str = "keep-newest", memory_limit: str = "2GB") -> None:
        directory = directory.resolve()  # DuckDB checks file access against absolute paths
        super().__init__(directory, duplicates)
        con = self._con
        con.execute(f"SET threads = {max(1, os.cpu_count() or 1)}")
        con.execute("SET memory_limit = ?", [memory_limit])
        con.create_function("dicom_attribute", dicom_attribute, ["BLOB", "VARCHAR", "VARCHAR"], "VARCHAR",
                            null_handling="special", side_effects=False)
        con.execute("SET allowed_directories = ?", [[str(directory) + os.sep]])
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET lock_configuration = true")
        self._summaries = False

    def _refresh(self) -> None:
        super()._refresh()
        if not self._summaries:
            for name, sql in SUMMARY_VIEWS.items():
                self._con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")
            self._summaries = True

    def query(self, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
        """Run one read-only statement; QueryRefused for anything else."""
        with self._lock:
            try:
                statements = self._con.extract_statements(sql)
            except duckdb.Error as e:
                raise QueryRefused(str(e).splitlines()[0]) from None
        if len(statements) != 1:
            raise QueryRefused(f"one statement per query, not {len(statements)}")
        kind = statements[0].type
        if kind not in ALLOWED:
            raise QueryRefused(f"only SELECT queries are allowed (this is {kind.name})")
        return self.execute(sql, params or [])


def schema_text() -> str:
    """The tables and columns `stowage query` offers, as text."""
    lines = ["Tables:"]
    lines += [f"  {name:10s} {what}" for name, what in TABLES.items()]
    lines.append("")
    lines.append("Columns of records and instances:")
    for col, keyword in DICOM_COLUMNS:
        lines.append(f"  {col:26s} {keyword} (decoded text; multiple values joined with \\)")
    for col, dtype in RECORD_COLUMNS:
        lines.append(f"  {col:26s} {RECORD_DESCRIPTIONS.get(col, '')} [{dtype}]")
    lines.append(f"  {'header':26s} {RECORD_DESCRIPTIONS['header']} [binary]")
    lines.append("")
    lines.append("Function: dicom_attribute(header, transfer_syntax_uid, 'Keyword' or 'GGGGEEEE') -> text")
    return "\n".join(lines)
