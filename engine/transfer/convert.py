"""Transfer-syntax conversion for sending, used only when the peer accepted none of the
syntaxes an instance is stored in: between uncompressed little-endian syntaxes (deflate
included), and from a compressed syntax to an uncompressed one when pydicom has a
decoder for it (RLE with numpy; JPEG 2000 with pylibjpeg-openjpeg, the `codecs` extra;
JPEG with Pillow, pylibjpeg-libjpeg or gdcm if the operator installs one). Never to a
compressed syntax, so never lossy. Big endian is not converted.
"""
from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

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


def convert_file(src: Path, dst: Path, target: str) -> None:
    """Write `src` (a Part-10 file) as a Part-10 file in `target`, an uncompressed syntax."""
    if target not in TARGETS:
        raise ConversionError(f"will not convert to {name(target)}: only to uncompressed little endian")
    try:
        ds = pydicom.dcmread(src)
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
