"""A pytest plugin that shows `pytest -m unit` needs no peer: with it, DCMTK is never found,
and starting a process, forking, listening on a socket or connecting to one over the
network raises, so a test marked `unit` that needs any of them fails.

    PATH=/nonexistent python -m pytest -m unit -p tests.unit_guard
"""
from __future__ import annotations

import multiprocessing.process
import os
import socket
import subprocess

import pytest


class PeerNeeded(RuntimeError):
    """A test marked unit tried to reach beyond its own process."""


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise PeerNeeded(f"a unit test tried to {what}: mark it integration (docs/testing.md)")
    return refuse


def _inet(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


_saved: dict = {}


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """After every plugin is configured (some run a process of their own then)."""
    from stowage.bench import procs
    _saved.update(popen=subprocess.Popen.__init__, fork=os.fork, spawn=os.posix_spawn,
                  start=multiprocessing.process.BaseProcess.start, listen=socket.socket.listen,
                  connect=socket.socket.connect)
    procs.find_dcmtk.cache_clear()
    procs.find_dcmtk = lambda name: None  # tests/conftest.dcmtk() looks it up here
    subprocess.Popen.__init__ = _refuse("start a process")
    os.fork = _refuse("fork")
    os.posix_spawn = _refuse("spawn a process")
    multiprocessing.process.BaseProcess.start = _refuse("start a process")
    listen, connect = socket.socket.listen, socket.socket.connect

    def guarded_listen(self, *args):
        return _refuse("listen on a socket")() if _inet(self) else listen(self, *args)

    def guarded_connect(self, address):
        return _refuse(f"connect to {address}")() if _inet(self) else connect(self, address)

    socket.socket.listen = guarded_listen
    socket.socket.connect = guarded_connect


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The tests are over: give the reporting plugins their processes back (hypothesis's
    summary imports its entry points, and trio's import runs ldconfig)."""
    if not _saved:
        return
    subprocess.Popen.__init__ = _saved["popen"]
    os.fork, os.posix_spawn = _saved["fork"], _saved["spawn"]
    multiprocessing.process.BaseProcess.start = _saved["start"]
    socket.socket.listen, socket.socket.connect = _saved["listen"], _saved["connect"]
