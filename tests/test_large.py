"""A large instance streams through a worker: its memory does not grow with instance
size, and the instance comes back byte-exact."""
from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE, _config

from conftest import HOST, export_all

SC = "1.2.840.10008.5.1.4.1.1.7"


def big_instance(path: Path, rows: int, cols: int) -> str:
    """A Secondary Capture file with rows×cols 16-bit incompressible pixels, written in chunks."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SC, pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BIG1", "Big^Instance", "OT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = SC, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    length = rows * cols * 2
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        left = length
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    return ds.SOPInstanceUID


def sha(path: Path, skip: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_large_instance_memory_is_bounded(make_server, tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    server = make_server("--workers", "1")
    (worker,) = server.workers()
    baseline = worker.memory_info().rss
    src = tmp_path / "big.dcm"
    uid = big_instance(src, 10000, 15000)  # 300 MB of pixel data
    peak, stop = [baseline], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], worker.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    ae = AE("BIGSCU")
    ae.add_requested_context(SC, ["1.2.840.10008.1.2.1"])
    ae.dimse_timeout = ae.network_timeout = 300
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    status = assoc.send_c_store(src)
    assoc.release()
    stop.set()
    sampler.join()
    assert status.Status == 0
    growth_mb = (peak[0] - baseline) / 2**20
    print(f"worker RSS: baseline {baseline / 2**20:.0f} MB, peak {peak[0] / 2**20:.0f} MB")
    assert growth_mb < 150, f"worker RSS grew by {growth_mb:.0f} MB for a 300 MB instance"
    assert not list((server.data_dir / "spool").rglob("*.part")), "spool file left behind"
    out = tmp_path / "out"
    r = export_all(server.data_dir, out, "--instance", uid)
    assert r.returncode == 0, r.stderr
    from conftest import dataset_bytes  # noqa: F401  (the file is too big to compare in memory)
    meta_end_src = _dataset_offset(src)
    meta_end_out = _dataset_offset(out / f"{uid}.dcm")
    assert sha(src, meta_end_src) == sha(out / f"{uid}.dcm", meta_end_out)


def _dataset_offset(path: Path) -> int:
    from pydicom.filereader import _read_file_meta_info, read_preamble
    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.tell()
