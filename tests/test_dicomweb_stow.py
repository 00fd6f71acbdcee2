"""STOW-RS against a running `stowage serve`: dicomweb-client stores, the PS3.18 answer
(200/202/409, Referenced and Failed SOP Sequences, Retrieve URLs), read-your-writes
through QIDO and WADO, and bad bodies (truncated, malformed, wrong media type, lying
Content-Length, a body that stalls) that get a 4xx with a reason and store nothing."""
from __future__ import annotations

import copy
import os
import socket
import time
from io import BytesIO

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import CT, HOST, free_port, wait_for
from web_server import start

UNDERSTAND, MISMATCH = 0xC000, 0xA900


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "web.toml"
    metrics_port = free_port()
    # spill_threshold 20 kB: every CT part is spooled to disk here (tests/test_dicomweb_orthanc.py's stay in memory)
    # metadata_stable_seconds 0: the series metadata kept on disk is made by requests alone here
    # (test_series_metadata_kept_on_disk_never_goes_stale counts the files a request writes)
    cfg.write_text(f"network_timeout = 3\nhttp_delete = true\nmetrics_port = {metrics_port}\n"
                   "spill_threshold = 20000\nmetadata_stable_seconds = 0\n")
    w = start(tmp_path_factory.mktemp("stow"), "--config", str(cfg), corpus=False)
    w.metrics_port = metrics_port
    yield w
    w.server.stop()


def _instances(n: int, study: str | None = None) -> list[pydicom.Dataset]:
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        out.append(pydicom.dcmread(BytesIO(_bytes(ds))))
    return out


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _body(parts: list[bytes], boundary: str = "b0undary", close: bool = True) -> bytes:
    out = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


CTYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def _held(web, uid: str) -> bool:
    return requests.get(f"{web.base}/instances", params={"SOPInstanceUID": uid}).status_code == 200


def _spool_empty(web) -> bool:
    folder = web.server.data_dir / "spool" / "http"
    return not folder.exists() or not os.listdir(folder)


def test_each_http_process_opens_its_store_path_before_any_stow(web):
    """The HTTP processes open their store path as they start (slot claimed, recovered,
    sealer running): before any STOW-RS (this test runs first), each has said so in the
    log, on a slot of its own, so a first STOW-RS does not wait for that."""
    def opened() -> list[str]:
        return [line for line in web.server.log_path.read_text(errors="replace").splitlines()
                if "http store path on slot" in line]
    wait_for(lambda: len(opened()) == 2, 30, "both HTTP processes' store paths")
    assert sorted(line.split()[-1] for line in opened()) == ["900", "901"]
    assert "STOW-RS" not in web.server.log_path.read_text(errors="replace")


def test_store_with_dicomweb_client_then_read_it_back(web):
    c = web.client()
    sent = _instances(3)
    answer = c.store_instances(sent)
    refs = answer.ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in refs} == {d.SOPInstanceUID for d in sent}
    assert not answer.get("FailedSOPSequence")
    study, series = sent[0].StudyInstanceUID, sent[0].SeriesInstanceUID
    assert answer.RetrieveURL == f"{web.base}/studies/{study}"
    assert refs[0].RetrieveURL.startswith(f"{web.base}/studies/{study}/series/{series}/instances/")
    found = c.search_for_instances(study_instance_uid=study)  # at once: acknowledged means visible
    assert len(found) == 3
    for ds in sent:
        [back] = [c.retrieve_instance(study, series, ds.SOPInstanceUID)]
        assert back.PixelData == ds.PixelData and back.PatientName == ds.PatientName
    audit = (web.server.data_dir / "audit.jsonl").read_text()
    assert all(ds.SOPInstanceUID in audit for ds in sent) and "DICOMWEB" in audit


def test_partial_success_is_202_and_none_is_409(web):
    good = _instances(1)[0]
    r = requests.post(f"{web.base}/studies", data=_body([_bytes(good), b"this is not DICOM at all"]),
                      headers={"Content-Type": CTYPE})
    assert r.status_code == 202 and r.headers["Content-Type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(r.json())
    assert answer.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == good.SOPInstanceUID
    assert answer.FailedSOPSequence[0].FailureReason == UNDERSTAND
    assert "Part-10" in answer.FailedSOPSequence[0].TextValue
    other = _instances(2)
    target = other[0].StudyInstanceUID
    stranger = _instances(1)[0]
    r = requests.post(f"{web.base}/studies/{target}", data=_body([_bytes(stranger)]), headers={"Content-Type": CTYPE})
    assert r.status_code == 409
    failed = pydicom.Dataset.from_json(r.json()).FailedSOPSequence[0]
    assert failed.FailureReason == MISMATCH and failed.ReferencedSOPInstanceUID == stranger.SOPInstanceUID
    assert not _held(web, stranger.SOPInstanceUID)
    r = requests.post(f"{web.base}/studies/{target}", data=_body([_bytes(d) for d in other]),
                      headers={"Content-Type": CTYPE})
    assert r.status_code == 200 and all(_held(web, d.SOPInstanceUID) for d in other)


def test_bad_bodies_store_nothing(web):
    ds = _instances(2)
    whole = _body([_bytes(d) for d in ds])
    cases = [
        (whole[:len(whole) // 2], CTYPE, 400, "closing boundary"),             # truncated
        (whole, "application/dicom", 415, "multipart/related"),                 # wrong media type
        (whole, 'multipart/related; type="application/dicom+json"; boundary=b0undary', 415, "application/dicom"),
        (whole, 'multipart/related; type="application/dicom"', 400, "boundary"),
        (b"--b0undary--\r\n", CTYPE, 400, "no part"),
        (whole.replace(b"Content-Type: application/dicom", b"Content-Type: text/plain", 1), CTYPE, 415, "text/plain"),
        (b"garbage without any boundary at all", CTYPE, 400, ""),
    ]
    for body, ctype, status, words in cases:
        r = requests.post(f"{web.base}/studies", data=body, headers={"Content-Type": ctype})
        assert r.status_code == status and words in r.text, (ctype, r.status_code, r.text)
    r = requests.post(f"{web.base}/studies", data=whole)  # no Content-Type at all
    assert "Content-Type" not in r.request.headers
    assert r.status_code == 415 and "multipart/related" in r.text, (r.status_code, r.text)
    assert not any(_held(web, d.SOPInstanceUID) for d in ds)
    assert _spool_empty(web)


def _raw(web, head: bytes, body: bytes, *, pause: float = 0.0) -> bytes:
    with socket.create_connection((HOST, web.http_port), timeout=30) as s:
        s.sendall(head + body)
        if pause:
            time.sleep(pause)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def test_lying_length_and_a_stalled_body(web):
    ds = _instances(1)[0]
    body = _body([_bytes(ds)])
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {CTYPE}\r\n"
            f"Content-Length: {len(body) + 5000}\r\n\r\n").encode()
    answer = _raw(web, head, body)  # promises more than it sends, then closes its side
    assert not answer or answer.split(b"\r\n")[0].split()[1].startswith(b"4")
    short = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {CTYPE}\r\n"
             f"Content-Length: {len(body) - 40}\r\n\r\n").encode()
    answer = _raw(web, short, body)  # says less than it sends: the closing boundary is cut off, and what
    # follows is no request: a 400 (ours, or aiohttp's for the rest), or the connection closed
    assert not answer or answer.split(b"\r\n")[0].split()[1] == b"400", answer[:200]
    started = time.monotonic()
    stalled = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {CTYPE}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((HOST, web.http_port), timeout=30) as s:
        s.sendall(stalled + body[:1000])  # then nothing: network_timeout is 3 s here
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer, answer[:300]
    assert time.monotonic() - started < 30
    assert not _held(web, ds.SOPInstanceUID) and _spool_empty(web)
    c = web.client()
    assert c.store_instances([ds]).ReferencedSOPSequence  # and it still serves


def test_delete_study_series_instance(web):
    c = web.client()
    a, b = _instances(3), _instances(2)
    c.store_instances(a + b)
    study, series = a[0].StudyInstanceUID, a[0].SeriesInstanceUID
    c.delete_instance(study, series, a[0].SOPInstanceUID)
    assert not _held(web, a[0].SOPInstanceUID) and _held(web, a[1].SOPInstanceUID)
    r = requests.delete(f"{web.base}/studies/{b[0].StudyInstanceUID}/series/{series}")  # a series of another study
    assert r.status_code == 404 and _held(web, a[1].SOPInstanceUID)
    c.delete_series(study, series)
    assert not any(_held(web, d.SOPInstanceUID) for d in a)
    c.delete_study(b[0].StudyInstanceUID)
    assert not any(_held(web, d.SOPInstanceUID) for d in b)
    r = requests.get(f"{web.base}/studies/{b[0].StudyInstanceUID}/metadata")
    assert r.status_code == 404
    audit = (web.server.data_dir / "audit.jsonl").read_text()
    assert '"event": "delete"' in audit and "dicomweb:loopback" in audit
    r = requests.delete(f"{web.base}/studies/1.2.3.4")
    assert r.status_code == 404


def _sops(meta: list[dict]) -> set[str]:
    return {m["00080018"]["Value"][0] for m in meta}


def test_series_metadata_kept_on_disk_never_goes_stale(web):
    """The series metadata kept on disk (engine/store/series_cache.py) follows the series: an
    instance that joins it, one deleted, the series deleted; and carries the base URL the
    client reached the server by."""
    c = web.client()
    sent = _instances(3)
    c.store_instances(sent)
    study, series = sent[0].StudyInstanceUID, sent[0].SeriesInstanceUID
    kept = web.server.data_dir / "cache" / "series-metadata"
    before = set(os.listdir(kept)) if kept.exists() else set()
    meta = c.retrieve_series_metadata(study, series)
    assert _sops(meta) == {d.SOPInstanceUID for d in sent}
    assert meta[0]["7FE00010"]["BulkDataURI"].startswith(f"{web.base}/studies/{study}/series/{series}/instances/")
    written = set(os.listdir(kept)) - before
    assert len(written) == 1  # the series' file
    again = c.retrieve_series_metadata(study, series)  # from the file now
    assert again == meta
    port = web.base.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]
    r = requests.get(f"{web.base}/studies/{study}/series/{series}/metadata", headers={"Host": f"localhost:{port}"})
    assert r.status_code == 200
    assert r.json()[0]["7FE00010"]["BulkDataURI"].startswith(f"http://localhost:{port}/dicom-web/studies/{study}/")
    joined = copy.deepcopy(sent[0])  # a fourth slice joins the series
    joined.SOPInstanceUID = joined.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    joined.InstanceNumber = 4
    c.store_instances([joined])
    assert _sops(c.retrieve_series_metadata(study, series)) == {d.SOPInstanceUID for d in sent + [joined]}
    assert _sops(c.retrieve_study_metadata(study)) == {d.SOPInstanceUID for d in sent + [joined]}
    c.delete_instance(study, series, sent[0].SOPInstanceUID)
    assert _sops(c.retrieve_series_metadata(study, series)) == {d.SOPInstanceUID for d in sent[1:] + [joined]}
    c.delete_series(study, series)
    assert not set(os.listdir(kept)) & written  # the deleted series' metadata is not kept
    r = requests.get(f"{web.base}/studies/{study}/series/{series}/metadata")
    assert r.status_code == 404
    other = _instances(2)  # `stowage delete` (the command line) removes a series' file too
    c.store_instances(other)
    before = set(os.listdir(kept))
    c.retrieve_series_metadata(other[0].StudyInstanceUID, other[0].SeriesInstanceUID)
    written = set(os.listdir(kept)) - before
    assert len(written) == 1
    from test_delete import delete
    done = delete(web.server.data_dir, "--series", other[0].SeriesInstanceUID)
    assert done.returncode == 0, done.stderr
    assert not set(os.listdir(kept)) & written  # no deleted patient's data left in the cache


def test_metrics_count_what_came_through_the_http_port(web):
    from test_metrics import scrape
    port = web.metrics_port
    before = scrape(port)
    c = web.client()
    sent = _instances(2)
    c.store_instances(sent)
    c.retrieve_series(sent[0].StudyInstanceUID, sent[0].SeriesInstanceUID)

    def counted():
        now = scrape(port)
        return (now['stowage_stores_total{outcome="success"}'] >= before['stowage_stores_total{outcome="success"}'] + 2
                and now.get('stowage_retrieve_suboperations_total{kind="WADO-RS",outcome="completed"}', 0) >=
                before.get('stowage_retrieve_suboperations_total{kind="WADO-RS",outcome="completed"}', 0) + 2)
    wait_for(counted, 30, "the STOW-RS stores and WADO-RS retrievals in /metrics")


def test_a_large_instance_streams_both_ways(web):
    """70 MB: spooled on the way in (past spill_threshold), streamed from its segment on the
    way out (past what WADO-RS reads whole), and back byte for byte."""
    import numpy as np
    ds = _instances(1)[0]
    ds.Rows = ds.Columns = 5920
    rng = np.random.default_rng(5)
    ds.PixelData = (rng.integers(0, 4096, ds.Rows * ds.Columns, dtype=np.uint16)).tobytes()
    data = _bytes(ds)
    assert len(data) > 64 << 20
    r = requests.post(f"{web.base}/studies", data=_body([data]), headers={"Content-Type": CTYPE})
    assert r.status_code == 200, r.text
    r = requests.get(f"{web.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                     f"{ds.SOPInstanceUID}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, stream=True)
    assert r.status_code == 200
    body = r.content
    from pydicom.filereader import _read_file_meta_info, read_preamble
    f = BytesIO(data)
    read_preamble(f, False)
    _read_file_meta_info(f)
    assert data[f.tell():] in body  # past the file meta, which is ours: the data set byte for byte
    assert _spool_empty(web)


def test_stowage_bench_dicomweb(web, tmp_path):
    """`stowage bench --dicomweb`: STOW-RS of a generated corpus, then WADO-RS of it, all stored."""
    import json
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "--dicomweb", web.base, "--kind", "small",
                        "--count", "20", "--patients", "1", "-k", "2", "--batch", "4", "--wado", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "STOW-RS" in r.stdout and "WADO-RS retrieve" in r.stdout and "Traceback" not in r.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(r["target"].rsplit(" ", 1)[-1], r["completed"], r["failed"]) for r in runs] == [
        ("STOW-RS", 20, 0), ("retrieve", 20, 0), ("metadata", 20, 0)]


def test_every_kind_of_part_is_stored_byte_exact(web):
    """Parts kept in memory (under spill_threshold: the two small MRs, one JPEG 2000, one
    RLE, stored as they came) and spooled (the CT, shuffled and compressed) in one body,
    read back as stored: each data set byte for byte as sent."""
    from pydicom.data import get_testdata_file
    from pydicom.filereader import _read_file_meta_info, read_preamble
    study = generate_uid()
    sent = []
    for ds in (pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm")),
               pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm")), _instances(1)[0]):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        sent.append((ds, _bytes(ds)))
    assert [len(b) < 20000 for _ds, b in sent] == [True, True, False]
    r = requests.post(f"{web.base}/studies", data=_body([b for _ds, b in sent]), headers={"Content-Type": CTYPE})
    assert r.status_code == 200, r.text
    for ds, data in sent:
        back = requests.get(f"{web.base}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
                            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert back.status_code == 200
        f = BytesIO(data)
        read_preamble(f, False)
        _read_file_meta_info(f)
        assert data[f.tell():] in back.content, ds.file_meta.TransferSyntaxUID
    assert _spool_empty(web)
