"""Deterministic synthetic DICOM corpora for benchmarks.

``generate(out_dir, kind, count)`` writes ``count`` valid Part-10 files named
``000000.dcm``, ``000001.dcm``, ... spread over ``patients × studies_per_patient ×
series_per_study`` series in contiguous blocks (sizes differ by at most one; if
``count`` is smaller than the number of series, the trailing ones are absent).
Everything — UIDs, names, dates, pixels — derives from ``seed`` and the shape, so
the same arguments always give byte-identical files.

Kinds: ``small`` (64×64 12-in-16-bit MR, ~10 KB) and ``ct`` (512×512 12-in-16-bit
CT, ~520 KB). Pixels are ellipse phantoms with smooth gradients plus seeded noise,
so they compress roughly like real images.

CLI: ``python -m bench.corpus --kind small --count 1000 --out DIR``.
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
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

__all__ = ["KINDS", "Kind", "generate", "series_layout", "main"]

_FAMILY = ("Smith", "Garcia", "Muller", "Rossi", "Kowalski", "Tanaka", "Nguyen", "Silva", "Novak", "Olsen")
_GIVEN = ("Anna", "Ben", "Chiara", "David", "Eva", "Farid", "Grace", "Hugo", "Ines", "Jonas")


@dataclass(frozen=True)
class Kind:
    """Static description of one corpus kind."""

    modality: str
    sop_class: UID
    size: int  # rows == columns
    body_part: str
    study_description: str
    slice_thickness: float
    pixel_spacing: float


KINDS: dict[str, Kind] = {
    "small": Kind("MR", MRImageStorage, 64, "BRAIN", "MR BRAIN WO CONTRAST", 5.0, 3.6),
    "ct": Kind("CT", CTImageStorage, 512, "CHEST", "CT CHEST WO CONTRAST", 1.25, 0.7),
}


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
    ds.FrameOfReferenceUID = _uid(*tag, "for", pat, study)
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [k.pixel_spacing, k.pixel_spacing]
    ds.SliceThickness = k.slice_thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = k.size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if k.modality == "CT":
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
) -> list[Path]:
    """Write ``count`` files of ``kind`` into ``out_dir``; return their paths in order.

    Little-endian uncompressed and deflated syntaxes are written directly; other
    (compressed) syntaxes go through ``Dataset.compress`` and need a pydicom encoder.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KINDS)}")
    if min(count, patients, studies_per_patient, series_per_study) < 0 or 0 in (
        patients, studies_per_patient, series_per_study
    ):
        raise ValueError("count must be >= 0 and the shape parameters >= 1")
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax or (not ts.is_little_endian and not ts.is_compressed):
        raise ValueError(f"unsupported transfer syntax {ts}")
    k = KINDS[kind]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("stowage-bench", kind, seed, count, patients, studies_per_patient, series_per_study)
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
            arr = _pixels(kind, k.size, z, params, rng)
            paths.append(_write(out / f"{i:06d}.dcm", ds, arr, ts, tag, i, j, t0, k))
    return paths


def _write(path: Path, ds: Dataset, arr: np.ndarray, ts: UID, tag: tuple, i: int, j: int, t0: int, k: Kind) -> Path:
    """Fill the instance-level attributes of ``ds`` and write it as a Part-10 file."""
    ds.SOPInstanceUID = _uid(*tag, "instance", i)
    ds.InstanceNumber = j + 1
    ds.ContentTime = _hhmmss(t0 + j)
    ds.SliceLocation = round(j * k.slice_thickness, 2)
    ds.ImagePositionPatient = [-100, -100, ds.SliceLocation]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts.is_compressed else ts
    ds.file_meta = meta
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW"
    if ts.is_compressed:
        ds.compress(ts, arr)
    ds.save_as(path, enforce_file_format=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=sorted(KINDS), default="small")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--studies-per-patient", type=int, default=2)
    ap.add_argument("--series-per-study", type=int, default=2)
    ap.add_argument("--transfer-syntax", default=ExplicitVRLittleEndian)
    a = ap.parse_args(argv)
    t = time.perf_counter()
    paths = generate(a.out, a.kind, a.count, patients=a.patients, studies_per_patient=a.studies_per_patient,
                     series_per_study=a.series_per_study, seed=a.seed, transfer_syntax=a.transfer_syntax)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {size / 1e6:.1f} MB, to {a.out} in {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
