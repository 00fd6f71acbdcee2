"""`stowage viewer install` (the pinned OHIF from the npm registry, its integrity checked)
and the viewer served by the HTTP port beside the dashboard."""
from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import HOST

from stowage.engine.web import viewer as ohif


def test_install_fetches_the_pinned_ohif_and_unpacks_its_prebuilt_app(installed_viewer):
    where, done = installed_viewer
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 1 and f"installed OHIF {ohif.VERSION}" in done.stdout
    assert (where / ohif.MARKER).read_text().strip() == ohif.VERSION
    index = (where / "index.html").read_text()
    bundle = next(where.glob("app.bundle.*.js"))
    assert bundle.name in index and "app-config.js" in index
    assert (where / "assets").is_dir() and not list(where.parent.glob(".viewer-install-*"))


class _Registry:
    """A local npm registry answering with the given metadata and tarball bytes."""

    def __init__(self, integrity: str, tarball: bytes) -> None:
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.endswith(".tgz"):
                    body = tarball
                else:
                    body = json.dumps({"name": ohif.PACKAGE, "version": ohif.VERSION, "dist": {
                        "integrity": integrity, "tarball": f"{registry.url}/app.tgz"}}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _tarball(index: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/dist/index.html")
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))
    return out.getvalue()


def _install(target: Path, registry: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", "viewer", "install", "--dir", str(target),
                           "--registry", registry, "--data-dir", str(target.parent / "data")],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def earlier_install(tmp_path) -> Path:
    where = tmp_path / "viewer"
    where.mkdir()
    (where / "index.html").write_text("the viewer installed before")
    return where


@pytest.mark.parametrize("case", ["registry lists another hash", "tarball is not what the hash says"])
def test_install_refuses_what_the_pinned_hash_does_not_match(case, earlier_install):
    """A changed package or a corrupted download: one line, exit 1, the earlier install untouched."""
    tarball = _tarball(b"<html>not the OHIF we pinned</html>")
    if case == "registry lists another hash":
        listed = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
        expected = "refusing to install it"
    else:
        listed, expected = ohif.INTEGRITY, "sha512 is not the pinned integrity"
    registry = _Registry(listed, tarball)
    try:
        done = _install(earlier_install, registry.url)
    finally:
        registry.close()
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (earlier_install / "index.html").read_text() == "the viewer installed before"
    assert not list(earlier_install.parent.glob(".viewer-install-*"))


def test_install_without_a_registry_says_so(tmp_path):
    done = _install(tmp_path / "viewer", f"http://{HOST}:9")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "cannot reach the registry" in done.stderr and not (tmp_path / "viewer").exists()


def test_the_http_port_serves_the_viewer_with_an_app_config_for_our_dicomweb(web_archive):
    status, headers, body = web_archive.get(f"/viewer?StudyInstanceUIDs={web_archive.study_uid}")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"app-config.js" in body
    status, headers, body = web_archive.get("/app-config.js")
    assert status == 200 and "javascript" in headers["Content-Type"]
    assert b"window.location.origin + \"/dicom-web\"" in body and b"defaultDataSourceName: 'stowage'" in body
    status, headers, body = web_archive.get("/viewer")  # no study: the dashboard's study browser
    assert status == 200 and b'id="study-search"' in body
    status, headers, _ = web_archive.get("/assets/favicon.ico")
    assert status == 200
    status, headers, body = web_archive.get("/dashboard/static/dashboard.js")
    assert status == 200 and b"StudyInstanceUIDs" in body
    for trick in ("/assets/..%2F..%2F..%2Fetc%2Fpasswd", "/assets/%2E%2E/%2E%2E/etc/passwd", "/no-such-file.js",
                  f"/{ohif.MARKER}.js"):
        status, _, body = web_archive.get(trick)
        assert status == 404 and b"root:" not in body, trick


@pytest.mark.integration  # it listens on a loopback port
def test_the_viewer_not_installed_says_how_to_install_it(tmp_path):
    """The HTTP application (engine/web/app.py) on a loopback port, no viewer installed."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from stowage.engine.runtime.config import Config
    from stowage.engine.web.app import build_app

    async def ask() -> list[tuple[int, str]]:
        app = build_app(Config(data_dir=tmp_path / "data", viewer_dir=str(tmp_path / "nothing")))
        async with TestClient(TestServer(app, host=HOST)) as client:
            out = []
            for path in ("/viewer?StudyInstanceUIDs=1.2.3", "/app.bundle.0123.js"):
                r = await client.get(path)
                out.append((r.status, await r.text()))
            return out
    (status, page), (missing, text) = asyncio.run(ask())
    assert status == 503 and "stowage viewer install" in page and ohif.VERSION in page
    assert missing == 404 and "stowage viewer install" in text
