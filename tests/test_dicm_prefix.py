"""Files that start with "DICM" and the file meta group, the 128-byte preamble left out
(issue #20): DCMTK reads them, and so does every place stowage reads a DICOM file a user
gives it, not only `stowage import` (tests/test_damaged_import.py): the folders of
`stowage deidentify` and STOW-RS bodies. What is kept is the data set as sent."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pydicom
import requests
from pydicom.data import get_testdata_file

from conftest import CT, MR, dataset_bytes, free_port
from stowage.bench.harness import damage

REPO = Path(__file__).resolve().parent.parent


def _without_preamble(src: Path, out: Path, uid: str) -> Path:
    """`src` with a new SOP Instance UID, written as "DICM" + file meta + data set."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(out, enforce_file_format=True)
    raw = damage.no_preamble(out.read_bytes(), random.Random(0))
    assert raw[:4] == b"DICM" and raw[4:6] == b"\x02\x00"
    out.write_bytes(raw)
    return out


def test_deidentify_reads_files_without_preamble(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _without_preamble(CT, src / "ct.dcm", "1.2.826.0.1.3680043.8.498.20.1")
    _without_preamble(MR, src / "mr.dcm", "1.2.826.0.1.3680043.8.498.20.2")
    # deflated (the pydicom path, which needs the preamble given back); a secondary capture,
    # so quarantined for what its pixels may show: read, not skipped as "not DICOM"
    _without_preamble(Path(get_testdata_file("image_dfl.dcm")), src / "dfl.dcm", "1.2.826.0.1.3680043.8.498.20.3")
    # and beside them a damaged one: a file meta Transfer Syntax UID in another character set
    # once ended the whole run with a UnicodeDecodeError traceback
    (src / "bad.dcm").write_bytes(damage.non_ascii_transfer_syntax(CT.read_bytes(), random.Random(1)))
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[projects.P]\n')
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "deidentify", "--config", str(config), "--project", "P",
                        str(src), str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr[-3000:]
    assert r.stdout.startswith("2 de-identified") and "1 quarantined, 1 failed, 0 not DICOM" in r.stdout, r.stdout
    assert "dfl.dcm: secondary capture" in r.stderr, r.stderr
    assert f"failed: {src / 'bad.dcm'}: " in r.stderr and "Transfer Syntax UID" in r.stderr, r.stderr
    out = sorted((tmp_path / "out").iterdir())
    assert len(out) == 2
    for path in out:
        ds = pydicom.dcmread(path)  # written as Part-10 files, preamble and all
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientName != pydicom.dcmread(CT).PatientName
        assert ds.SOPInstanceUID not in {"1.2.826.0.1.3680043.8.498.20.1", "1.2.826.0.1.3680043.8.498.20.2"}
    pixels = {pydicom.dcmread(p).Modality: pydicom.dcmread(p).PixelData for p in out}
    assert pixels["CT"] == pydicom.dcmread(CT).PixelData


def test_stow_rs_stores_a_body_without_preamble(tmp_path, make_server):
    http_port = free_port()
    server = make_server("--workers", "1", "--http-port", str(http_port), STOWAGE_HTTP_PROCESSES="1")
    uid = "1.2.826.0.1.3680043.8.498.20.4"
    part = _without_preamble(CT, tmp_path / "ct.dcm", uid).read_bytes()
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--b--\r\n"
    base = f"http://127.0.0.1:{http_port}/dicom-web"
    r = requests.post(f"{base}/studies", data=body, timeout=60,
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
                               "Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    answer = r.json()  # the instance referenced, none failed
    assert [i["00081155"]["Value"] for i in answer["00081199"]["Value"]] == [[uid]], r.text
    assert answer.get("00081198", {}).get("Value", []) == [], r.text
    study = pydicom.dcmread(CT).StudyInstanceUID
    series = pydicom.dcmread(CT).SeriesInstanceUID
    got = requests.get(f"{base}/studies/{study}/series/{series}/instances/{uid}", timeout=60,
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert got.status_code == 200
    start = got.content.index(b"DICM") - 128  # the part: a whole Part-10 file again
    stored = got.content[start:got.content.rindex(b"\r\n--")]
    (tmp_path / "back.dcm").write_bytes(stored)
    assert dataset_bytes(tmp_path / "back.dcm") == part[damage.meta_end(b"\0" * 128 + part) - 128:]
    assert server.stop() == 0 and "Traceback" not in server.log()
