"""Frames of an instance (PS3.18 8.7.3.3.2, Retrieve Frames): as stored (native slices or
encapsulated fragments) or decoded to native little endian where pydicom can."""
from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from stowage.engine.web.transcode import NATIVE, _decodable


class FrameError(ValueError):
    """Frames that cannot be given as asked; `status` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class NoPixelData(FrameError):
    """The instance has no Pixel Data (an SR, a KO, a PR…): nothing to frame or render."""


def read(part10: bytes) -> pydicom.FileDataset:
    try:
        return pydicom.dcmread(BytesIO(part10))
    except Exception as e:
        raise FrameError(500, f"the stored instance cannot be parsed: {e}") from None


def frame_count(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def check(ds: pydicom.Dataset, numbers: list[int]) -> None:
    if "PixelData" not in ds:
        raise NoPixelData(404, "this instance has no Pixel Data (7FE0,0010): no frames")
    n = frame_count(ds)
    wrong = [k for k in numbers if not 1 <= k <= n]
    if wrong:
        raise FrameError(404, f"frame {wrong[0]} does not exist: the instance has {n} frame(s)")


def stored(ds: pydicom.Dataset, numbers: list[int]) -> tuple[str, list[bytes]]:
    """The frames as stored: (their transfer syntax, bytes); native little-endian frames
    are labelled Explicit VR Little Endian (the same pixel bytes)."""
    ts = str(ds.file_meta.TransferSyntaxUID)
    if UID(ts).is_compressed and ts not in NATIVE:
        try:
            frames = list(generate_frames(ds.PixelData, number_of_frames=frame_count(ds)))
        except Exception as e:  # damaged encapsulation: its items cannot be walked
            raise FrameError(500, f"the stored encapsulated Pixel Data cannot be split into frames: {e}") from None
        _held(numbers, len(frames), ds)
        return ts, [frames[k - 1] for k in numbers]
    if ts == ExplicitVRBigEndian or int(ds.get("BitsAllocated", 8)) == 1:
        return ExplicitVRLittleEndian, decoded(ds, numbers)
    size = _frame_bytes(ds)
    data = ds.PixelData
    _held(numbers, len(data) // size if size else 0, ds)
    return ExplicitVRLittleEndian, [bytes(data[(k - 1) * size:k * size]) for k in numbers]


def _frame_bytes(ds: pydicom.Dataset) -> int:
    """One native frame's length: pydicom's count (YBR_FULL_422 holds 2 bytes a pixel for 3
    samples), else rows x columns x samples x bytes."""
    try:
        return get_expected_length(ds, "bytes") // frame_count(ds)
    except (AttributeError, KeyError, TypeError, ValueError):
        return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8


def _held(numbers: list[int], held: int, ds: pydicom.Dataset) -> None:
    """404 for a frame that Number of Frames promises but the stored Pixel Data lacks (a
    frame list past its fragments, pixel data cut short): an IndexError's 500, or an empty
    part, otherwise."""
    missing = [k for k in numbers if k > held]
    if missing:
        raise FrameError(404, f"frame {missing[0]} is not in the stored Pixel Data: it holds {held} frame(s), "
                              f"though Number of Frames says {frame_count(ds)}")


def decodable(ds: pydicom.Dataset) -> bool:
    ts = str(ds.file_meta.TransferSyntaxUID)
    return ts in NATIVE or ts == ExplicitVRBigEndian or _decodable(ts)


def decoded(ds: pydicom.Dataset, numbers: list[int], part10: bytes | None = None) -> list[bytes]:
    """The frames decoded to native little-endian pixel bytes (color as stored: raw)."""
    if part10 is None:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        part10 = buf.getvalue()
    out = []
    for k in numbers:
        try:
            arr = pixel_array(BytesIO(part10), index=k - 1, raw=True)
        except Exception as e:
            raise FrameError(406, f"cannot decode frame {k} ({UID(ds.file_meta.TransferSyntaxUID).name}): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        out.append(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    return out
