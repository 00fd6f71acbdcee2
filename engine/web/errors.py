"""Refusals over HTTP: a status and a one-line reason a person can act on, as plain text."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from aiohttp import web

from stowage.engine.runtime.logs import log_reference

_BY_STATUS: dict[int, type[web.HTTPException]] = {k.status_code: k for k in (
    web.HTTPBadRequest, web.HTTPUnauthorized, web.HTTPForbidden, web.HTTPNotFound, web.HTTPMethodNotAllowed,
    web.HTTPNotAcceptable, web.HTTPRequestTimeout, web.HTTPConflict, web.HTTPRequestEntityTooLarge,
    web.HTTPUnsupportedMediaType, web.HTTPInternalServerError, web.HTTPServiceUnavailable,
    web.HTTPInsufficientStorage)}


def refusal(status: int, reason: str, headers: dict[str, str] | None = None) -> web.HTTPException:
    """The exception to raise (or return) for `status`, its body saying `reason`."""
    if status == 405:
        allowed = [m.strip() for m in (headers or {}).get("Allow", "").split(",") if m.strip()]
        return web.HTTPMethodNotAllowed("", allowed, text=" ".join(reason.split()) + "\n")
    return _BY_STATUS[status](text=" ".join(reason.split()) + "\n", headers=headers)


def unexpected(logger: logging.Logger) -> Callable:
    """Middleware: an error we did not foresee is logged with a reference and answered
    500 with that reference, never with our internals; the process goes on serving."""
    @web.middleware
    async def guard(request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:
            if isinstance(e, ConnectionError) and _client_gone(request):  # a viewer that moved on mid-answer:
                raise  # routine; aiohttp closes the connection quietly
            ref = log_reference(logger, "%s %s failed", request.method, request.path[:200])
            raise refusal(500, f"internal error (archive log reference {ref})") from None
    return guard


def _client_gone(request: web.Request) -> bool:
    """Whether the request's connection is closed or closing: a ConnectionError raised then
    (aiohttp's "Connection lost" from a write, a reset) is the client's leaving, not ours."""
    transport = request.transport
    return transport is None or transport.is_closing()
