"""An HTTP process with a request in flight leaves new connections to an idle process
(engine/web/accept.py, AcceptLoop): an event loop and a thread stand in for two processes
on one listening socket over loopback; the "other process" is a thread woken by select() on
the same socket that waits half a second before its accept(), so it takes a connection only
when the event loop leaves it one. The deferral is made long (2-5 s) where the other side
must win, so that which side takes a connection does not depend on the load. Then the
aiohttp application served through the loop (AcceptSite) over TLS, as process.py serves it."""
from __future__ import annotations

import asyncio
import select
import socket
import ssl
import threading
import time

from aiohttp import web

from conftest import HOST
from test_tls import certs  # noqa: F401 (the module-scoped CA and certificates)
from stowage.engine.web.accept import ACCEPT_DEFERRAL_S, AcceptLoop, AcceptSite, deferral_for
from stowage.engine.web.process import in_flight, shut_down


_LAG = 0.5


class _Counted(asyncio.Protocol):
    accepted: list = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _Counted.accepted.append(transport)


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def _other_process(sock: socket.socket, n: int, got: list) -> threading.Thread:
    """A thread taking `n` connections from the shared socket (as an idle process would)."""
    def take() -> None:  # woken as another process's event loop is, then accept()
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            if select.select([sock], [], [], 0.2)[0]:
                time.sleep(_LAG)  # slower to take it than the event loop when that does not defer
                try:
                    got.append(sock.accept()[0])
                except BlockingIOError:  # the process took it first
                    pass
    t = threading.Thread(target=take, daemon=True)
    t.start()
    return t


async def _serve(sock: socket.socket, busy: bool, clients: int, others: int, delay: float = 5.0,
                 apart: float = 0.0) -> tuple[int, int]:
    """(connections this loop accepted, connections the other side took); the clients
    connect together, or `apart` seconds one after the other."""
    _Counted.accepted = []
    accepting = AcceptLoop(sock, _Counted, lambda: busy, delay=delay)
    accepting.start()
    got: list = []
    thread = _other_process(sock, others, got) if others else None
    await asyncio.sleep(0.2)  # the other side is in accept()
    port = sock.getsockname()[1]
    conns = []
    for i in range(clients):
        if i and apart:
            await asyncio.sleep(apart)
        conns.append(socket.create_connection((HOST, port)))
    for _ in range(300):  # every connection taken by one side or the other (at most 15 s)
        if len(_Counted.accepted) + len(got) >= clients:
            break
        await asyncio.sleep(0.05)
    if thread is not None:
        thread.join(30)
    mine, theirs = len(_Counted.accepted), len(got)
    for c in conns + got:
        c.close()
    for t in _Counted.accepted:
        t.close()
    accepting.close()
    return mine, theirs


def test_a_busy_process_leaves_a_new_connection_to_an_idle_one():
    assert asyncio.run(_serve(_listener(), busy=True, clients=1, others=1)) == (0, 1)


def test_an_idle_process_accepts_at_once_and_one_connection_per_wake_up():
    assert asyncio.run(_serve(_listener(), busy=False, clients=1, others=0)) == (1, 0)
    # two clients together: the idle process takes one, leaves the other to the idle thread
    assert asyncio.run(_serve(_listener(), busy=False, clients=2, others=1)) == (1, 1)


def test_a_busy_process_still_accepts_when_no_one_else_does():
    assert asyncio.run(_serve(_listener(), busy=True, clients=1, others=0, delay=0.3)) == (1, 0)


def test_a_lone_process_never_defers():
    """http_processes = 1: nobody to leave a connection to, so no deferral delays it."""
    assert deferral_for(1) == 0.0 and deferral_for(2) == ACCEPT_DEFERRAL_S
    assert asyncio.run(_serve(_listener(), busy=True, clients=1, others=0, delay=deferral_for(1))) == (1, 0)


def test_a_busy_process_defers_again_after_another_took_what_it_left():
    """The deferral is over once the connection it left was taken elsewhere: the next one,
    after it, is left to the other side too (not accepted at once for the deferral spent)."""
    assert asyncio.run(_serve(_listener(), busy=True, clients=2, others=2, delay=2.0, apart=2.5)) == (0, 2)


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def _over_tls(certs_dir) -> tuple[bytes, bytes, bool]:
    """(the answer over TLS, what plain HTTP got, whether a connection after the stop was refused)."""
    tasks: set[asyncio.Task] = set()
    app = web.Application(middlewares=[in_flight(tasks)])
    app.router.add_get("/", _hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs_dir / "server.pem", certs_dir / "server.key")
    sock = _listener()
    port = sock.getsockname()[1]
    site = AcceptSite(runner, sock, lambda: bool(tasks), ssl_context=server_ctx)
    await site.start()
    client_ctx = ssl.create_default_context(cafile=str(certs_dir / "ca.pem"))
    reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ctx)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    plain_r, plain_w = await asyncio.open_connection(HOST, port)
    plain_w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        plain = await asyncio.wait_for(plain_r.read(), 10)
    except ConnectionError:
        plain = b""
    plain_w.close()
    await shut_down(runner, site, tasks, 5)
    try:
        await asyncio.open_connection(HOST, port)
        refused = False
    except ConnectionRefusedError:
        refused = True
    return answer, plain, refused


def test_the_application_is_served_over_tls_and_stops_accepting_on_shut_down(certs):  # noqa: F811
    answer, plain, refused = asyncio.run(_over_tls(certs))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello"), answer
    assert b"HTTP/1.1" not in plain and b"hello" not in plain, plain
    assert refused
