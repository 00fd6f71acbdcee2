"""Refusals over HTTP: a status and a one-line reason a person can act on, as plain text."""
from __future__ import annotations

from aiohttp import web

_BY_STATUS: dict[int, type[web.HTTPException]] = {k.status_code: k for k in (
    web.HTTPBadRequest, web.HTTPUnauthorized, web.HTTPForbidden, web.HTTPNotFound, web.HTTPMethodNotAllowed,
    web.HTTPNotAcceptable, web.HTTPRequestTimeout, web.HTTPConflict, web.HTTPRequestEntityTooLarge,
    web.HTTPUnsupportedMediaType, web.HTTPInternalServerError, web.HTTPServiceUnavailable,
    web.HTTPInsufficientStorage)}


def refusal(status: int, reason: str, headers: dict[str, str] | None = None) -> web.HTTPException:
    """The exception to raise (or return) for `status`, its body saying `reason`."""
    if status == 405:
        return web.HTTPMethodNotAllowed("", [], text=" ".join(reason.split()) + "\n", headers=headers)
    return _BY_STATUS[status](text=" ".join(reason.split()) + "\n", headers=headers)
