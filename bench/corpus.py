"""Deterministic synthetic DICOM corpora for benchmarks.

``generate(out_dir, kind, count)`` writes ``count`` valid Part-10 files named
``000000.dcm``, ``000001.dcm``, ... spread over ``patients × studies_per_patient ×
series_per_study`` series in contiguous blocks (sizes differ by at most one; if
``count`` is smaller than the number of series, the trailing ones are absent).
Everything — UIDs, names, dates, pixels, text — derives from ``seed`` and the shape, so
the same arguments always give byte-identical files.

Kinds (size in Explicit VR Little Endian):

- ``sr``: Basic Text SR, a report of a few paragraphs, no pixels, ~5 KB;
- ``small``: 64×64 12-in-16-bit MR, ~10 KB;
- ``mr``: 256×256 12-in-16-bit MR, ~130 KB;
- ``ct``: 512×512 12-in-16-bit CT, ~520 KB;
- ``cr``: 2140×1760 12-in-16-bit CR, ~7.5 MB;
- ``us``: multi-frame 480×640 RGB ultrasound clip, 0.92 MB per frame, ``frames``
  of them (default 10: ~9 MB; 300 frames: ~276 MB).

Pixels are phantoms with smooth gradients plus seeded noise, so they compress roughly
like real images. Transfer syntaxes (``SYNTAXES``): Explicit and Implicit VR Little
Endian, Deflated Explicit VR Little Endian, RLE Lossless (pydicom's own encoder) and
JPEG 2000 Lossless (needs the ``codecs`` extra: pylibjpeg-openjpeg). ``sr`` has no
pixel data, so only the uncompressed and deflated syntaxes apply to it.

CLI: ``python -m stowage.bench.corpus --kind small --count 1000 --out DIR [--syntax rle]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
)

__all__ = ["KINDS", "SYNTAXES", "Kind", "generate", "series_layout", "syntax_uid", "main"]

_FAMILY = ("Smith", "Garcia", "Muller", "Rossi", "Kowalski", "Tanaka", "Nguyen", "Silva", "Novak", "Olsen")
_GIVEN = ("Anna", "Ben", "Chiara", "David", "Eva", "Farid", "Grace", "Hugo", "Ines", "Jonas")


@dataclass(frozen=True)
class Kind:
    """Static description of one corpus kind."""

    modality: str
    sop_class: UID
    size: int  # rows (== columns unless ``columns`` is set); 0 for no pixel data
    body_part: str
    study_description: str
    slice_thickness: float
    pixel_spacing: float
    columns: int = 0
    samples: int = 1        # 3 for RGB
    frames: int = 0         # default number of frames of a multi-frame kind (0: single frame)

    @property
    def cols(self) -> int:
        return self.columns or self.size


KINDS: dict[str, Kind] = {
    "sr": Kind("SR", BasicTextSRStorage, 0, "CHEST", "CT CHEST WO CONTRAST", 0, 0),
    "small": Kind("MR", MRImageStorage, 64, "BRAIN", "MR BRAIN WO CONTRAST", 5.0, 3.6),
    "mr": Kind("MR", MRImageStorage, 256, "BRAIN", "MR BRAIN WO CONTRAST", 4.0, 0.9),
    "ct": Kind("CT", CTImageStorage, 512, "CHEST", "CT CHEST WO CONTRAST", 1.25, 0.7),
    "cr": Kind("CR", ComputedRadiographyImageStorage, 2140, "CHEST", "XR CHEST PA", 0, 0.2, columns=1760),
    "us": Kind("US", UltrasoundMultiFrameImageStorage, 480, "ABDOMEN", "US ABDOMEN COMPLETE", 0, 0,
               columns=640, samples=3, frames=10),
}

SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
}


def syntax_uid(name_or_uid: str) -> UID:
    """A transfer syntax UID from a short name of ``SYNTAXES`` or a UID."""
    if name_or_uid in SYNTAXES:
        return SYNTAXES[name_or_uid]
    uid = UID(name_or_uid)
    if not uid.is_transfer_syntax:
        raise ValueError(f"unknown transfer syntax {name_or_uid!r}; use a UID or one of {', '.join(SYNTAXES)}")
    return uid


def series_layout(count: int, n_series: int) -> list[range]:
    """Instance index ranges of each series: contiguous blocks of near-equal size."""
    bounds = [s * count // n_series for s in range(n_series + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(n_series)]


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:stowage-bench:corpus")


def _uid(*parts: object) -> UID:
    """A ``2.25.`` UID from a name-based (v5) UUID of ``parts``.

    Not ``generate_uid(prefix=None, entropy_srcs=...)``: with ``prefix=None`` pydicom
    ignores ``entropy_srcs`` and returns a random UUID; it also joins the sources
    without a separator, so ("1", "23") and ("12", "3") would collide.
    """
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(str, parts))).int}")


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (-1..1) coordinates, cached per size."""
    if n not in _GRIDS:
        ax = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        _GRIDS[n] = (ax[None, :], ax[:, None])
    return _GRIDS[n]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _grid2(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (-1..1) coordinates of a rows×cols image."""
    return (np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, :],
            np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None])


def _cr_pixels(rows: int, cols: int, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 12-bit chest radiograph phantom: dark lungs in a bright body, ribs, noise."""
    x, y = _grid2(rows, cols)
    img = np.full((rows, cols), 3600.0, dtype=np.float32)  # direct exposure
    body = _ellipse(x, y, 0, 0.05, 0.9, 1.1)
    img[body] = np.broadcast_to(2200.0 + 300.0 * p[0] * y, (rows, cols))[body]
    for sx in (-0.42, 0.42):
        lung = _ellipse(x, y, sx + 0.03 * p[3], -0.05, 0.33, 0.7)
        img[lung] = 900.0 + 150.0 * p[1]
    ribs = (np.sin((y + 0.03 * p[0]) * 40.0) > 0.6) & (np.abs(x) > 0.1)
    img[ribs & (img < 2000)] += 400.0
    img[:, np.abs(x[0]) < 0.08] = 2800.0  # mediastinum
    noise = rng.integers(-20, 21, (rows, cols), dtype=np.int16)
    return np.clip(img + noise, 0, 4095).astype("<u2")


def _us_pixels(rows: int, cols: int, frames: int, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An RGB ultrasound clip: a speckled sector whose depth gradient drifts per frame."""
    x, y = _grid2(rows, cols)
    r = np.sqrt(x * x + (y + 1.0) ** 2)
    angle = np.arctan2(x, y + 1.0)
    sector = (np.abs(angle) < 0.75) & (r < 1.9) & (r > 0.1)
    out = np.zeros((frames, rows, cols, 3), dtype=np.uint8)
    for f in range(frames):
        phase = f / max(1, frames)
        tissue = 90.0 + 50.0 * np.sin(r * (6.0 + p[0]) + 6.28 * phase) + 30.0 * p[1]
        lesion = _ellipse(x, y, 0.2 * p[3], 0.1 + 0.1 * np.sin(6.28 * phase), 0.15, 0.1)
        speckle = rng.rayleigh(18.0, (rows, cols)).astype(np.float32)
        img = np.where(sector, tissue + speckle, 0.0)
        img[lesion & sector] *= 0.35
        gray = np.clip(img, 0, 255).astype(np.uint8)
        out[f] = gray[:, :, None]
        out[f, 8:28, 8:200, 0] = 220  # a coloured annotation bar, as scanners burn in
    return out


def _pixels(kind: str, n: int, z: float, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 12-bit slice: phantom shape from series params ``p``, position ``z`` in [-1, 1]."""
    x, y = _grid(n)
    shrink = float(np.sqrt(max(0.05, 1.0 - 0.8 * z * z)))
    grad = (x * p[0] + y * p[1]) * p[2]
    noise = rng.integers(-7, 8, (n, n), dtype=np.int16) + rng.integers(-7, 8, (n, n), dtype=np.int16)
    if kind == "ct":  # stored = HU + 1024
        img = np.full((n, n), 24.0, dtype=np.float32)  # air
        body = _ellipse(x, y, 0, 0.05, 0.85, 0.62)
        img[body] = (1064.0 + grad)[body]
        for sx in (-0.4, 0.4):  # lungs
            lung = _ellipse(x, y, sx + p[3] * 0.05, 0.0, 0.3 * shrink, 0.42 * shrink)
            img[lung] = (170.0 + 0.3 * grad)[lung]
        img[_ellipse(x, y, 0, 0.45, 0.09, 0.09)] = 1724.0 + 60.0 * z  # spine
        out = img + noise
    else:
        img = np.zeros((n, n), dtype=np.float32)
        head = _ellipse(x, y, p[3] * 0.05, 0, 0.7 * shrink, 0.85 * shrink)
        img[head] = (700.0 + grad)[head]
        img[_ellipse(x, y, 0, 0, 0.18 * shrink, 0.3 * shrink)] = 1400.0  # ventricles
        out = img + np.abs(noise)
    return np.clip(out, 0, 4095).astype("<u2")


def _series_dataset(k: Kind, seed: int, pat: int, study: int, series: int, tag: tuple) -> Dataset:
    """Patient/study/series level attributes, deterministic from seed and indices."""
    prng = np.random.default_rng([seed, 1, pat])
    srng = np.random.default_rng([seed, 2, pat, study])
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = k.sop_class
    ds.Modality = k.modality
    ds.Manufacturer = "stowage-bench"
    ds.InstitutionName = "Bench Hospital"
    ds.PatientName = f"{_FAMILY[prng.integers(10)]}^{_GIVEN[prng.integers(10)]}^P{pat:05d}"
    ds.PatientID = f"BENCH-{seed}-{pat:05d}"
    ds.IssuerOfPatientID = "STOWAGE-BENCH"
    born = dt.date(1940, 1, 1) + dt.timedelta(days=int(prng.integers(0, 365 * 60)))
    ds.PatientBirthDate = born.strftime("%Y%m%d")
    ds.PatientSex = "FM"[int(prng.integers(2))]
    day = dt.date(2015, 1, 1) + dt.timedelta(days=int(srng.integers(0, 3650)))
    start = int(srng.integers(7 * 3600, 18 * 3600))
    ds.StudyInstanceUID = _uid(*tag, "study", pat, study)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = day.strftime("%Y%m%d")
    ds.StudyTime = _hhmmss(start)
    ds.AccessionNumber = f"B{seed % 1000:03d}{pat:05d}{study:03d}"
    ds.StudyID = str(study + 1)
    ds.ReferringPhysicianName = "Referrer^Rita^^Dr"
    ds.StudyDescription = k.study_description
    ds.SeriesInstanceUID = _uid(*tag, "series", pat, study, series)
    ds.SeriesNumber = series + 1
    ds.SeriesTime = _hhmmss(start + 300 * series)
    ds.SeriesDescription = f"{k.body_part.title()} axial {series + 1}"
    ds.BodyPartExamined = k.body_part
    if k.modality == "SR":
        return _sr_series(ds, k, tag, pat, study)
    if k.modality in ("CT", "MR"):
        ds.FrameOfReferenceUID = _uid(*tag, "for", pat, study)
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [k.pixel_spacing, k.pixel_spacing]
        ds.SliceThickness = k.slice_thickness
    ds.SamplesPerPixel = k.samples
    ds.Rows, ds.Columns = k.size, k.cols
    if k.samples == 3:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.TransducerType = "CURVED LINEAR"
        return ds
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if k.modality == "CR":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImagerPixelSpacing = [k.pixel_spacing, k.pixel_spacing]
        ds.ViewPosition = "PA"
        ds.PatientOrientation = ["L", "F"]
        ds.KVP = 110
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    elif k.modality == "CT":
        ds.KVP = 120
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 500, 15, 1
        ds.MagneticFieldStrength = 1.5
        ds.WindowCenter, ds.WindowWidth = 700, 1400
    return ds


_SENTENCES = (
    "The lungs are clear without focal consolidation.",
    "No pleural effusion or pneumothorax is seen.",
    "Heart size is within normal limits.",
    "Mediastinal contours are unremarkable.",
    "There is a small calcified granuloma in the right upper lobe, unchanged.",
    "No suspicious pulmonary nodule is identified.",
    "Degenerative changes of the thoracic spine are noted.",
    "The visualised upper abdomen is unremarkable.",
    "Comparison is made with the prior examination.",
    "Findings were discussed with the referring physician.",
)
_SECTIONS = ("History", "Technique", "Comparison", "Findings", "Impression", "Recommendation")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _sr_series(ds: Dataset, k: Kind, tag: tuple, pat: int, study: int) -> Dataset:
    """Series-level attributes of a Basic Text SR."""
    del ds.ImageType
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    return ds


def _sr_content(rng: np.random.Generator) -> Sequence:
    """A few paragraphs of report text, one TEXT item per section (~5 KB in all)."""
    items = []
    for i, section in enumerate(_SECTIONS):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code(f"1212{i}-{i}", "99STOWAGE", section)])
        picks = rng.integers(0, len(_SENTENCES), 12)
        item.TextValue = " ".join(_SENTENCES[j] for j in picks)
        items.append(item)
    return Sequence(items)


def _hhmmss(seconds: int) -> str:
    seconds %= 86400
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def generate(
    out_dir: str | Path,
    kind: str,
    count: int,
    *,
    patients: int = 10,
    studies_per_patient: int = 2,
    series_per_study: int = 2,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    frames: int | None = None,
) -> list[Path]:
    """Write ``count`` files of ``kind`` into ``out_dir``; return their paths in order.

    ``transfer_syntax`` is a UID or a short name of ``SYNTAXES``. Little-endian
    uncompressed and deflated syntaxes are written directly; other (compressed) syntaxes
    go through ``Dataset.compress`` and need a pydicom encoder. ``frames`` sets the
    number of frames of a multi-frame kind (``us``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KINDS)}")
    if min(count, patients, studies_per_patient, series_per_study) < 0 or 0 in (
        patients, studies_per_patient, series_per_study
    ):
        raise ValueError("count must be >= 0 and the shape parameters >= 1")
    ts = syntax_uid(transfer_syntax)
    if not ts.is_transfer_syntax or (not ts.is_little_endian and not ts.is_compressed):
        raise ValueError(f"unsupported transfer syntax {ts}")
    k = KINDS[kind]
    if k.size == 0 and ts.is_compressed:
        raise ValueError(f"{kind} has no pixel data to compress; use explicit, implicit or deflate")
    n_frames = k.frames if frames is None else frames
    if not k.frames and frames not in (None, 0, 1):
        raise ValueError(f"{kind} is a single-frame kind; frames applies to: "
                         + ", ".join(n for n, v in KINDS.items() if v.frames))
    if k.frames and n_frames < 1:
        raise ValueError("frames must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("stowage-bench", kind, seed, count, patients, studies_per_patient, series_per_study)
    if k.frames:
        tag += (n_frames,)
    if ts != ExplicitVRLittleEndian:  # the same kind in another syntax is other instances
        tag += (str(ts),)
    n_series = patients * studies_per_patient * series_per_study
    paths: list[Path] = []
    for s, idx in enumerate(series_layout(count, n_series)):
        if not idx:
            continue
        pat, rest = divmod(s, studies_per_patient * series_per_study)
        study, series = divmod(rest, series_per_study)
        ds = _series_dataset(k, seed, pat, study, series, tag)
        rng = np.random.default_rng([seed, 3, zlib.crc32(kind.encode()), s])
        params = rng.uniform([-1, -1, 20, -1], [1, 1, 80, 1]).astype(np.float32)
        t0 = int(ds.SeriesTime[:2]) * 3600 + int(ds.SeriesTime[2:4]) * 60 + int(ds.SeriesTime[4:])
        for j, i in enumerate(idx):
            z = -1.0 + 2.0 * j / max(1, len(idx) - 1)
            if k.modality == "SR":
                ds.ContentSequence = _sr_content(rng)
                arr = None
            elif k.modality == "CR":
                arr = _cr_pixels(k.size, k.cols, params, rng)
            elif k.frames:
                arr = _us_pixels(k.size, k.cols, n_frames, params, rng)
            else:
                arr = _pixels(kind, k.size, z, params, rng)
            paths.append(_write(out / f"{i:06d}.dcm", ds, arr, ts, tag, i, j, t0, k))
    return paths


def _write(path: Path, ds: Dataset, arr: np.ndarray | None, ts: UID, tag: tuple, i: int, j: int, t0: int,
           k: Kind) -> Path:
    """Fill the instance-level attributes of ``ds`` and write it as a Part-10 file."""
    ds.SOPInstanceUID = _uid(*tag, "instance", i)
    ds.InstanceNumber = j + 1
    ds.ContentTime = _hhmmss(t0 + j)
    if k.modality in ("CT", "MR"):
        ds.SliceLocation = round(j * k.slice_thickness, 2)
        ds.ImagePositionPatient = [-100, -100, ds.SliceLocation]
    if arr is not None and arr.ndim == 4:
        ds.NumberOfFrames = arr.shape[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts.is_compressed else ts
    ds.file_meta = meta
    if arr is not None:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW" if arr.dtype.itemsize == 2 else "OB"
        if ts.is_compressed:
            ds.compress(ts, arr)
    ds.save_as(path, enforce_file_format=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=sorted(KINDS), default="small")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--studies-per-patient", type=int, default=2)
    ap.add_argument("--series-per-study", type=int, default=2)
    ap.add_argument("--transfer-syntax", "--syntax", default="explicit",
                    help=f"a UID or one of {', '.join(SYNTAXES)} [explicit]")
    ap.add_argument("--frames", type=int, help="frames per instance of a multi-frame kind (us)")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    paths = generate(a.out, a.kind, a.count, patients=a.patients, studies_per_patient=a.studies_per_patient,
                     series_per_study=a.series_per_study, seed=a.seed, transfer_syntax=a.transfer_syntax,
                     frames=a.frames)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {size / 1e6:.1f} MB, to {a.out} in {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
