"""The HTTP port at its edges, as curl, a proxy or a raw socket meet it: HEAD answers
without a body on a keep-alive connection, rendered parameters that float() takes but no
image can use (nan, inf), and clients that connect and say nothing."""
from __future__ import annotations

import http.client
import io
import select
import socket
import time

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import HOST, wait_for
from web_server import c_store, start

NETWORK_TIMEOUT = 3


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edges")
    cfg = tmp / "edges.toml"
    cfg.write_text(f"network_timeout = {NETWORK_TIMEOUT}\n")
    w = start(tmp, "--config", str(cfg))
    yield w
    w.server.stop()


def _some_instance(web) -> tuple[str, str, str]:
    study = next(s for s, v in web.corpus.studies.items() if len(v) == 2)
    series = next(iter(web.corpus.studies[study]))
    return study, series, web.corpus.studies[study][series][0]


def _many_instances(web, n: int) -> str:
    """`n` small instances (no pixels) in one new series; its Series Instance UID."""
    study, series = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, k + 1
        ds.PatientName, ds.PatientID, ds.Modality = "EDGE^HEAD", "PID-EDGE", "OT"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        path = web.tmp / f"edge-{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    for start_at in range(0, n, 100):  # c_store asks a context per file: at most 128 an association
        c_store(web.server.port, paths[start_at:start_at + 100])
    return series


def test_head_answers_have_no_body_and_the_connection_goes_on(web):
    """RFC 9110 9.3.2: a HEAD answer has no content. aiohttp drops it for web.Response but
    a StreamResponse wrote it anyway: the client then read the parts of a WADO-RS answer
    as the status line of its next one on the same keep-alive connection."""
    study, series, inst = _some_instance(web)
    many = _many_instances(web, 150)  # a QIDO-RS answer over 100 matches is streamed in pieces
    dicom = 'multipart/related; type="application/dicom"'
    heads = [
        (f"/studies/{study}", {"Accept": f"{dicom}; transfer-syntax=*"}),  # as stored, its length known
        (f"/studies/{study}/series/{series}/instances/{inst}", {"Accept": dicom}),  # converted, chunked
        (f"/studies/{study}/series/{series}/instances/{inst}/frames/1", {}),
        (f"/studies/{study}/series/{series}/instances/{inst}/bulkdata/7FE00010", {}),
        (f"/instances?SeriesInstanceUID={many}", {}),
        (f"/studies/{study}/series/{series}/instances/{inst}/metadata", {}),
    ]
    conn = http.client.HTTPConnection(HOST, web.http_port, timeout=30)
    try:
        for path, headers in heads:
            conn.request("HEAD", "/dicom-web" + path, headers=headers)
            head = conn.getresponse()
            assert head.status == 200 and head.read() == b"", path
            get = requests.get(web.base + path, headers=headers)
            assert get.status_code == 200 and get.content, path
            assert head.getheader("Content-Type").split(";")[0] == get.headers["Content-Type"].split(";")[0]
            # the next request on the same connection reads its own answer, not the HEAD's body
            conn.request("GET", "/dicom-web/studies?PatientID=PID-1")
            after = conn.getresponse()
            assert after.status == 200, (path, after.status)
            assert after.getheader("Content-Type") == "application/dicom+json", path
            assert b"PID-1" in after.read()
    finally:
        conn.close()
    assert "internal error" not in web.server.log()


def test_rendered_numbers_must_be_finite(web):
    """float() takes nan, inf and 1e400: a viewport or quality of those was a 500 (int() of
    them raises), a window of them a blank image; now a 400 that says so."""
    study, series, inst = _some_instance(web)
    url = f"{web.base}/studies/{study}/series/{series}/instances/{inst}"
    for params in ({"viewport": "inf,inf"}, {"viewport": "nan,10"}, {"viewport": "1e400,5"}, {"quality": "nan"},
                   {"window": "nan,nan"}, {"window": "40,inf"}, {"window": "-inf,400"}):
        for resource in ("/rendered", "/thumbnail", "/frames/1/rendered"):
            r = requests.get(url + resource, params=params)
            assert r.status_code == 400 and "finite" in r.text, (resource, params, r.status_code, r.text)
    wado = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": inst}
    for params in ({"windowCenter": "nan", "windowWidth": "400"}, {"windowCenter": "40", "windowWidth": "inf"}):
        r = requests.get(f"{web.url}/wado", params={**wado, **params})
        assert r.status_code == 400 and "finite" in r.text, (params, r.status_code, r.text)
    assert requests.get(url + "/rendered", params={"viewport": "64,64", "quality": "50"}).status_code == 200
    assert "internal error" not in web.server.log()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (end of stream, or a reset) within `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        readable, _w, _x = select.select([sock], [], [], left)
        if readable:
            try:
                if sock.recv(65536) == b"":
                    return True
            except ConnectionError:
                return True
    return False


def test_a_silent_client_is_let_go_after_network_timeout(web):
    """A connection that sends nothing, or stops in the middle of its request head, or sits
    idle after an answer, was held for aiohttp's default hour, a descriptor each. They are
    closed after network_timeout, as a stalled STOW-RS body is, and others are served meanwhile."""
    silent = {
        "nothing": b"",
        "half a request line": b"GET /dicom-web/stu",
        "half a head": f"GET /dicom-web/studies HTTP/1.1\r\nHost: {HOST}\r\nAccept: */*\r\n".encode(),
        "idle after an answer": f"GET /dicom-web/studies?limit=1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
    }
    socks = {}
    for what, data in silent.items():
        s = socket.create_connection((HOST, web.http_port), timeout=10)
        s.sendall(data)
        socks[what] = s
    try:
        answer = socks["idle after an answer"].recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
        for _ in range(3):  # the port goes on answering everyone else meanwhile
            assert requests.get(f"{web.base}/studies", timeout=10).status_code == 200
        for what, s in socks.items():
            assert _closed_within(s, NETWORK_TIMEOUT * 10), f"{what}: still open {NETWORK_TIMEOUT * 10} s on"
    finally:
        for s in socks.values():
            s.close()
    assert requests.get(f"{web.base}/studies", timeout=10).status_code == 200


def test_bulk_data_follows_the_accept_header(web):
    """Bulk data is application/octet-stream: an Accept header that allows none of it gets a
    406 saying so (it got octet-stream parts, whatever it asked for)."""
    study, series, inst = _some_instance(web)
    url = f"{web.base}/studies/{study}/series/{series}/instances/{inst}/bulkdata/7FE00010"
    pixel_data = pydicom.dcmread(web.corpus.by_uid[inst]).PixelData
    for accept in ("application/dicom+json", 'multipart/related; type="image/jp2"', "text/html", "image/*",
                   "application/octet-stream; q=0"):
        r = requests.get(url, headers={"Accept": accept})
        assert r.status_code == 406 and "application/octet-stream" in r.text, (accept, r.status_code)
    for accept, multipart in ((None, True), ("*/*", True), ("application/octet-stream", False),
                              ('multipart/related; type="application/octet-stream"; transfer-syntax=*', True),
                              ('image/jp2, application/octet-stream; q=0.5', False),
                              ('text/html, multipart/related; type="application/octet-stream"; q=0.2', True)):
        r = requests.get(url, headers={"Accept": accept} if accept else {})
        assert r.status_code == 200, (accept, r.status_code, r.text[:200])
        assert r.headers["Content-Type"].startswith("multipart/related" if multipart else "application/octet-stream")
        assert (pixel_data in r.content) and (multipart or r.content == pixel_data), accept


def test_one_attribute_named_twice_in_a_query_is_refused(web):
    """A repeated key is a 400 (docs/dicomweb.md); the same attribute as a keyword and as a
    tag was not seen as repeated: the second value silently replaced the first."""
    for query in ("PatientName=DOE*&00100010=M*", "00100020=PID-1&PatientID=PID-2", "0010001a=X&0010001A=Y",
                  "PatientName=DOE*&PatientName=M*"):
        r = requests.get(f"{web.base}/studies?{query}")
        assert r.status_code == 400 and "given twice" in r.text, (query, r.status_code, r.text)
    study = next(iter(web.corpus.studies))
    r = requests.get(f"{web.base}/studies/{study}/series?StudyInstanceUID={study}&0020000D={study}")
    assert r.status_code == 400 and "given twice" in r.text
    r = requests.get(f"{web.base}/studies?PatientName=DOE*&PatientID=PID-1")
    assert r.status_code == 200 and len(r.json()) == 1


def _big_study(web, instances: int = 3, frames: int = 20) -> str:
    """A study of `instances` multi-frame CTs of ~10 MB each (more than socket buffers hold),
    stored with STOW-RS; its Study Instance UID."""
    import numpy as np
    from pydicom.data import get_testdata_file
    study, made = generate_uid(), []
    for _ in range(instances):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
        ds.Rows = ds.Columns = 512
        ds.NumberOfFrames, ds.BitsAllocated, ds.BitsStored, ds.HighBit = frames, 16, 16, 15
        ds.PixelData = np.random.default_rng(7).integers(0, 4000, (frames, 512, 512), dtype=np.uint16).tobytes()
        made.append(ds)
    _stow(web, made)
    return study


@pytest.fixture(scope="module")
def big_study(web) -> str:
    return _big_study(web)


def _asked_then_not_reading(web, request: str) -> socket.socket:
    """A connection with a small receive buffer that sent `request`, saw its 200, and reads
    no further (until _what_is_left)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((HOST, web.http_port))
    s.sendall(request.encode())
    assert s.recv(64).startswith(b"HTTP/1.1 200")
    return s


def _what_is_left(s: socket.socket) -> bytes:
    """What the server still sends on `s`, until it closes or is silent for 10 s."""
    s.settimeout(10)
    got = b""
    try:
        while chunk := s.recv(1 << 20):
            got += chunk
    except (ConnectionError, socket.timeout):
        pass
    return got


def test_a_client_that_stops_reading_is_let_go(web, big_study):
    """A WADO-RS retrieve whose client reads the head and then nothing more: aiohttp waited
    on the full socket for ever, the request and the instances read ahead for it (100 MB
    and more) held until the client went. Its connection is closed once the client has taken
    nothing for network_timeout; one that reads, however slowly, is served to the end."""
    study = big_study
    stalled = []
    for syntax in ("*", ExplicitVRLittleEndian):  # as stored (streamed, its length known), and converted
        stalled.append(_asked_then_not_reading(
            web, f"GET /dicom-web/studies/{study} HTTP/1.1\r\nHost: {HOST}\r\n"
                 f'Accept: multipart/related; type="application/dicom"; transfer-syntax={syntax}\r\n\r\n'))
    time.sleep(NETWORK_TIMEOUT * 4)  # the server fills the socket buffers, then waits on them: 2 periods at most
    try:
        for s in stalled:  # now read what is there: a body cut short, not the whole answer
            got = _what_is_left(s)
            assert len(got) < 30_000_000 and not got.endswith(b"--\r\n") and not got.endswith(b"0\r\n\r\n"), \
                f"a client that stopped reading for {NETWORK_TIMEOUT * 4} s was still sent the whole answer"
    finally:
        for s in stalled:
            s.close()
    assert "took nothing for" in web.server.log() and "failed (reference" not in web.server.log()
    slow = requests.get(f"{web.base}/studies/{study}", stream=True,  # pauses shorter than network_timeout
                        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    got = 0
    for chunk in slow.iter_content(8 << 20):
        got += len(chunk)
        time.sleep(NETWORK_TIMEOUT * 0.7)
    assert got == int(slow.headers["Content-Length"])
    whole = requests.get(f"{web.base}/studies/{study}",
                         headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert whole.status_code == 200 and len(whole.content) > 30_000_000


def test_a_client_gone_mid_answer_is_audited_and_no_error(web, big_study):
    """A viewer that moves on closes its connection in the middle of a retrieve: that was
    logged as an internal error with a traceback (aiohttp's ConnectionError "Connection
    lost" is not a ConnectionResetError), and the audit line of what it had been sent was
    never written."""
    import json
    import struct
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((HOST, web.http_port))
    s.sendall(f"GET /dicom-web/studies/{big_study} HTTP/1.1\r\nHost: {HOST}\r\n"
              'Accept: multipart/related; type="application/dicom"; transfer-syntax=*\r\n\r\n'.encode())
    got = b""
    while len(got) < 12_000_000:  # the first instance and a bit of the second
        got += s.recv(1 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset, as a browser cancelling a fetch sends
    audit = web.server.data_dir / "audit.jsonl"

    def line():
        for text in audit.read_text().splitlines():
            entry = json.loads(text)
            if entry.get("event") == "retrieve" and entry.get("path") == f"/dicom-web/studies/{big_study}" \
                    and entry.get("client_left"):
                return entry
        return None
    entry = wait_for(line, 30, "the audit line of the retrieve the client left")
    assert 1 <= entry["completed"] < 3 and entry["failed"] == 3 - entry["completed"]
    log = web.server.log()
    assert "failed (reference" not in log and "Traceback" not in log, log[-3000:]
    assert requests.get(f"{web.base}/studies/{big_study}/metadata").status_code == 200


def _stow(web, datasets: list[Dataset]) -> None:
    """STOW-RS the data sets (their file meta's SOP Instance UID set from theirs) in one body."""
    boundary, body = "edges", b""
    for ds in datasets:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + out.getvalue() + b"\r\n"
    r = requests.post(f"{web.base}/studies", data=body + f"--{boundary}--\r\n".encode(),
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 200, r.text[:300]


def test_frames_the_stored_pixel_data_lacks_are_404(web):
    """Number of Frames says 3, the stored Pixel Data holds 1 (one JPEG 2000 fragment, or one
    native frame's bytes): frame 2 as stored was a 500 "internal error" (an IndexError) for
    the encapsulated one and an empty part for the native one."""
    from pydicom.data import get_testdata_file
    made = []
    for name in ("MR_small_jp2klossless.dcm", "CT_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.NumberOfFrames = 3
        made.append(ds)
    _stow(web, made)
    as_stored = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    for ds in made:
        url = f"{web.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        assert requests.get(f"{url}/frames/1", headers=as_stored).status_code == 200
        for frames in ("2", "1,3"):
            r = requests.get(f"{url}/frames/{frames}", headers=as_stored)
            assert r.status_code == 404 and "holds 1 frame(s)" in r.text, (ds.file_meta.TransferSyntaxUID, r.text)
    assert "failed (reference" not in web.server.log()


def test_an_http_1_0_client_gets_streamed_answers(web):
    """HTTP/1.0 has no chunked encoding (nginx speaks it to its upstream by default): a
    converted retrieve, frames and multipart bulk data were a 500 (aiohttp refuses to chunk
    for it); they are sent whole, the connection's end ending the body."""
    study, series, inst = _some_instance(web)
    base = f"/dicom-web/studies/{study}/series/{series}/instances/{inst}"
    many = _many_instances(web, 120)  # a QIDO-RS answer over 100 matches is streamed in pieces
    for path in (base, f"/dicom-web/studies/{study}", base + "/frames/1", base + "/bulkdata/7FE00010",
                 f"/dicom-web/instances?SeriesInstanceUID={many}"):
        with socket.create_connection((HOST, web.http_port), timeout=30) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(1 << 20):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200"), (path, head[:200], body[:200])
        assert b"chunked" not in head.lower()
        if b"multipart/related" in head:
            assert body.endswith(b"--\r\n") and body.count(b"\r\nContent-Type: ") >= 1, path
        else:
            assert body.endswith(b"]") and body.count(b'"00080018"') == 120, path
    assert "failed (reference" not in web.server.log()


def test_a_client_that_stops_reading_metadata_is_let_go(web):
    """Series metadata is one ready-made body (megabytes for a large series): a client that
    stopped reading it held the connection and the body for ever. It is let go after
    network_timeout, as a streamed answer's is."""
    study, series, made = generate_uid(), generate_uid(), []
    for k in range(100):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, k + 1
        ds.PatientName, ds.PatientID, ds.Modality = "EDGE^META", "PID-META", "OT"
        ds.add_new(0x0040A160, "UT", "long text " * 8000)  # 80 kB of text: in the metadata, not bulk data
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        made.append(ds)
    _stow(web, made)
    path = f"/dicom-web/studies/{study}/series/{series}/metadata"
    whole = requests.get(f"{web.url}{path}")
    assert whole.status_code == 200 and len(whole.content) > 7_000_000
    assert requests.head(f"{web.url}{path}").headers["Content-Length"] == str(len(whole.content))
    s = _asked_then_not_reading(web, f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    try:
        time.sleep(NETWORK_TIMEOUT * 4)
        got = _what_is_left(s)
        assert len(got) < len(whole.content), "a client that stopped reading was still sent the whole metadata"
    finally:
        s.close()
    assert "failed (reference" not in web.server.log()


def test_a_frame_named_many_times_is_made_once(web, big_study):
    """/frames/1,1,1,… (about 4,000 fit in a URL): each mention held a copy of the frame
    (512 kB here), 2 GB of one HTTP process for one request. Each is sent as often as
    named, from one copy."""
    import psutil
    r = requests.get(f"{web.base}/studies/{big_study}/series")
    series = r.json()[0]["0020000E"]["Value"][0]
    r = requests.get(f"{web.base}/studies/{big_study}/series/{series}/instances")
    inst = r.json()[0]["00080018"]["Value"][0]
    url = f"{web.base}/studies/{big_study}/series/{series}/instances/{inst}/frames/"
    http = [p for p in psutil.Process(web.server.proc.pid).children(recursive=True)
            if "stowage.engine.web.process" in " ".join(p.cmdline())]
    before = {p.pid: p.memory_info().rss for p in http}
    for syntax in ("*", ExplicitVRLittleEndian):
        r = requests.get(url + ",".join(["2", "1"] * 300), stream=True,
                         headers={"Accept": f'multipart/related; type="application/octet-stream"; transfer-syntax={syntax}'})
        got = 0
        for chunk in r.iter_content(1 << 20):
            got += len(chunk)
        assert r.status_code == 200 and got > 600 * 512 * 512 * 2
    grown = max(p.memory_info().rss - before[p.pid] for p in http)
    assert grown < 100 << 20, f"an HTTP process grew by {grown >> 20} MB serving 2 frames 600 times"


def test_delete_turned_off_names_the_methods_each_resource_takes(web):
    """405's Allow listed POST and OPTIONS for every resource: a series or an instance
    takes neither (STOW-RS posts to /studies and /studies/{study} only)."""
    study, series, inst = _some_instance(web)
    for path, allowed in ((f"/studies/{study}", {"GET", "HEAD", "POST"}),
                          (f"/studies/{study}/series/{series}", {"GET", "HEAD"}),
                          (f"/studies/{study}/series/{series}/instances/{inst}", {"GET", "HEAD"})):
        r = requests.delete(web.base + path)
        assert r.status_code == 405 and "http_delete" in r.text
        assert {m.strip() for m in r.headers["Allow"].split(",")} == allowed, (path, r.headers["Allow"])
        for method in allowed - {"POST"}:
            assert requests.request(method, web.base + path).status_code == 200, (method, path)
        assert requests.request("POST", web.base + path, data=b"").status_code != 405 or "POST" not in allowed
        assert requests.options(web.base + path).status_code == 405


def test_q_zero_in_accept_is_a_refusal(web):
    """RFC 9110 12.5.1: q=0 means "not acceptable". QIDO-RS answered JSON to
    "application/dicom+json; q=0", and a rendered image was JPEG for "image/jpeg; q=0, */*"."""
    study, series, inst = _some_instance(web)
    for accept in ("application/dicom+json; q=0", "application/dicom+json;q=0, application/dicom+xml",
                   "application/dicom+json; q=0, */*"):
        r = requests.get(f"{web.base}/studies", headers={"Accept": accept})
        assert r.status_code == 406 and "application/dicom+json" in r.text, (accept, r.status_code)
    for accept in ("application/dicom+json; q=0.1", "text/html, */*; q=0.5", "application/json"):
        assert requests.get(f"{web.base}/studies", headers={"Accept": accept}).status_code == 200, accept
    url = f"{web.base}/studies/{study}/series/{series}/instances/{inst}/rendered"
    for accept, media in (("image/jpeg; q=0, */*", "image/png"), ("image/jpeg;q=0, image/*", "image/png"),
                          ("image/png; q=0, */*", "image/jpeg"), ("*/*", "image/jpeg"),
                          ("image/png; q=0.5, image/jpeg", "image/jpeg")):
        r = requests.get(url, headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["Content-Type"] == media, (accept, r.headers["Content-Type"])
    r = requests.get(url, headers={"Accept": "image/jpeg; q=0, image/png; q=0, */*"})
    assert r.status_code == 406
    # a wildcard does not bring back the DICOM parts a q=0 refuses
    instance = f"{web.base}/studies/{study}/series/{series}/instances/{inst}"
    for accept in ('multipart/related; type="application/dicom"; q=0, */*', "multipart/related; q=0, */*"):
        assert requests.get(instance, headers={"Accept": accept}).status_code == 406, accept
    r = requests.get(instance, headers={"Accept": 'multipart/related; type="application/dicom"; q=0.5, */*'})
    assert r.status_code == 200 and 'type="application/dicom"' in r.headers["Content-Type"], r.headers


def _with_odd_numbers(ds: Dataset) -> Dataset:
    """DS values JSON has no number for ("nan", "1.5e999", "-Infinity") and an FD NaN, as
    some modalities write them."""
    import struct
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    for tag, vr, value in ((0x00180050, "DS", b"1.5e999 "), (0x00281050, "DS", b"nan\\40 "),
                           (0x00281051, "DS", b"-Infinity "), (0x00189327, "FD", struct.pack("<d", float("nan")))):
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


def test_metadata_is_valid_json_whatever_the_numbers(web):
    """json.dumps writes NaN and Infinity, which are not JSON: JSON.parse in a browser (OHIF)
    refused the whole series' metadata for one such value. They go out as strings."""
    import json
    from pydicom.data import get_testdata_file
    study, made = generate_uid(), []
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm"):  # metadata from the stored header, and from the record
        ds = _with_odd_numbers(pydicom.dcmread(get_testdata_file(name)))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
        made.append(ds)
    _stow(web, made)

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    urls = [f"/studies/{study}/metadata"]
    for ds in made:
        urls += [f"/studies/{study}/series/{ds.SeriesInstanceUID}/metadata",
                 f"/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/metadata"]
    for _ in range(2):  # made, then from the series metadata kept on disk
        for url in urls:
            r = requests.get(web.base + url)
            assert r.status_code == 200, url
            for inst in strict(r.text):
                assert inst["00180050"]["Value"] == ["Infinity"] and inst["00281050"]["Value"] == ["NaN", 40]
                assert inst["00281051"]["Value"] == ["-Infinity"] and inst["00189327"]["Value"] == ["NaN"]
    r = requests.get(f"{web.base}/instances", params={"StudyInstanceUID": study, "includefield": "00180050,00189327"})
    for inst in strict(r.text):
        assert inst["00180050"]["Value"] == ["Infinity"]


def test_rendered_viewport_region_is_cut_out(web):
    """viewport=vw,vh,sx,sy,sw,sh (PS3.18 8.3.5.1.3) names a region of the source image:
    it was ignored and the whole image sent, scaled, as if none had been asked for."""
    import numpy as np
    from PIL import Image
    study, series, inst = _some_instance(web)
    url = f"{web.base}/studies/{study}/series/{series}/instances/{inst}/rendered"
    png = {"Accept": "image/png"}

    def image(viewport: str) -> np.ndarray:
        r = requests.get(url, params={"viewport": viewport, "window": "40,400"}, headers=png)
        assert r.status_code == 200, (viewport, r.text)
        return np.asarray(Image.open(io.BytesIO(r.content)))
    whole = image("128,128")  # CT_small is 128 x 128
    assert whole.shape == (128, 128)
    assert np.array_equal(image("64,64,0,0,64,64"), whole[:64, :64])
    assert np.array_equal(image("32,64,96,64,32,64"), whole[64:, 96:])
    assert np.array_equal(image("64,64,64,0,-64,64"), whole[:64, :64][:, ::-1])  # flipped left-right
    assert np.array_equal(image("128,128,0,128,128,-128"), whole[::-1, :])  # flipped top-bottom
    for bad in ("64,64,0,0,64", "64,64,0,0,0,64", "64,64,-1,0,64,64", "64,64,500,500,10,10"):
        r = requests.get(url, params={"viewport": bad})
        assert r.status_code == 400 and "viewport" in r.text, (bad, r.status_code, r.text)


def test_retrieve_urls_add_our_port_to_an_ipv6_host_without_one(web):
    """A Host header of an IPv6 literal without a port ("[::1]", as a client that leaves out
    the port sends it) got Retrieve URLs without our port, which point at port 80."""
    study = next(iter(web.corpus.studies))
    for host, want in (("[::1]", f"http://[::1]:{web.http_port}/dicom-web/studies/{study}"),
                       (f"[::1]:{web.http_port}", f"http://[::1]:{web.http_port}/dicom-web/studies/{study}"),
                       ("localhost", f"http://localhost:{web.http_port}/dicom-web/studies/{study}")):
        r = requests.get(f"{web.base}/studies", params={"StudyInstanceUID": study}, headers={"Host": host})
        assert r.status_code == 200 and r.json()[0]["00081190"]["Value"] == [want], (host, r.text[:300])


def test_a_body_that_trickles_in_is_refused_and_stores_nothing(web):
    """A STOW-RS body sent a byte at a time, each within network_timeout, held its connection
    and spool for as long as the client liked (one byte every 2.9 s keeps a 10 MB body
    going for a year). Past network_timeout it must come at MIN_BODY_RATE on average: 408."""
    from stowage.engine.web.stow import MIN_BODY_RATE
    study = generate_uid()
    head = (f"POST /dicom-web/studies/{study} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {10 << 20}\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=B\r\n\r\n').encode()
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 128 + b"DICM"
    sock = socket.create_connection((HOST, web.http_port), timeout=10)
    try:
        sock.sendall(head)
        answer, started = b"", time.monotonic()
        for byte in body:  # bounded: the body's bytes, each well within network_timeout, and in time
            if time.monotonic() - started > NETWORK_TIMEOUT * 4:
                break
            try:
                sock.sendall(bytes([byte]))
            except ConnectionError:
                break
            readable, _w, _x = select.select([sock], [], [], NETWORK_TIMEOUT * 0.6)
            if readable:
                answer = sock.recv(65536)
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert f"slower than {MIN_BODY_RATE} bytes/s".encode() in answer
    finally:
        sock.close()
    assert requests.get(f"{web.base}/studies/{study}", timeout=10).status_code == 404
    assert requests.get(f"{web.base}/studies", timeout=10).status_code == 200
