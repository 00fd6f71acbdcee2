"""One `stowage serve` with its HTTP port for a whole test module (module-scoped: the
DICOMweb tests share it and its corpus), and a dicomweb-client pointed at it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from pynetdicom import AE
from dicomweb_client.api import DICOMwebClient

from conftest import HOST, Server, free_port, wait_for
from dicomweb_corpus import Corpus, make_corpus


@dataclass
class Web:
    server: Server
    http_port: int
    corpus: Corpus
    tmp: Path
    scheme: str = "http"
    ca: Path | None = None
    token: str | None = None
    metrics_port: int | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.http_port}"

    @property
    def base(self) -> str:
        return f"{self.url}/dicom-web"

    def client(self, **kwargs) -> DICOMwebClient:
        return DICOMwebClient(url=self.base, **kwargs)


def start(tmp: Path, *args: str, corpus: bool = True, http_port: int | None = None, tls: Path | None = None,
          token: str | None = None) -> Web:
    """`tls`: the CA file to verify the server with (the config sets http_tls); `token`:
    one that may read, to see the port answer."""
    port = http_port or free_port()
    server = Server(tmp / "data", free_port(), ["--workers", "1", "--http-port", str(port),
                                                "--http-processes", "2", *args], log_dir=tmp)
    server.start()
    try:  # a module fixture that fails here never reaches its teardown: stop the server ourselves
        made = make_corpus(tmp / "corpus") if corpus else Corpus()
        web = Web(server, port, made, tmp, "https" if tls else "http", tls, token)
        wait_for(lambda: _answers(web), 30, "the HTTP port")
        if made.files:
            c_store(server.port, made.files)
    except BaseException:
        server.kill()
        raise
    return web


def c_store(port: int, files: list[Path]) -> None:
    """C-STORE `files` in the transfer syntax each is in (storescu would convert or refuse)."""
    datasets = [pydicom.dcmread(p) for p in files]
    ae = AE("WEBTEST")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0, status
    finally:
        assoc.release()


def _answers(web: Web) -> bool:
    try:
        r = requests.get(f"{web.base}/studies", timeout=10, verify=str(web.ca) if web.ca else True,
                         headers={"Authorization": f"Bearer {web.token}"} if web.token else {})
        return r.status_code < 500
    except requests.RequestException:
        return False


def parts(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: (headers, body) each."""
    ctype = response.headers["Content-Type"]
    assert ctype.startswith("multipart/related"), ctype
    boundary = next(p.split("=", 1)[1].strip('"') for p in ctype.split(";") if p.strip().startswith("boundary="))
    body = response.content
    assert body.rstrip().endswith(f"--{boundary}--".encode()), "the body is not closed"
    out = []
    for chunk in body.split(f"--{boundary}".encode())[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n") if ": " in line)
        out.append(({k.lower(): v for k, v in headers.items()}, data[:-2] if data.endswith(b"\r\n") else data))
    return out
