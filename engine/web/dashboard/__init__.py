"""The web pages of the HTTP port: the dashboard at "/" (what the archive holds, how fast
it ingests, what runs in it, a study browser over our own QIDO-RS and WADO-RS: routes.py)
and the OHIF viewer beside it (engine/web/viewer.py)."""
from __future__ import annotations

from aiohttp import web

from stowage.engine.runtime.config import Config


def add_routes(app: web.Application, config: Config, dicomweb_root: str) -> None:
    """Mount the dashboard ("/", /dashboard/...) and the viewer (/viewer, its files) on `app`."""
    from stowage.engine.web import viewer
    from stowage.engine.web.dashboard import routes
    routes.add_routes(app, config, dicomweb_root)
    viewer.add_routes(app, config, dicomweb_root)
