"""Who may use the HTTP port: bearer tokens with read and write scopes, over TLS with the
DICOM TLS port's certificate settings; without tokens, loopback clients only."""
from __future__ import annotations

import pytest
import requests
from requests import HTTPError

from conftest import wait_for
from stowage.engine.runtime.config import load
from stowage.engine.web.processes import http_bind
from test_tls import certs  # noqa: F401 (the module-scoped CA and certificates)
from web_server import start

READ, WRITE = "r" * 24 + "-reader", "w" * 24 + "-writer"


@pytest.fixture(scope="module")
def web(tmp_path_factory, certs):  # noqa: F811
    cfg = tmp_path_factory.mktemp("cfg") / "web.toml"
    cfg.write_text(f'http_tls = true\ntls_cert = "{certs / "server.pem"}"\ntls_key = "{certs / "server.key"}"\n'
                   f'[http_tokens.viewer]\ntoken = "{READ}"\nscopes = ["read"]\n'
                   f'[http_tokens.pacs]\ntoken = "{WRITE}"\nscopes = ["read", "write"]\n')
    w = start(tmp_path_factory.mktemp("access"), "--config", str(cfg), corpus=False, tls=certs / "ca.pem",
              token=READ)
    yield w
    w.server.stop()


def test_tokens_and_scopes(web, certs):  # noqa: F811
    ca = str(certs / "ca.pem")
    r = requests.get(f"{web.base}/studies", verify=ca)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer") and "token" in r.text
    r = requests.get(f"{web.base}/studies", verify=ca, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401 and "invalid_token" in r.headers["WWW-Authenticate"]
    r = requests.get(f"{web.base}/studies", verify=ca, headers={"Authorization": f"Bearer {READ}"})
    assert r.status_code == 204
    r = requests.get(f"{web.base}/studies", verify=ca, params={"access_token": READ})
    assert r.status_code == 204
    r = requests.post(f"{web.base}/studies", verify=ca, headers={"Authorization": f"Bearer {READ}"}, data=b"")
    assert r.status_code == 403 and "write" in r.text and "insufficient_scope" in r.headers["WWW-Authenticate"]
    session = requests.Session()
    session.verify = ca
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, replaces verify
    session.headers["Authorization"] = f"Bearer {WRITE}"
    assert web.client(session=session).search_for_studies() == []
    session.headers["Authorization"] = "Bearer nope"
    with pytest.raises(HTTPError) as e:
        web.client(session=session).search_for_studies()
    assert e.value.response.status_code == 401


def test_a_token_in_the_query_never_reaches_the_audit_trail(web, certs):  # noqa: F811
    """?access_token= (RFC 6750 2.3) is the token itself: the QIDO-RS audit line copied the
    query string whole into audit.jsonl."""
    r = requests.get(f"{web.base}/series", verify=str(certs / "ca.pem"),
                     params={"Modality": "XA", "access_token": READ, "limit": "7"})
    assert r.status_code == 204
    audit = web.server.data_dir / "audit.jsonl"
    line = wait_for(lambda: next((ln for ln in audit.read_text().splitlines() if "Modality=XA" in ln), None),
                    30, "the QIDO-RS audit line")
    assert "limit=7" in line and READ not in line and READ not in audit.read_text()


def test_a_token_of_bytes_that_are_not_utf8_is_refused_401(web, certs):  # noqa: F811
    """aiohttp keeps header bytes that are not UTF-8 as surrogates, which str.encode()
    refused: a 500 "Server got itself in trouble" and a traceback, for a client's bad header."""
    import socket
    import ssl
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    for value in (b"Bearer \xff\xfe\xfd", b"Bearer " + READ.encode()[:-1] + b"\xe9"):
        with socket.create_connection(("127.0.0.1", web.http_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                      b"Authorization: " + value + b"\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401") and b"invalid_token" in answer, answer[:300]
    assert "Traceback" not in web.server.log()


def test_plain_http_on_the_tls_port_gets_nothing(web):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{web.http_port}/dicom-web/studies", timeout=10)


def test_without_tokens_the_port_is_loopback_only(tmp_path):
    cfg = load(None, env={}, overrides={"bind": "0.0.0.0"})
    assert http_bind(cfg) == "127.0.0.1"
    assert http_bind(load(None, env={}, overrides={"bind": "::"})) == "::1"
    (tmp_path / "t.toml").write_text(f'bind = "0.0.0.0"\n[http_tokens.a]\ntoken = "{READ}"\n')
    assert http_bind(load(tmp_path / "t.toml", env={})) == "0.0.0.0"


def test_a_series_retrieved_over_tls_is_byte_exact(web, certs):  # noqa: F811
    """A series of slices, each with pixels of its own, comes back byte-exact over TLS (whose
    transport holds on to what it has not encrypted yet, where the plain one copies: WADO-RS
    reuses a part's buffer only once the transport is done with it)."""
    from io import BytesIO

    import pydicom
    from pydicom.uid import generate_uid

    from conftest import CT, dataset_bytes
    session = requests.Session()
    session.verify, session.trust_env = str(certs / "ca.pem"), False
    session.headers["Authorization"] = f"Bearer {WRITE}"
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    sent = []
    for n in range(12):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        ds.PixelData = bytes([n]) * len(ds.PixelData)  # every slice's bytes its own
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        sent.append(buf.getvalue())
    body = b"".join(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + b + b"\r\n" for b in sent)
    r = session.post(f"{web.base}/studies", data=body + b"--b0undary--\r\n",
                     headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary',
                              "Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    r = session.get(f"{web.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}",
                    headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)
    datasets = []
    for n, b in enumerate(sent):
        (tmp := web.tmp / f"tls-{n}.dcm").write_bytes(b)
        datasets.append(dataset_bytes(tmp))
    assert all(d in r.content for d in datasets)  # each data set as sent (the file meta is the archive's)
