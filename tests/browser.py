"""A real browser for the tests: Debian's chromium, headless, driven by selenium through
chromedriver, started once per test session (the `chromium` fixture). WebGL runs on
SwiftShader (`--enable-unsafe-swiftshader`), so the OHIF viewer renders without a GPU.

Also `installed_viewer` (OHIF installed once per session with `stowage viewer install`)
and `web_archive` (one `stowage serve` with its HTTP port and the viewer, holding a CT
pushed by DCMTK storescu), shared by tests/test_viewer.py and tests/test_dashboard.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CT, HOST, Server, dcmtk, free_port, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def chromium():
    """One headless chromium for the session; its console and network logs are readable
    (console_errors, failed_requests), and cleared between uses by `fresh_logs`."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromium-driver are not installed: apt-get install chromium chromium-driver "
                    "(ops/test.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                "--use-angle=swiftshader", "--window-size=1400,1000", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def fresh_logs(driver) -> None:
    """Forget what the browser logged so far (each get_log call drains it)."""
    driver.get_log("browser")
    driver.get_log("performance")


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def failed_requests(driver) -> list[str]:
    """Requests that failed (network error) or were answered 4xx/5xx, from the DevTools
    network events; requests the page itself cancelled are not failures."""
    failed = []
    urls = {}
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif msg["method"] == "Network.responseReceived" and params["response"]["status"] >= 400:
            failed.append(f"{params['response']['status']} {params['response']['url']}")
        elif msg["method"] == "Network.loadingFailed" and not params.get("canceled"):
            failed.append(f"{params.get('errorText')} {urls.get(params['requestId'], params['requestId'])}")
    return failed


@pytest.fixture(scope="session")
def installed_viewer(tmp_path_factory):
    """OHIF installed by `stowage viewer install` from the npm registry (once per session)."""
    data_dir = tmp_path_factory.mktemp("ohif") / "data"
    done = subprocess.run([sys.executable, "-m", "stowage.cli", "viewer", "install", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=300)
    return data_dir / "viewer", done  # where it goes by default (viewer_dir unset)


@dataclass
class WebArchive:
    server: Server
    http_port: int
    study_uid: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


TOKEN = "dashboard-test-token-0123456789"  # the read token of `web_archive_with_token`


def _web_archive(root: Path, viewer: Path, *args: str) -> Server:
    """`stowage serve` with its HTTP port (one process) and the installed viewer, holding
    CT_small.dcm pushed by DCMTK storescu."""
    import pydicom
    http_port = free_port()
    server = Server(root / "data", free_port(), ["--workers", "1", "--http-port", str(http_port),
                                                 "--http-processes", "1", *args],
                    {"STOWAGE_VIEWER_DIR": str(viewer), "STOWAGE_SCRUB_RATE": "off"}, log_dir=root).start()
    archive = WebArchive(server, http_port, str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID))
    try:
        wait_for(lambda: _answers(archive), 60, lambda: f"the HTTP port to answer:\n{server.log()}")
        sent = subprocess.run([dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(server.port), str(CT)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    except BaseException:
        server.kill()
        raise
    return archive


@pytest.fixture(scope="session")
def web_archive(tmp_path_factory, installed_viewer):
    viewer, done = installed_viewer
    assert done.returncode == 0, done.stdout + done.stderr
    root = tmp_path_factory.mktemp("web")
    archive = _web_archive(root, viewer)
    yield archive
    archive.server.kill()
    shutil.rmtree(root / "data", ignore_errors=True)


@pytest.fixture(scope="session")
def web_archive_with_token(tmp_path_factory, installed_viewer):
    """The same, with a bearer token configured (read scope): every client needs it."""
    viewer, done = installed_viewer
    assert done.returncode == 0, done.stdout + done.stderr
    root = tmp_path_factory.mktemp("web-token")
    config = root / "stowage.toml"
    config.write_text(f'[http_tokens.browser]\ntoken = "{TOKEN}"\nscopes = ["read"]\n')
    archive = _web_archive(root, viewer, "--config", str(config))
    yield archive
    archive.server.kill()
    shutil.rmtree(root / "data", ignore_errors=True)


def _answers(archive: WebArchive) -> bool:
    try:
        return archive.get("/dashboard/status.json", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    except OSError:
        return False
