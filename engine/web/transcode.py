"""Transfer-syntax conversion on the way out (WADO-RS), in memory, where pydicom can: to
and from the uncompressed little-endian syntaxes (deflate included), from a compressed
syntax whose decoder is installed, to a lossless compressed syntax whose encoder is
installed (RLE Lossless; JPEG 2000 Lossless with pylibjpeg-openjpeg). Never to a lossy
syntax, never from big endian. The stored bytes are never changed."""
from __future__ import annotations

from io import BytesIO

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from stowage.catalog.limits import inflate
from stowage.engine.runtime.config import Config

NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
MAX_BYTES = 512 << 20  # larger instances are served as stored only (conversion holds them in memory)


class TranscodeError(ValueError):
    """The instance cannot be given in the syntax asked for; the message says why."""


def _decodable(source: str) -> bool:
    try:
        return get_decoder(source).is_available
    except (NotImplementedError, ValueError):
        return False


def _encodable(target: str) -> bool:
    if not UID(target).is_compressed or UID(target) == DeflatedExplicitVRLittleEndian:
        return False
    try:
        return get_encoder(target).is_available and UID(target).is_transfer_syntax and _lossless(target)
    except (NotImplementedError, ValueError):
        return False


def _lossless(uid: str) -> bool:
    return "Lossless" in UID(uid).name or "lossless" in UID(uid).name.lower()


def possible(source: str, target: str) -> bool:
    """Whether an instance stored in `source` can be given in `target`."""
    if source == target:
        return True
    if source == ExplicitVRBigEndian or target == ExplicitVRBigEndian:
        return False
    readable = source in NATIVE or (UID(source).is_compressed and _decodable(source))
    if target in NATIVE:
        return readable
    return readable and _encodable(target)


def transcode(part10: bytes, target: str, config: Config) -> bytes:
    """`part10` (a Part-10 file) as a Part-10 file in `target`; raises TranscodeError."""
    try:
        ds = _read(part10, config.max_inflated_bytes)
        source = str(ds.file_meta.TransferSyntaxUID)
        if source == target:
            return part10
        if UID(source).is_compressed and source != DeflatedExplicitVRLittleEndian and "PixelData" in ds:
            ds.decompress(generate_instance_uid=False)
        if target in NATIVE:
            ds.file_meta.TransferSyntaxUID = UID(target)
        else:
            ds.compress(target, generate_instance_uid=False)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()
    except TranscodeError:
        raise
    except Exception as e:  # pydicom raises many kinds on data it cannot convert
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TranscodeError(f"cannot convert to {UID(target).name}: {first}") from None


def _read(part10: bytes, max_inflated: int) -> pydicom.FileDataset:
    """pydicom's reading of `part10`; a Deflated data set inflated within `max_inflated`
    bytes (pydicom would inflate it whole, however large it grows)."""
    f = DicomBytesIO(part10)
    preamble = read_preamble(f, False)
    meta = _read_file_meta_info(f)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(BytesIO(part10))
    data = inflate(part10[f.tell():], max_inflated)
    ds = read_dataset(DicomBytesIO(data), is_implicit_VR=False, is_little_endian=True)
    return pydicom.FileDataset("", ds, preamble=preamble, file_meta=meta, is_implicit_VR=False,
                               is_little_endian=True)
