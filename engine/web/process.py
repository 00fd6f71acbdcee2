"""One HTTP process of `stowage serve`: serves the application of app.py on the listening
socket it inherited from the acceptor (every process accepts on the same socket, so the
kernel spreads connections over them and every core is used). It accepts them with its own
loop (engine/web/accept.py): one connection per wake-up, and a process with a request in
flight lets an idle one take a new connection first; left to the kernel and asyncio, two
concurrent WADO-RS retrieves landed on one process in 3 rounds out of 4 while the other sat
idle (docs/benchmarks.md, DICOMweb).

It stops on SIGTERM (from the acceptor's drain: requests in flight finish) and when the
acceptor dies (the fork server sets PR_SET_PDEATHSIG for it: docs/processes.md), never on SIGINT:
the acceptor decides when we stop.
"""
from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from typing import Callable

import pyarrow as pa
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from stowage.engine.runtime import memory_probe
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.runtime.logs import setup_logging
from stowage.engine.runtime.tls import http_context
from stowage.engine.web.accept import AcceptSite, deferral_for
from stowage.engine.web.app import build_app
from stowage.engine.iceberg.node_segments import read_other_nodes
from stowage.engine.storage.remote import read_from_bucket

log = logging.getLogger("stowage.http")
_SHUTDOWN_TIMEOUT_S = 15.0


def _report(control: socket.socket, stop: Callable[[], None]) -> None:
    """Our counts to the acceptor when they changed, at most once a second (as a worker's);
    the control socket closing means the acceptor is gone: stop."""
    last = b""
    while True:
        readable, _w, _x = select.select([control], [], [], 1.0)
        if readable:
            try:
                if not control.recv(16):
                    stop()
                    return
            except OSError:
                stop()
                return
        report = process_counts.report()
        if report != last:
            try:
                control.send(report)
            except OSError:
                stop()
                return
            last = report


def in_flight(tasks: set[asyncio.Task]) -> Callable:
    """A middleware that keeps the task of every request being handled in `tasks` until it
    is done (its answer written, not only returned by the handler)."""
    @web.middleware
    async def track(request: web.Request, handler: Callable) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return await handler(request)
    return track


async def shut_down(runner: web.AppRunner, site: web.BaseSite, tasks: set[asyncio.Task], timeout: float) -> None:
    """Stop accepting, let the requests in flight finish (at most `timeout`, then cancel them),
    and only then clean up. aiohttp's own wait for a request in flight (its shutdown_timeout)
    races that timeout against the handler's end: when both fall due in one turn of the event
    loop (a loop kept busy, or a pool thread finishing just then) it sets the result of the
    future it has just cancelled and logs InvalidStateError with a traceback. With nothing
    in flight left at cleanup, it never waits."""
    await site.stop()
    runner.server.pre_shutdown()  # idle keep-alive connections close now, busy ones after their answer
    if tasks:
        _done, late = await asyncio.wait(set(tasks), timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d request(s) still running %.0f s after the stop: cancelled", len(late), timeout)
            await asyncio.wait(late, timeout=timeout)
    await runner.cleanup()


def _idle_timeout(config: Config) -> float:
    """How long a connection may sit without a request: before its first one (a client
    that connects and says nothing, or stops in the middle of its request head) and
    between two. aiohttp's default is an hour, so silent clients held a descriptor each
    that long; `network_timeout` is what every other wait on a peer gets."""
    return config.network_timeout if config.network_timeout > 0 else 60.0


def _trace_memory(loop: asyncio.AbstractEventLoop) -> None:
    """The memory probe (engine/runtime/memory_probe.py), dumped on SIGUSR2."""
    dump = memory_probe.start("http")
    if dump is not None:
        loop.add_signal_handler(signal.SIGUSR2, dump)


async def _serve(config: Config, sock: socket.socket, index: int, control: socket.socket) -> None:
    app = build_app(config)
    tasks: set[asyncio.Task] = set()
    app.middlewares.insert(0, in_flight(tasks))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
                           keepalive_timeout=_idle_timeout(config))
    await runner.setup()
    site = AcceptSite(runner, sock, lambda: bool(tasks), ssl_context=http_context(config),
                      delay=deferral_for(config.http_process_count))
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    _trace_memory(loop)
    threading.Thread(target=_report, args=(control, lambda: loop.call_soon_threadsafe(stop.set)),
                     name="report", daemon=True).start()
    log.info("http process %d serving (pid %d)", index, os.getpid())
    await stop.wait()
    await shut_down(runner, site, tasks, _SHUTDOWN_TIMEOUT_S)


class _ClientErrors(logging.Filter):
    """aiohttp logs a request it cannot parse (a bad request line, URL or header, PS3.18
    or not) and a client gone mid-answer with a traceback at ERROR: those are the client's,
    one WARNING line each, without a traceback; our handlers' own errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (HttpProcessingError, ConnectionError)):
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def main() -> None:
    index, fd, control_fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    # Arrow's default pool (mimalloc) kept growing here, not in the workers: its arena held
    # 136 to 205 MiB of an HTTP process in a soak (a worker's 37), and with the system
    # allocator the HTTP processes stood at 391/400 MiB after 28,000 fuzzed cases against
    # 547/492 (docs/fuzzing.md). The fork server runs with ARROW_DEFAULT_MEMORY_POOL=system for
    # Arrow's C++ code; this for pyarrow's calls, should the variable have been set otherwise.
    pa.set_memory_pool(pa.system_memory_pool())
    config = Config.from_dict(json.loads(os.environ["STOWAGE_WORKER_CONFIG"]))
    read_other_nodes(config, read_from_bucket(config))  # segments evicted after their upload, other nodes'
    setup_logging(config, f"http-{index}")
    logging.getLogger("aiohttp.server").addFilter(_ClientErrors())
    faulthandler.enable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    code = 0
    try:
        asyncio.run(_serve(config, sock, index, socket.socket(fileno=control_fd)))
    except Exception:
        log.exception("http process %d failed", index)
        code = 1
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
