"""An HTTP process with a request in flight leaves new connections to an idle process
(engine/web/process.py, defer_accept_while_busy): two asyncio servers stand in for two
processes on one listening socket over loopback; the "other process" is a thread woken by
select() on the same socket that waits half a second before its accept(), so it takes a
connection only when the event loop leaves it one. The deferral is made long (5 s) where the
other side must win, so that which side takes a connection does not depend on the load."""
from __future__ import annotations

import asyncio
import select
import socket
import threading
import time

from conftest import HOST
from stowage.engine.web.process import defer_accept_while_busy


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


async def _serve(sock: socket.socket, busy: bool, clients: int, others: int, delay: float = 5.0) -> tuple[int, int]:
    """(connections this loop accepted, connections the other side took)."""
    _Counted.accepted = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Counted, sock=sock)
    assert defer_accept_while_busy(loop, sock, lambda: busy, delay=delay)
    got: list = []
    thread = _other_process(sock, others, got) if others else None
    await asyncio.sleep(0.2)  # the other side is in accept()
    port = sock.getsockname()[1]
    conns = [socket.create_connection((HOST, port)) for _ in range(clients)]
    for _ in range(300):  # every connection taken by one side or the other (at most 15 s)
        if len(_Counted.accepted) + len(got) >= clients:
            break
        await asyncio.sleep(0.05)
    if thread is not None:
        thread.join(30)
    mine, theirs = len(_Counted.accepted), len(got)
    for c in conns + got:
        c.close()
    server.close()
    await server.wait_closed()
    return mine, theirs


def test_a_busy_process_leaves_a_new_connection_to_an_idle_one():
    assert asyncio.run(_serve(_listener(), busy=True, clients=1, others=1)) == (0, 1)


def test_an_idle_process_accepts_at_once_and_one_connection_per_wake_up():
    assert asyncio.run(_serve(_listener(), busy=False, clients=1, others=0)) == (1, 0)
    # two clients together: the idle process takes one, leaves the other to the idle thread
    assert asyncio.run(_serve(_listener(), busy=False, clients=2, others=1)) == (1, 1)


def test_a_busy_process_still_accepts_when_no_one_else_does():
    assert asyncio.run(_serve(_listener(), busy=True, clients=1, others=0, delay=0.3)) == (1, 0)
