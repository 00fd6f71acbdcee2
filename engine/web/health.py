"""`GET /healthz`: whether this HTTP process answers, for a load balancer's health check
(ops/haproxy/haproxy.cfg). It holds no patient data, so it needs no token."""
from __future__ import annotations

from aiohttp import web

from stowage.engine.web.access import public


@public
async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})


def routes() -> list[web.RouteDef]:
    return [web.get("/healthz", healthz)]
