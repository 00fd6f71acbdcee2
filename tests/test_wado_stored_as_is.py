"""WADO-RS of a series whose records differ in how they hold their payload: as is
(encapsulated syntaxes: neither compressed nor shuffled, read straight into the part's
buffer) and zstd with the byte shuffle (decompressed into it), in one answer: each part the
Part-10 file exactly, in instance order, every part delimited (the lean benchmark client
counts them); a record held as is damaged on disk after it was stored is never sent (its
CRC is checked first) and the answer breaks off short of its Content-Length."""
from __future__ import annotations

import http.client
from io import BytesIO

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import CT, HOST, dataset_bytes
from stowage.bench.harness.dicomweb_lean import ACCEPT, read_parts
from stowage.engine.store.segment import iter_records
from web_server import c_store, parts, start

import requests


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    w = start(tmp_path_factory.mktemp("as_is"), corpus=False)
    yield w
    w.server.stop()


def _series(out, n_j2k: int, n_ct: int):
    """One series: JPEG 2000 instances (records stored as is) and native CT ones (zstd)."""
    study, series = generate_uid(), generate_uid()
    files = []
    for i, src in enumerate([get_testdata_file("MR_small_jp2klossless.dcm")] * n_j2k + [CT] * n_ct):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = out / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, series, files


def _get(web, study: str, series: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(HOST, web.http_port, timeout=60)
    conn.request("GET", f"/dicom-web/studies/{study}/series/{series}", headers={"Accept": ACCEPT})
    return conn.getresponse()


def test_stored_as_is_and_compressed_records_in_one_answer_are_byte_exact(web, tmp_path):
    study, series, files = _series(tmp_path, 3, 2)
    c_store(web.server.port, files)
    r = requests.get(f"{web.base}/studies/{study}/series/{series}", headers={"Accept": ACCEPT}, timeout=60)
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)
    got = parts(r)
    assert len(got) == 5
    for path, (_headers, body) in zip(files, got):  # in instance order
        assert body[128:132] == b"DICM" and body.endswith(dataset_bytes(path)), path.name
        assert pydicom.dcmread(BytesIO(body)).SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID
    resp = _get(web, study, series)
    nbytes, delimiters = read_parts(resp, bytearray(1 << 16))  # the benchmark's lean client
    assert (nbytes, delimiters) == (len(r.content), 6)


def test_a_record_damaged_on_disk_is_not_sent(web, tmp_path):
    study, series, files = _series(tmp_path, 2, 0)
    c_store(web.server.port, files)
    victim_uid = pydicom.dcmread(files[1], stop_before_pixels=True).SOPInstanceUID
    for seg in sorted((web.server.data_dir / "segments").glob("*.seg")):
        victim = next((rec for rec in iter_records(seg) if rec.header.get("sop_instance_uid") == victim_uid), None)
        if victim is not None:
            break
    assert victim is not None and victim.flags == 0  # held as is
    with open(seg, "r+b") as f:  # bytes flipped in the middle of its pixel data
        f.seek(victim.payload_offset + victim.payload_length - 200)
        f.write(b"\xde\xad\xbe\xef")
    resp = _get(web, study, series)
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    partial = cut.value.partial
    assert dataset_bytes(files[0]) in partial  # the sound instance before it was sent
    assert b"\xde\xad\xbe\xef" not in partial  # the damaged one was not
