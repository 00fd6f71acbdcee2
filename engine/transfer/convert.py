"""Transfer-syntax conversion for sending, used only when the peer accepted none of the
syntaxes an instance is stored in: between uncompressed little-endian syntaxes (deflate
included), and from a compressed syntax to an uncompressed one when pydicom has a
decoder for it (RLE with numpy; JPEG 2000 with pylibjpeg-openjpeg, the `codecs` extra;
JPEG with Pillow, pylibjpeg-libjpeg or gdcm if the operator installs one). Never to a
compressed syntax, so never lossy. Big endian is not converted. A Deflated data set is
inflated here, not by pydicom, so never past `max_inflated_bytes`.
"""
from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from stowage.catalog.limits import LimitExceeded, inflate
from stowage.engine.runtime.config import Config

# What we may convert to, best first.
TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_UNCOMPRESSED_SOURCES = frozenset({*TARGETS, DeflatedExplicitVRLittleEndian})


class ConversionError(ValueError):
    """An instance that cannot be converted; the message says why."""


def name(uid: str) -> str:
    n = UID(uid).name
    return n if n and n != uid else uid


def convertible(source: str) -> bool:
    """Whether we would try to convert from `source` at all."""
    return source in _UNCOMPRESSED_SOURCES or (UID(source).is_compressed and source != DeflatedExplicitVRLittleEndian)


def target_syntax(source: str, accepted: set[str]) -> str | None:
    """The syntax to convert an instance stored in `source` to, among `accepted`."""
    if not convertible(source):
        return None
    return next((ts for ts in TARGETS if ts in accepted and ts != source), None)


def _read(src: Path, max_inflated_bytes: int) -> FileDataset:
    """`src` read by pydicom; a deflated data set inflated within `max_inflated_bytes`
    (pydicom's dcmread inflates it whole, however large it grows)."""
    with open(src, "rb") as f:
        preamble = read_preamble(f, False)
        meta = _read_file_meta_info(f)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(src)
        data = inflate(f.read(), max_inflated_bytes)
    ds = read_dataset(DicomBytesIO(data), is_implicit_VR=False, is_little_endian=True)
    return FileDataset(str(src), ds, preamble=preamble, file_meta=meta, is_implicit_VR=False,
                       is_little_endian=True)


def convert_file(src: Path, dst: Path, target: str, max_inflated_bytes: int = Config.max_inflated_bytes) -> None:
    """Write `src` (a Part-10 file) as a Part-10 file in `target`, an uncompressed syntax."""
    if target not in TARGETS:
        raise ConversionError(f"will not convert to {name(target)}: only to uncompressed little endian")
    try:
        ds = _read(src, max_inflated_bytes)
    except LimitExceeded as e:
        raise ConversionError(f"cannot convert: {e}") from None
    except Exception as e:  # pydicom raises many kinds on bad input
        raise ConversionError(f"cannot parse the stored dataset for conversion: {e}") from None
    source = str(ds.file_meta.TransferSyntaxUID)
    uid = ds.get("SOPInstanceUID", "?")
    if not convertible(source):
        raise ConversionError(f"{uid}: no conversion from {name(source)}")
    if UID(source).is_compressed and source != DeflatedExplicitVRLittleEndian:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as e:  # missing plugin, corrupt stream, unsupported bit depth
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConversionError(f"{uid}: cannot decompress {name(source)}: {first}") from None
    ds.file_meta.TransferSyntaxUID = UID(target)
    try:
        ds.save_as(dst, enforce_file_format=True)
    except Exception as e:
        raise ConversionError(f"{uid}: cannot encode as {name(target)}: {e}") from None
