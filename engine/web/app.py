"""The HTTP application of `stowage serve`: `build_app(config)`.

Routes, at a glance:

- `/dicom-web/...`  DICOMweb (PS3.18): QIDO-RS, WADO-RS, STOW-RS, DELETE (engine/web/*.py)
- `/wado`           WADO-URI, for legacy viewers
- `/` and `/viewer` left to the dashboard and the OHIF viewer (engine/web/dashboard/,
  engine/web/viewer.py), which mount their routes here.

Every request passes access.middleware (tokens, loopback-only, CORS). Blocking work
(catalog queries, segment reads) runs in the store's executor, off the event loop.
"""
from __future__ import annotations

import logging

from aiohttp import web

from stowage.engine.runtime.config import Config
from stowage.engine.web import (access, dashboard, delete_rs, errors, health, qido, rendered, sending, stable_series,
                                stow, wado, wado_uri)
from stowage.engine.web.context import CONFIG, DICOMWEB
from stowage.engine.web.store import store_context

# Large STOW-RS bodies are streamed (engine/web/stow.py), never read whole: aiohttp's
# client_max_size only bounds request.read()/post(), which nothing of ours uses on them.
_CLIENT_MAX_SIZE = 16 << 20
log = logging.getLogger("stowage.http")


def build_app(config: Config) -> web.Application:
    # the guard outermost: an error of ours in access control too is a 500 with a log reference
    app = web.Application(middlewares=[errors.unexpected(log), access.middleware(config), sending.watched_bodies()],
                          client_max_size=_CLIENT_MAX_SIZE)
    app[CONFIG] = config
    app.on_response_prepare.append(access.add_cors_headers)
    app.cleanup_ctx.append(store_context(config))
    app.cleanup_ctx.append(stable_series.context(config))  # series metadata made once a series is stable
    app.add_routes(qido.routes(DICOMWEB))
    app.add_routes(wado.routes(DICOMWEB))
    app.add_routes(rendered.routes(DICOMWEB))
    app.add_routes(stow.routes(DICOMWEB))
    app.add_routes(delete_rs.routes(DICOMWEB))
    app.add_routes(wado_uri.routes())
    app.add_routes(health.routes())  # for load balancers (ops/haproxy/)
    dashboard.add_routes(app, config, DICOMWEB)  # "/", /dashboard/..., and the OHIF viewer (/viewer)
    return app
