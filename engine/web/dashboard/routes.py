"""The dashboard's routes: "/" (the page), /dashboard/panels (its live part, re-fetched by
the page every few seconds), /dashboard/status.json (the same figures for scripts) and
/dashboard/static/. Pages are rendered here, from Jinja2 templates; the study browser in
the page talks to our QIDO-RS and WADO-RS from the browser."""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from aiohttp import web

from stowage import __version__
from stowage.engine.runtime.config import Config
from stowage.engine.web.access import public
from stowage.engine.web.dashboard.status import Status

HERE = Path(__file__).parent
STATUS_KEY = web.AppKey("dashboard_status", Status)


def _size(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _when(epoch: float | None) -> str:
    if not epoch:
        return "–"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = _size
    env.filters["when"] = _when
    env.filters["thousands"] = lambda n: "–" if n is None else f"{n:,}"
    return env


def add_routes(app: web.Application, config: Config, dicomweb_root: str) -> None:
    """Mount the dashboard on `app` ("/", /dashboard/...)."""
    env = _environment()
    status = Status(config)
    app[STATUS_KEY] = status
    root = dicomweb_root.rstrip("/")

    async def close(_app: web.Application) -> None:
        status.close()
    app.on_cleanup.append(close)

    async def gather() -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, status.gather)

    def render(name: str, s: dict) -> web.Response:
        text = env.get_template(name).render(s=s, chart=json.dumps(s["ingest"]), dicomweb_root=root,
                                             version=__version__)
        return web.Response(text=text, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def page(request: web.Request) -> web.Response:
        return render("page.html", await gather())

    async def panels(request: web.Request) -> web.Response:
        return render("panels.html", await gather())

    async def status_json(request: web.Request) -> web.Response:
        return web.json_response(await gather(), headers={"Cache-Control": "no-store"})

    app.router.add_get("/", page)
    app.router.add_get("/dashboard/panels", panels)
    app.router.add_get("/dashboard/status.json", status_json)
    static = {p.name: p for p in (HERE / "static").iterdir() if p.is_file()}

    @public  # the script and style sheet: loaded before the page's script can send a token
    async def static_file(request: web.Request) -> web.FileResponse:
        path = static.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound(text="no such file")
        return web.FileResponse(path)
    app.router.add_get("/dashboard/static/{name}", static_file)
