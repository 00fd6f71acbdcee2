"""Burned-in annotation: which instances may carry text in their pixels, and blanking
configured regions of them (Clean Pixel Data, PS3.15 E.3.1), as CTP's pixel anonymizer
does: one set of rectangles per device signature (manufacturer, model, rows, columns).

Compressed pixel data is decoded, blanked and re-encoded as RLE Lossless (PS3.5 A.4.2),
which loses nothing of what was decoded; an uncompressed instance stays uncompressed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage

# Modalities and SOP Classes whose devices are known to burn text into the image.
BURNING_MODALITIES = frozenset({"US"})
SECONDARY_CAPTURE_PREFIX = SecondaryCaptureImageStorage  # and the multi-frame ones, .7.1 to .7.4


@dataclass(frozen=True)
class Signature:
    """A device and image size whose annotation sits at known places."""

    manufacturer: str
    model: str
    rows: int
    columns: int
    regions: tuple[tuple[int, int, int, int], ...]  # (x, y, width, height), pixels from top left

    def matches(self, ds: Dataset) -> bool:
        return (str(ds.get("Manufacturer", "")).strip() == self.manufacturer
                and str(ds.get("ManufacturerModelName", "")).strip() == self.model
                and int(ds.get("Rows", 0)) == self.rows and int(ds.get("Columns", 0)) == self.columns)


def is_secondary_capture(sop_class: str) -> bool:
    """Secondary Capture (SECONDARY_CAPTURE_PREFIX) or a multi-frame one (its .1 to .4); not
    the VL classes (.77.1.x: endoscopic, photographic, ophthalmic) that share its digits."""
    sop_class = sop_class.strip()
    return sop_class == SECONDARY_CAPTURE_PREFIX or sop_class.startswith(SECONDARY_CAPTURE_PREFIX + ".")


def burned_in_reason(ds: Dataset) -> str:
    """Why this instance may have text in its pixels ("" if nothing says so)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return ""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "Burned In Annotation (0028,0301) is YES"
    modality = str(ds.get("Modality", "")).upper()
    if modality in BURNING_MODALITIES:
        return f"modality {modality} is known to burn text into its images"
    if is_secondary_capture(str(ds.get("SOPClassUID", ""))):
        return "secondary capture: its pixels may carry any text"
    return ""


def blank(ds: Dataset, signature: Signature) -> None:
    """Set every configured rectangle to 0 in every frame, and say so in the data set."""
    compressed = ds.file_meta.TransferSyntaxUID.is_compressed
    if not compressed:  # the values as stored: YBR stays YBR (pydicom would give RGB)
        ds.pixel_array_options(as_rgb=False)
    arr = ds.pixel_array.copy()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    view = arr if frames > 1 else arr[None, ...]
    for x, y, w, h in signature.regions:
        view[:, y:y + h, x:x + w, ...] = 0
    if compressed:
        if ds.get("PhotometricInterpretation", "").startswith("YBR") and int(ds.get("SamplesPerPixel", 1)) == 3:
            ds.PhotometricInterpretation = "RGB"  # pydicom decoded to RGB
        ds.compress(RLELossless, arr, encoding_plugin="pydicom")
    else:
        ds.PixelData = _as_stored(ds, arr)
    ds.BurnedInAnnotation = "NO"


def _as_stored(ds: Dataset, arr: np.ndarray) -> bytes:
    """`arr` (frames x rows x columns x samples, as pydicom decodes any layout) in the layout
    the data set says its uncompressed pixels have: written as it came, a colour-by-plane
    image (Planar Configuration 1) was read back with its colours scrambled, and a 1-bit one
    took eight times its size with every value but the first frame's garbage."""
    if int(ds.get("BitsAllocated", 8)) == 1:
        return pack_bits(arr.ravel())
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        if ds.get("PhotometricInterpretation", "") == "YBR_FULL_422":
            ds.PhotometricInterpretation = "YBR_FULL"  # pydicom gave every pixel its own Cb and Cr
        if int(ds.get("PlanarConfiguration", 0)) == 1:
            arr = np.moveaxis(arr, -1, -3)  # R plane, G plane, B plane (of each frame)
    return np.ascontiguousarray(arr).tobytes()
