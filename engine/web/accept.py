"""The HTTP processes' own accept loop on the listening socket they all share (engine/web/
process.py). asyncio's server accepts up to its backlog at each wake-up, so one process
took both of two clients connecting together while the other sat idle: two concurrent
WADO-RS retrieves landed on one process in 3 rounds out of 4 (docs/benchmarks.md, DICOMweb).
Here a process accepts one connection per wake-up, and while it has a request in flight,
or has just accepted a connection, it leaves a waiting one `delay` seconds to an idle
process (every process is woken for it) before taking it itself. Each accepted socket goes
to the protocol factory (aiohttp's `Server`) through `loop.connect_accepted_socket`, TLS
handshake included: only public asyncio calls.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import ssl
from typing import Callable

from aiohttp import web
from yarl import URL

log = logging.getLogger("stowage.http")

ACCEPT_DEFERRAL_S = 0.01  # long enough for an idle process to be scheduled on a loaded machine
_JUST_ACCEPTED_S = 0.05  # a connection accepted this recently counts as a request about to come
_OUT_OF_RESOURCES_S = 1.0  # asyncio's own pause when accept() fails for want of descriptors or memory
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def deferral_for(processes: int) -> float:
    """How long a busy process leaves a new connection to the others: not at all when it
    is the only one (`http_processes = 1`), where waiting would only delay the client."""
    return ACCEPT_DEFERRAL_S if processes > 1 else 0.0


class AcceptLoop:
    """Accepts connections on `sock` (listening, shared with other processes) one per
    wake-up and hands each to `protocol_factory`; defers while `busy()` or just after an
    accept, as the module says. start() and close() on the event loop's thread."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.BaseProtocol],
                 busy: Callable[[], bool], *, ssl_context: ssl.SSLContext | None = None,
                 delay: float = ACCEPT_DEFERRAL_S) -> None:
        self._sock, self._fd = sock, sock.fileno()
        self._factory, self._busy, self._ssl, self._delay = protocol_factory, busy, ssl_context, delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = -math.inf
        self._handing: set[asyncio.Task] = set()  # accepted, not yet connected (a TLS handshake)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._loop.add_reader(self._fd, self._ready)

    def close(self) -> None:
        """Stop accepting and close this process's descriptor of the socket (the other
        processes keep theirs); the connections accepted already go on."""
        if self._loop is None or self._sock.fileno() < 0:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._fd)
        self._sock.close()

    def _ready(self) -> None:
        if self._busy() or self._loop.time() - self._last < _JUST_ACCEPTED_S:
            self._pause(self._delay)
        else:
            self._take()

    def _pause(self, seconds: float) -> None:
        self._loop.remove_reader(self._fd)
        self._timer = self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        """After a deferral: the connection left to the others is taken here if it is
        still waiting; then back to waiting, the policy applying to the next one afresh."""
        self._timer = None
        if self._take():
            self._loop.add_reader(self._fd, self._ready)

    def _take(self) -> bool:
        """Accept one connection if one is waiting. False when accept() failed for want of
        resources: then paused, as asyncio does (Linux keeps reporting the socket ready)."""
        try:
            conn, _addr = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return True  # another process took it, or its client gave up
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                log.warning("accepting an HTTP connection failed: %s", exc)
                return True
            log.warning("accepting HTTP connections paused %.0f s: %s", _OUT_OF_RESOURCES_S, exc)
            self._pause(_OUT_OF_RESOURCES_S)
            return False
        self._last = self._loop.time()
        task = self._loop.create_task(self._connect(conn))
        self._handing.add(task)
        task.add_done_callback(self._handing.discard)
        return True

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
        except Exception as exc:  # a TLS handshake refused or timed out, a client gone: that connection's only
            log.debug("HTTP connection dropped before its first request: %r", exc)


class AcceptSite(web.BaseSite):
    """An aiohttp site serving `runner`'s application through an AcceptLoop on `sock` (in
    place of web.SockSite, whose asyncio server takes a whole backlog at each wake-up)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, busy: Callable[[], bool], *,
                 ssl_context: ssl.SSLContext | None = None, delay: float = ACCEPT_DEFERRAL_S) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        assert runner.server is not None  # BaseSite checked: runner.setup() was called
        host, port = sock.getsockname()[:2]
        self._site_name = str(URL.build(scheme="https" if ssl_context else "http", host=host, port=port))
        self._accepting = AcceptLoop(sock, runner.server, busy, ssl_context=ssl_context, delay=delay)

    @property
    def name(self) -> str:
        return self._site_name

    async def start(self) -> None:
        await super().start()
        self._accepting.start()

    async def stop(self) -> None:
        self._accepting.close()
        await super().stop()
