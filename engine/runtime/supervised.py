"""A helper process of the acceptor's (the background scrub, forwarding): started once
the workers are up, started again `restart_after` seconds after it dies (not while
draining), and stopped on drain. The process is `python -m <module> <parent pid>`, forked
by the fork server (engine/runtime/forkserver/, its parent), and reads the configuration
from the environment variable `config_env`."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable

from stowage.engine.runtime import forkserver
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.forkserver import ForkedProcess, die_with_parent
from stowage.engine.runtime.logs import setup_logging
from stowage.engine.runtime.stop_process import stop_process

log = logging.getLogger("stowage.acceptor")


class SupervisedProcess:
    name = "helper process"      # in log lines: "<name> started", "<name> exited with ..."
    module = ""                  # python -m this
    config_env = ""              # the configuration as JSON in this environment variable
    restart_after = 60.0

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proc: ForkedProcess | None = None
        self._restart_at = 0.0

    def start(self) -> None:
        self.launch()

    def launch(self, detail: str = "") -> None:
        env = dict(os.environ, **{self.config_env: json.dumps(self.config.to_dict())})
        self.proc = forkserver.spawn(self.module, [forkserver.PARENT], env)
        self._restart_at = 0.0
        log.info("%s started (pid %d%s)", self.name, self.proc.pid, detail)

    def poll(self, draining: bool) -> None:
        """Start again one that died, `restart_after` seconds later (not while draining)."""
        now = time.monotonic()
        if self.proc is not None and self.proc.poll() is not None:
            log.error("%s exited with %s; restarting it in %.0f s", self.name, self.proc.returncode,
                      self.restart_after)
            self.proc, self._restart_at = None, now + self.restart_after
        if self.proc is None and self._restart_at and now >= self._restart_at and not draining:
            self.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, timeout)
        self.proc = None


def wait_for_lock(lock: IO, stop: threading.Event, interval: float) -> bool:
    """Take the exclusive flock on `lock`, the one-at-a-time claim of a helper process,
    trying every `interval` seconds while the one of a server killed a moment ago is still
    ending; False if `stop` is set first."""
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if stop.wait(interval):
                return False


def child_start(config_env: str, name: str, nice: int = 0) -> tuple[Config, threading.Event]:
    """The start of a helper process's main(): its configuration (from `config_env`),
    logging as `name`, SIGINT ignored (the acceptor decides when it stops), SIGTERM setting
    the returned event, death with its parent (argv[1]: the fork server, which dies with the
    acceptor; a sending process's forwarding process), and `nice` more niceness."""
    config = Config.from_dict(json.loads(os.environ[config_env]))
    setup_logging(config, name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    die_with_parent(signal.SIGTERM, int(sys.argv[1]))
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    return config, stop


def run_exclusively(lock_path: Path, stop: threading.Event, run: Callable[[], None], name: str) -> None:
    """A helper process's work, one at a time per data directory: take the flock on
    `lock_path` (waiting while a killed server's copy is still ending), `run()`, and on
    an unexpected error log it and exit 1 so that the acceptor restarts the process."""
    with open(lock_path, "a") as lock:
        if not wait_for_lock(lock, stop, 1.0):
            return
        try:
            run()
        except Exception:
            log.exception("%s failed", name)
            logging.shutdown()
            os._exit(1)
    logging.shutdown()
