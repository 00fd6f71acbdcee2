"""A PS3.10 File-set for `stowage export --dicomdir`: file IDs, and the DICOMDIR.

pydicom's FileSet re-encodes every instance it adds (and looks each one up in a list,
quadratic in the File-set's size), so the files are written by engine.transfer.export with the
bytes as received, and the DICOMDIR is built here: its directory records come from
pydicom's own recorders (pydicom.fileset.DIRECTORY_RECORDERS, and its choice of record
type per SOP Class), read from the headers of the files as written; this module lays
the records out and computes their offsets. A DICOMDIR already in the folder is read
first: the instances it lists keep their file IDs and stay listed, so re-running an
export, or exporting more into the same folder, neither duplicates a file nor drops one.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import DIRECTORY_RECORDERS, _four_level_record_type, _single_level_record_type
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from stowage.catalog.attributes import encode_dataset
from stowage.engine.transfer.export_files import open_new
from stowage.engine.transfer.export_names import suffix
from stowage.engine.store.filemeta import PREAMBLE
from stowage.protocol.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

DICOMDIR = "DICOMDIR"
FILE_SET_ID = "STOWAGE"
_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")
# Placeholders for Type 1 record keys (PS3.3 F.5) that an instance leaves empty; the
# instance's own file is never changed (docs/export.md).
PLACEHOLDERS = {"StudyDate": "19000101", "StudyTime": "000000", "Modality": "OT",
                "SeriesNumber": "0", "InstanceNumber": "0"}


@contextmanager
def _quiet():
    """Values that break their VR's rules are the sender's, carried into the records as
    they are: pydicom's warnings about them would be noise on the export's terminal."""
    saved = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = saved


class FileSetError(Exception):
    """The folder holds a DICOMDIR that cannot be read."""


def component(prefix: str, *key: str | None) -> str:
    """A PS3.10 file ID component: `prefix` and 7 base-36 characters standing for `key`."""
    n = int(hashlib.sha1("\x00".join(k or "" for k in key).encode("utf-8", "surrogatepass")).hexdigest(), 16)
    chars = []
    for _ in range(7):
        n, r = divmod(n, 36)
        chars.append(_BASE36[r])
    return prefix + "".join(chars)


def _read_existing(out: Path) -> tuple[str, dict[str, tuple[str, ...]]]:
    """(File-set UID, SOP Instance UID -> file ID) of the DICOMDIR in `out`, if any."""
    path = out / DICOMDIR
    if not path.exists():
        return generate_uid(), {}
    try:
        ds = pydicom.dcmread(path)
        uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
        known: dict[str, tuple[str, ...]] = {}
        for record in ds.get("DirectoryRecordSequence", []):
            fid, sop = record.get("ReferencedFileID"), record.get("ReferencedSOPInstanceUIDInFile")
            if not fid or not sop:
                continue
            parts = (fid,) if isinstance(fid, str) else tuple(fid)
            if len(parts) <= 8 and all(_COMPONENT.fullmatch(p) for p in parts):  # nothing else names a path
                known.setdefault(str(sop), parts)
        return uid, known
    except Exception as e:  # pydicom raises many kinds on a damaged file
        raise FileSetError(f"{path} cannot be read as a DICOMDIR ({e}); move it away or export to "
                           "another folder") from None


@dataclass
class _Node:
    record: Dataset
    order: tuple
    children: dict[str, "_Node"] = field(default_factory=dict)


class FileSet:
    """The File-set in one folder: where each instance goes, then its DICOMDIR."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.uid, self.files = _read_existing(out)
        self._owner = {fid: sop for sop, fid in self.files.items()}

    def path(self, patient: tuple[str, ...], study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The file for an instance: the one the DICOMDIR already lists, else a new file ID
        PATIENT/STUDY/SERIES/INSTANCE, each component a hash of its key (a file name that
        another instance holds gets the next hash)."""
        fid = self.files.get(sop_uid)
        if fid is None:
            folders = (component("P", *patient), component("S", study_uid), component("E", series_uid))
            attempt = 0
            while True:
                fid = folders + (component("I", sop_uid, str(attempt) if attempt else None),)
                if self._owner.get(fid, sop_uid) == sop_uid:
                    break
                attempt += 1
            self.files[sop_uid], self._owner[fid] = fid, sop_uid
        return self.out.joinpath(*fid)

    def forget(self, sop_uid: str) -> None:
        """An instance that could not be written is not listed (unless an earlier file is there)."""
        fid = self.files.get(sop_uid)
        if fid is not None and not self.out.joinpath(*fid).exists():
            del self.files[sop_uid]
            self._owner.pop(fid, None)

    def write(self) -> list[str]:
        """Write the DICOMDIR for every listed file that exists; returns the instances that
        could not be listed, and why."""
        roots: dict[str, _Node] = {}
        failed = []
        with _quiet():
            for sop_uid, fid in sorted(self.files.items(), key=lambda kv: kv[1]):
                path = self.out.joinpath(*fid)
                if not path.is_file():
                    continue  # removed since: no longer part of the File-set
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                    _add(roots, ds, fid)
                except Exception as e:  # a header pydicom cannot read, or a record it cannot make
                    failed.append(f"{sop_uid}: written as {'/'.join(fid)} but not listed in the DICOMDIR: {e}")
            data = encode(roots, self.uid)
        tmp = self.out / f".{DICOMDIR}.{os.getpid()}.tmp"
        try:
            with open_new(tmp) as f:
                f.write(data)
            os.replace(tmp, self.out / DICOMDIR)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return failed


def _record(kind: str, ds: Dataset) -> Dataset:
    record = DIRECTORY_RECORDERS[kind](ds)
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = kind
    if "SpecificCharacterSet" in ds:
        record.SpecificCharacterSet = ds.SpecificCharacterSet
    return record


def _fill_type1(ds: Dataset) -> None:
    """Placeholders for the Type 1 keys of the PATIENT/STUDY/SERIES/IMAGE records that the
    instance leaves empty (in this copy of its header only)."""
    study_uid = str(ds.get("StudyInstanceUID", ""))
    if not ds.get("PatientID"):
        ds.PatientID = f"NOID_{suffix(study_uid)}"
    if not ds.get("StudyID"):
        ds.StudyID = str(ds.get("AccessionNumber") or "")[:16] or suffix(study_uid)
    for keyword, value in PLACEHOLDERS.items():
        if keyword not in ds or ds[keyword].VM == 0:
            setattr(ds, keyword, value)


def _add(roots: dict[str, _Node], ds: Dataset, fid: tuple[str, ...]) -> None:
    """Place one instance's records in the tree: PATIENT / STUDY / SERIES / leaf (or one
    single-level record), making a record only for a level not already there."""
    single = _single_level_record_type(ds)
    if single != "PATIENT":
        chain = [(single, f"{single}{ds.SOPInstanceUID}")]
    else:
        _fill_type1(ds)
        chain = [("PATIENT", f"P{ds.PatientID}"), ("STUDY", f"S{ds.get('StudyInstanceUID', '')}"),
                 ("SERIES", f"E{ds.SeriesInstanceUID}"), (_four_level_record_type(ds), f"I{ds.SOPInstanceUID}")]
    level = roots
    for depth, (kind, key) in enumerate(chain):
        node = level.get(key)
        if node is None:
            record = _record(kind, ds)
            if depth == len(chain) - 1:
                record.ReferencedFileID = list(fid)
                record.ReferencedSOPClassUIDInFile = ds.SOPClassUID
                record.ReferencedSOPInstanceUIDInFile = ds.SOPInstanceUID
                record.ReferencedTransferSyntaxUIDInFile = ds.file_meta.TransferSyntaxUID
            node = level[key] = _Node(record, _order(record))
        level = node.children


def _int(value: object) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        return 0


def _order(record: Dataset) -> tuple:
    """Where a record sorts among its siblings."""
    kind = record.DirectoryRecordType
    if kind == "PATIENT":
        return (str(record.PatientID),)
    if kind == "STUDY":
        return (str(record.StudyDate), str(record.StudyTime), str(record.get("StudyInstanceUID", "")))
    if kind == "SERIES":
        return (_int(record.SeriesNumber), str(record.SeriesInstanceUID))
    return (_int(record.get("InstanceNumber", 0)), str(record.ReferencedSOPInstanceUIDInFile))


def _ordered(nodes: dict[str, _Node]) -> list[_Node]:
    return sorted(nodes.values(), key=lambda n: n.order)


def _preorder(nodes: dict[str, _Node]) -> list[_Node]:
    out = []
    for node in _ordered(nodes):
        out.append(node)
        out.extend(_preorder(node.children))
    return out


def _file_meta(uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _top(first: int, last: int) -> Dataset:
    ds = Dataset()
    ds.FileSetID = FILE_SET_ID
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = first
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = last
    ds.FileSetConsistencyFlag = 0
    return ds


def encode(roots: dict[str, _Node], uid: str) -> bytes:
    """The DICOMDIR file: Explicit VR Little Endian, records in pre-order, each item of
    defined length; offsets count from the first byte of the file (PS3.3 F.3.2.2)."""
    nodes = _preorder(roots)
    head = PREAMBLE + _file_meta(uid)
    start = len(head) + len(encode_dataset(_top(0, 0))) + 12  # + the sequence's tag, VR and length
    lengths = [len(encode_dataset(n.record)) for n in nodes]
    offsets, at = {}, start
    for node, n in zip(nodes, lengths):
        offsets[id(node)] = at
        at += 8 + n

    def link(level: dict[str, _Node]) -> None:
        ordered = _ordered(level)
        for i, node in enumerate(ordered):
            node.record.OffsetOfTheNextDirectoryRecord = offsets[id(ordered[i + 1])] if i + 1 < len(ordered) else 0
            kids = _ordered(node.children)
            node.record.OffsetOfReferencedLowerLevelDirectoryEntity = offsets[id(kids[0])] if kids else 0
            link(node.children)
    link(roots)
    top = _ordered(roots)
    items = []
    for node, n in zip(nodes, lengths):
        body = encode_dataset(node.record)
        assert len(body) == n, "a record's length changed with its offsets"
        items.append(struct.pack("<HHI", 0xFFFE, 0xE000, n) + body)
    sequence = b"".join(items)
    first, last = (offsets[id(top[0])], offsets[id(top[-1])]) if top else (0, 0)
    return (head + encode_dataset(_top(first, last))
            + struct.pack("<HH2sHI", 0x0004, 0x1220, b"SQ", 0, len(sequence)) + sequence)
