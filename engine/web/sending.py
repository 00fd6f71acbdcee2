"""Sending answers to clients that may stop reading: StreamedResponse (streamed answers:
WADO-RS, frames, bulk data, large QIDO-RS) and a middleware that sends every large
ready-made body through it (metadata, QIDO-RS), so that a client that takes nothing for
`network_timeout` is let go whatever it asked for."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from aiohttp import web

from stowage.engine.web.context import CONFIG

log = logging.getLogger("stowage.http")
LARGE_BODY = 256 << 10  # ready-made bodies from this size on are sent watched (smaller fit the socket's buffers)


class StreamedResponse(web.StreamResponse):
    """A StreamResponse that sends no body to a HEAD request, and gives up on a client that
    takes nothing for `network_timeout`.

    - aiohttp leaves the body out of a HEAD answer for web.Response only; a StreamResponse
      writes whatever it is given, and a client reads those bytes as the beginning of the
      next answer on its keep-alive connection (RFC 9110 9.3.2: a HEAD answer has no content).
    - aiohttp waits for a full socket to drain without a limit: a client that stopped
      reading held its request, and the instances read ahead for it (100 MB and more),
      until it went away, which might be never. A write whose bytes the client has not
      taken any of for that long closes the connection, and the handler ends as for a
      client gone mid-answer. A slow client that keeps reading is never cut.
    """

    _head_only = False
    _send_timeout: float | None = None
    _request: web.BaseRequest | None = None

    async def prepare(self, request: web.BaseRequest):
        self._request, self._head_only = request, request.method == "HEAD"
        config = request.app.get(CONFIG) if isinstance(request, web.Request) else None
        if config is not None and config.network_timeout > 0:
            self._send_timeout = config.network_timeout
        return await super().prepare(request)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._head_only:
            return
        transport = self._request.transport if self._request is not None else None
        if self._send_timeout is None or transport is None:
            await super().write(data)
            return
        watch = _StallWatch(self._request, transport, self._send_timeout)
        try:
            await super().write(data)
        finally:
            watch.cancel()


class _StallWatch:
    """Looks at the transport's send buffer every `seconds` while one write waits on it: a
    buffer that has not shrunk over a whole period (the client took no byte of it) is a
    stalled client, whose connection is aborted (the write then raises ConnectionResetError)."""

    def __init__(self, request: web.BaseRequest, transport: asyncio.Transport, seconds: float) -> None:
        self.request, self.transport, self.seconds = request, transport, seconds
        self.last: int | None = None
        self.loop = asyncio.get_running_loop()
        self.handle = self.loop.call_later(seconds, self._look)

    def _look(self) -> None:
        size = self.transport.get_write_buffer_size()
        if self.last is not None and size and size >= self.last:
            log.warning("%s %s: the client (%s) took nothing for %g s: connection closed", self.request.method,
                        self.request.path[:200], self.request.remote, self.seconds)
            self.transport.abort()
            return
        self.last = size
        self.handle = self.loop.call_later(self.seconds, self._look)

    def cancel(self) -> None:
        self.handle.cancel()


def watched_bodies() -> Callable:
    """Middleware: a large web.Response (series metadata, a QIDO-RS answer) is sent through
    a StreamedResponse, which lets go of a client that stopped reading; aiohttp would wait
    on its socket for ever, the body held."""
    @web.middleware
    async def watch(request: web.Request, handler: Callable) -> web.StreamResponse:
        response = await handler(request)
        body = response.body if type(response) is web.Response else None
        if not isinstance(body, (bytes, bytearray)) or len(body) < LARGE_BODY or response.prepared:
            return response
        out = StreamedResponse(status=response.status, reason=response.reason, headers=response.headers)
        out.content_length = len(body)
        await out.prepare(request)
        await out.write(body)
        await out.write_eof()
        return out
    return watch
