"""The OHIF viewer: `stowage viewer install` fetches the prebuilt `dist/` of the npm package
`@ohif/app` (pinned version and integrity hash) over plain HTTPS, and the HTTP port serves
it beside the dashboard with an `app-config.js` that points at our own DICOMweb.

OHIF's build has its public path compiled in as "/" (every chunk, wasm file and asset is
fetched from the root), so it is served at the root of the HTTP port: its top-level files
and folders by name, its single-page routes under /viewer; "/" stays the dashboard and
DICOMweb keeps its own base path. Same origin as DICOMweb: no CORS needed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from stowage.engine.runtime.config import Config
from stowage.engine.web.access import public

PACKAGE = "@ohif/app"
# 3.13.2 is the newest release whose npm tarball holds the prebuilt app (dist/index.html,
# app-config.js, the bundles); the integrity is the registry's `dist.integrity` for it.
VERSION = "3.13.2"
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
REGISTRY = "https://registry.npmjs.org"
MARKER = ".ohif-version"  # in the installed folder: the version it holds
_TIMEOUT = 60.0
_CHUNK = 1 << 20
# The top-level folders of OHIF's dist/ (served as they are) and the single-page routes.
FOLDERS = ("assets", "ort", "dicom-microscopy-viewer", "customizations")
FILE_RE = r"[A-Za-z0-9_.-]+\.(?:js|css|wasm|json|svg|html|woff2?|ttf|ico|png|txt|map)"

mimetypes.add_type("application/wasm", ".wasm")  # streaming compilation needs the right type


class ViewerInstallError(Exception):
    """The viewer could not be installed; the message says why and what to do."""


@dataclass
class Installed:
    version: str
    directory: Path
    files: int
    bytes: int


def viewer_dir(config: Config) -> Path:
    """Where the viewer lives: `viewer_dir`, else <data_dir>/viewer."""
    return Path(config.viewer_dir) if config.viewer_dir else config.data_dir / "viewer"


def installed_version(directory: Path) -> str | None:
    try:
        return (directory / MARKER).read_text().strip() or None
    except OSError:
        return None


def _get(url: str):
    if not url.startswith(("https://", "http://")):
        raise ViewerInstallError(f"{url}: only http(s) registries are supported")
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "application/json"}),
                                      timeout=_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise ViewerInstallError(f"{url}: the registry answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ViewerInstallError(f"{url}: cannot reach the registry ({getattr(e, 'reason', e)}); "
                                 "check the network or --registry") from None


def tarball_url(registry: str, version: str, integrity: str) -> str:
    """The tarball URL the registry lists for PACKAGE@version, once its integrity matches ours."""
    url = f"{registry.rstrip('/')}/{PACKAGE.replace('/', '%2F')}/{version}"
    with _get(url) as r:
        try:
            dist = json.loads(r.read(4 << 20))["dist"]
            listed, tarball = dist["integrity"], dist["tarball"]
        except (ValueError, KeyError, TypeError):
            raise ViewerInstallError(f"{url}: the registry's answer is not npm package metadata") from None
    if listed != integrity:
        raise ViewerInstallError(f"{PACKAGE} {version}: the registry lists integrity {listed[:27]}…, "
                                 f"stowage pins {integrity[:27]}…; refusing to install it")
    return tarball


def _download(url: str, into: Path, integrity: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise ViewerInstallError(f"integrity {integrity[:20]}…: only sha512 is supported")
    h = hashlib.sha512()
    with _get(url) as r, open(into, "wb") as f:
        try:
            while chunk := r.read(_CHUNK):
                h.update(chunk)
                f.write(chunk)
        except OSError as e:
            raise ViewerInstallError(f"{url}: download failed ({e})") from None
    if base64.b64encode(h.digest()).decode() != expected:
        raise ViewerInstallError(f"{url}: the tarball's sha512 is not the pinned integrity; "
                                 "it was not installed (a corrupted download or a changed package)")


def _unpack(tgz: Path, into: Path) -> tuple[int, int]:
    """package/dist/** of the tarball into `into`: regular files and folders only."""
    files = size = 0
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for m in tar:
                if not m.name.startswith("package/dist/") or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len("package/dist/"):]
                if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                    continue
                m.name = rel
                tar.extract(m, into, filter="data")
                if m.isfile():
                    files, size = files + 1, size + m.size
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ViewerInstallError(f"unpacking {PACKAGE} failed: {e}") from None
    if not (into / "index.html").is_file():
        raise ViewerInstallError(f"{PACKAGE} {tgz.name} holds no prebuilt dist/index.html; pick a version that does")
    return files, size


def install(directory: Path, registry: str = REGISTRY, version: str = VERSION,
            integrity: str = INTEGRITY) -> Installed:
    """Download, check and unpack the viewer into `directory`, replacing what was there
    only once the new one is complete."""
    parent = directory.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".viewer-install-", dir=parent))
    except OSError as e:
        raise ViewerInstallError(f"{parent}: cannot write there ({e.strerror or e})") from None
    try:
        tgz = work / "app.tgz"
        _download(tarball_url(registry, version, integrity), tgz, integrity)
        files, size = _unpack(tgz, work / "dist")
        (work / "dist" / MARKER).write_text(version + "\n")
        old = work / "old"
        if directory.exists():
            os.rename(directory, old)
        os.rename(work / "dist", directory)
        return Installed(version, directory, files, size)
    except OSError as e:
        raise ViewerInstallError(f"{directory}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- serving -----------------------------------------------------------------------------

APP_CONFIG = """/* Written by stowage (engine/web/viewer.py): OHIF reads this archive's DICOMweb. */
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  // No onboarding tour over the first image a radiologist opens.
  customizationService: { 'ohif.tours': { $set: [] } },
  showStudyList: false,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'stowage',
  investigationalUseDialog: { option: 'never' },
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'stowage',
      configuration: {
        friendlyName: 'stowage',
        name: 'stowage',
        wadoUriRoot: window.location.origin + %(root)s,
        qidoRoot: window.location.origin + %(root)s,
        wadoRoot: window.location.origin + %(root)s,
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""

NOT_INSTALLED = """<!doctype html><html><head><meta charset="utf-8"><title>Viewer not installed</title></head>
<body><h1>The viewer is not installed</h1><p>Run <code>stowage viewer install</code> on the archive's
machine (it fetches OHIF {version} from the npm registry into {directory}), then reload this page.</p>
<p><a href="/">Back to the dashboard</a></p></body></html>"""


def add_routes(app: web.Application, config: Config, dicomweb_root: str) -> None:
    """Serve the installed viewer on `app`: /viewer (OHIF's routes), /app-config.js, and
    the dist's own files and folders by name."""
    directory = viewer_dir(config)
    config_js = APP_CONFIG % {"root": json.dumps(dicomweb_root.rstrip("/"))}

    def installed() -> bool:
        return (directory / "index.html").is_file()

    async def index(request: web.Request) -> web.StreamResponse:
        if request.path == "/viewer" and not request.query.get("StudyInstanceUIDs"):
            raise web.HTTPFound("/#studies")  # OHIF shows nothing without a study: pick one there
        if not installed():
            import html
            return web.Response(status=503, content_type="text/html", text=NOT_INSTALLED.format(
                version=VERSION, directory=html.escape(str(directory))))
        return web.FileResponse(directory / "index.html", headers={"Cache-Control": "no-cache"})

    async def app_config(request: web.Request) -> web.Response:
        return web.Response(text=config_js, content_type="application/javascript",
                            headers={"Cache-Control": "no-cache"})

    async def file(request: web.Request) -> web.StreamResponse:
        rel = request.match_info.get("folder", "")
        path = Path(rel, request.match_info["path"]) if rel else Path(request.match_info["path"])
        if ".." in path.parts or path.is_absolute():
            raise web.HTTPNotFound(text="no such file")
        target = directory / path
        if not target.is_file() or target.name == MARKER:
            raise web.HTTPNotFound(text=f"{path}: no such file in the viewer"
                                   + ("" if installed() else " (it is not installed: stowage viewer install)"))
        return web.FileResponse(target)

    # OHIF's files hold no patient data: served without a token (it sends the token, given
    # to it as /viewer?...&token=, with each DICOMweb request).
    index, app_config, file = public(index), public(app_config), public(file)
    app.router.add_get("/viewer", index)
    app.router.add_get(r"/viewer/{tail:.*}", index)
    app.router.add_get("/app-config.js", app_config)
    app.router.add_get(r"/{path:%s}" % FILE_RE, file)
    app.router.add_get(r"/{folder:(?:%s)}/{path:.+}" % "|".join(map(re.escape, FOLDERS)), file)
