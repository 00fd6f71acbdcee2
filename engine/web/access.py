"""Who may use the HTTP port: bearer tokens with scopes, loopback only without tokens,
and CORS for browser clients on other origins.

- Tokens (`http_tokens`): `Authorization: Bearer <token>`, or `?access_token=` (RFC 6750
  2.3, for links a browser opens). GET and HEAD need the "read" scope; POST, PUT and
  DELETE "write". Missing: 401 with `WWW-Authenticate: Bearer`; unknown: 401
  invalid_token; not enough scope: 403 insufficient_scope.
- No token configured: only loopback peers are served (the port is bound to loopback
  too: engine/web/processes.py); others get 403.
- CORS (`http_cors_origins`): a request from an allowed Origin gets it back in
  Access-Control-Allow-Origin; preflights (OPTIONS with Access-Control-Request-Method)
  are answered here, before authentication, as browsers send them without credentials.
"""
from __future__ import annotations

import hmac
from typing import Awaitable, Callable

from aiohttp import web

from stowage.engine.runtime.config import Config
from stowage.engine.web.errors import refusal
from stowage.engine.web.processes import is_loopback

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
_EXPOSED = "Warning, Content-Type, Content-Length, Content-Location, Location, WWW-Authenticate"
_ALLOWED_HEADERS = "Authorization, Content-Type, Accept, Accept-Charset, Cache-Control, X-Requested-With"
TOKEN_NAME = web.RequestKey("stowage.token", str)  # the name of the token that let it in
_ORIGIN = web.RequestKey("stowage.cors_origin", object)  # the CORS origin answered, or None


def scope_for(method: str) -> str:
    return "write" if method.upper() in _WRITE_METHODS else "read"


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("access_token")


def authenticate(config: Config, request: web.Request) -> str:
    """The name of the token that allows this request (or "loopback"); raises a 401/403."""
    if not config.http_tokens:
        peer = request.remote or ""
        if not is_loopback(peer):
            raise refusal(403, f"this archive serves HTTP to loopback clients only ({peer} is not): "
                               "configure http_tokens to serve other hosts")
        return "loopback"
    given = _bearer(request)
    realm = 'Bearer realm="stowage"'
    if not given:
        raise refusal(401, "a bearer token is required (Authorization: Bearer <token>)",
                      {"WWW-Authenticate": realm})
    wanted = scope_for(request.method)
    # bytes a header held that are not UTF-8 come as surrogates: compared as those bytes, not a 500
    offered = given.encode("utf-8", "surrogateescape")
    for token in config.http_tokens.values():
        if hmac.compare_digest(token.token.encode(), offered):
            if wanted not in token.scopes:
                raise refusal(403, f"token {token.name!r} lacks the {wanted!r} scope for {request.method}",
                              {"WWW-Authenticate": f'{realm}, error="insufficient_scope", scope="{wanted}"'})
            return token.name
    raise refusal(401, "unknown bearer token", {"WWW-Authenticate": f'{realm}, error="invalid_token"'})


def _cors_origin(config: Config, request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if not origin or not config.http_cors_origins:
        return None
    if "*" in config.http_cors_origins:
        return origin if config.http_tokens else "*"
    return origin if origin in config.http_cors_origins else None


def _cors_headers(origin: str) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": _EXPOSED}
    if origin != "*":
        headers["Vary"] = "Origin"
    return headers


_PUBLIC = "stowage_public"


def public(handler: Handler) -> Handler:
    """Mark a handler whose answers hold no patient data (the viewer's and the dashboard's
    static files): with tokens configured it is served without one, so that a browser can
    load the page that then sends the token. Without tokens, loopback-only still applies."""
    setattr(handler, _PUBLIC, True)
    return handler


def middleware(config: Config) -> Callable:
    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request[_ORIGIN] = _cors_origin(config, request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if origin is None:
                raise refusal(403, "cross-origin requests from this origin are not allowed (http_cors_origins)")
            return web.Response(status=204, headers={
                **_cors_headers(origin), "Access-Control-Allow-Methods": "GET, HEAD, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": _ALLOWED_HEADERS, "Access-Control-Max-Age": "600"})
        if config.http_tokens and getattr(request.match_info.handler, _PUBLIC, False):
            request[TOKEN_NAME] = "public"
        else:
            request[TOKEN_NAME] = authenticate(config, request)
        return await handler(request)
    return access


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer to an allowed origin carries the CORS headers
    (refusals and streamed answers too)."""
    origin = request.get(_ORIGIN)
    if origin is not None:
        response.headers.update(_cors_headers(origin))
