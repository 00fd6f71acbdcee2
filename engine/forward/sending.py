"""The sending process of one destination: `stowage send`'s sending core (engine/transfer/
send.py, `Sender.send_feed`, its associations as threads, as `send` runs them) in a process
of its own, so that the forwarding process's queue bookkeeping and scanner never share a
GIL with the sockets.

The forwarding process's delivering thread (deliver.py) keeps the queue: it hands this
process the entries of a session as record locations over a socket pair, and gets their
outcomes back in batches. Nothing here writes the queue: if this process dies (kill -9), the
entries it had are still pending there and go out again in the next session, oldest first.

Messages (pickled tuples, `multiprocessing.connection`):
- to it: ("open", project, expected, first) starts a session whose associations propose
  the contexts of `expected` (instances as tuples), given `first` to send (as many
  associations open as `first` can use); ("give", instances); ("end",): close the
  associations once what was given is sent; ("cancel",): stop now, the rest untried.
- from it: ("outcomes", [Answer fields as tuples]) about every FLUSH_S while it sends; ("closed",
  [SOP Instance UIDs given but not attempted]) once the session's associations are closed.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from stowage.engine.runtime.config import Config
from stowage.engine.runtime.stop_process import stop_process

log = logging.getLogger("stowage.forward")

FLUSH_S = 0.05  # outcomes go back this often (the delivering thread settles them every 0.2 s)
CONFIG_ENV = "STOWAGE_FORWARD_CONFIG"  # the forwarding process's own, passed on


class Answer(NamedTuple):
    """An instance's outcome as it crosses the pipe (engine/transfer/send.py `Outcome`, but
    the instance named by its UID only)."""

    sop_instance_uid: str
    state: str  # "completed" | "warning" | "failed"
    status: int | None
    reason: str
    sent_as: str
    sent_uid: str


class SendingDied(RuntimeError):
    """The sending process ended (killed, crashed) while a session was open."""


# -- the forwarding process's side ------------------------------------------------------

class SendingProcess:
    """The delivering thread's handle on its destination's sending process: started when
    first needed and again after it died. Started from the delivering thread, whose death
    (with the forwarding process's) sends it SIGTERM (PR_SET_PDEATHSIG follows the thread)."""

    def __init__(self, config: Config, destination: str) -> None:
        self.config, self.destination = config, destination
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.ended: str | None = None  # why its pipe closed, once it did

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self) -> None:
        """Running: started if it is not (or died)."""
        if self.running():
            return
        self.close()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env.setdefault(CONFIG_ENV, json.dumps(self.config.to_dict()))
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), self.destination,
                                          str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env)
        finally:
            theirs.close()
        self.conn, self.ended = Connection(ours.detach()), None
        log.info("forward: sending process for %s started (pid %d)", self.destination, self.proc.pid)

    def send(self, *message: Any) -> None:
        assert self.conn is not None
        try:
            self.conn.send(message)
        except OSError as e:  # BrokenPipeError, ConnectionResetError: it is gone
            raise SendingDied(str(e)) from None

    def receive(self, timeout: float) -> list[tuple]:
        """The messages that came within `timeout` (waiting only for the first)."""
        assert self.conn is not None
        if self.ended is not None:
            raise SendingDied(self.ended)
        out: list[tuple] = []
        try:
            while self.conn.poll(timeout if not out else 0):
                out.append(self.conn.recv())
        except (EOFError, OSError) as e:
            self.ended = str(e) or "its pipe closed"
            if not out:  # else those first: outcomes it sent before it died count
                raise SendingDied(self.ended) from None
        return out

    def exit_status(self) -> str:
        if self.proc is None:
            return "not started"
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def close(self, timeout: float = 5.0) -> None:
        """Stopped (SIGTERM, then SIGKILL) and reaped."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            stop_process(self.proc, timeout)
            self.proc = None


# -- the sending process ----------------------------------------------------------------

class _Session:
    """One session's `send_feed` in a thread of its own, its outcomes sent back by another
    every FLUSH_S, so that the reading of messages (the main thread) never waits on a write
    (and the two processes never wait on each other's full pipe)."""

    def __init__(self, conn: Connection, lock: threading.Lock, feed, stop: threading.Event) -> None:
        self.conn, self.lock, self.feed, self.stop = conn, lock, feed, stop
        self.sender = None  # set by _Child.open: it reports to this session's on_outcome
        self.outcomes: deque = deque()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name="forward-send", daemon=True)
        self.flusher = threading.Thread(target=self._flush_loop, name="forward-flush", daemon=True)

    def start(self) -> None:
        self.flusher.start()  # first: the sending thread joins it when it ends
        self.thread.start()

    def on_outcome(self, o) -> None:
        # A plain tuple: this module is __main__ here, so its classes do not unpickle there.
        self.outcomes.append((o.instance.sop_instance_uid, o.state, o.status, o.reason, o.sent_as, o.sent_uid))

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set() or self.stop.is_set()

    def _send(self, message: tuple) -> None:
        with self.lock:
            self.conn.send(message)

    def _flush(self) -> None:
        batch = []
        while self.outcomes:
            batch.append(self.outcomes.popleft())
        if batch:
            self._send(("outcomes", batch))

    def _flush_loop(self) -> None:
        try:
            while not self.finished.wait(FLUSH_S):
                self._flush()
        except OSError:  # the forwarding process is gone: so are we, soon
            self.cancelled.set()

    def _run(self) -> None:
        from stowage.engine.transfer.results import SendResult
        result = SendResult()
        try:
            result = self.sender.send_feed(self.feed)
        except Exception:
            log.exception("forward: sending failed")
            result.remaining.extend(self.feed.drain())
        finally:
            self.finished.set()
            self.flusher.join()
            try:
                self._flush()
                self._send(("closed", [i.sop_instance_uid for i in result.remaining]))
            except OSError:
                pass


class _Child:
    """The sending process's state: its configuration, the projects it opened, the session."""

    def __init__(self, config: Config, destination: str, conn: Connection, stop: threading.Event) -> None:
        self.config, self.destination, self.conn, self.stop = config, destination, conn, stop
        self.lock = threading.Lock()
        self.projects: dict = {}
        self.session: _Session | None = None

    def open(self, project: str, expected: list[tuple], first: list[tuple]) -> None:
        from stowage.engine.transfer.requestor import peer_of
        from stowage.engine.transfer.results import Instance
        from stowage.engine.transfer.send import Sender
        from stowage.engine.transfer.work import Feed
        c = self.config
        remote = c.remotes[self.destination]
        feed = Feed([Instance(*i) for i in expected])
        feed.give([Instance(*i) for i in first])  # before send_feed: it opens as many associations as these use
        rewrite = None
        if project:
            from stowage.engine.forward.deidentified import rewrite_for
            if project not in self.projects:
                from stowage.engine.deidentify.project import open_project
                self.projects[project] = open_project(c.projects, project, c.data_dir)
            rewrite = rewrite_for(self.projects[project])
        session = _Session(self.conn, self.lock, feed, self.stop)
        session.sender = Sender(c.data_dir / "segments", peer_of(remote), c.aet, dimse_timeout=c.dimse_timeout,
                                acse_timeout=c.acse_timeout, max_pdu=c.max_pdu, associations=remote.associations,
                                duplicates=c.duplicates, max_inflated_bytes=c.max_inflated_bytes, rewrite=rewrite,
                                on_outcome=session.on_outcome, cancelled=session.is_cancelled)
        self.session = session
        session.start()

    def handle(self, message: tuple) -> None:
        from stowage.engine.transfer.results import Instance
        kind, s = message[0], self.session
        if kind == "open":
            if s is not None:
                s.thread.join()  # the delivering thread opens only after "closed": never waits here
            try:
                self.open(message[1], message[2], message[3])
            except Exception as e:  # e.g. the project's key unreadable: nothing goes out, all untried
                log.warning("forward: a session to %s could not start: %s", self.destination, e)
                self.session = None
                with self.lock:
                    self.conn.send(("closed", [i[0] for i in message[3]]))
        elif s is None or s.finished.is_set():
            return  # given or ended after its session closed: the delivering thread knows them untried
        elif kind == "give":
            s.feed.give([Instance(*i) for i in message[1]])
        elif kind == "end":
            s.feed.end()
        elif kind == "cancel":
            s.cancelled.set()
            s.feed.end()

    def close(self) -> None:
        if self.session is not None:
            self.session.cancelled.set()
            self.session.feed.end()
            self.session.thread.join(self.config.dimse_timeout)
        for project in self.projects.values():
            project.close()


def main() -> None:
    from stowage.engine.runtime.supervised import child_start
    from stowage.engine.storage.remote import read_from_bucket
    config, stop = child_start(CONFIG_ENV, "forward-send")  # its niceness is the delivering thread's
    destination, fd = sys.argv[2], int(sys.argv[3])
    read_from_bucket(config)
    logging.getLogger("stowage.send").setLevel(logging.ERROR)  # deliver.py logs per attempt
    conn = Connection(fd)
    child = _Child(config, destination, conn, stop)
    try:
        while not stop.is_set():
            try:
                if not conn.poll(0.5):
                    continue
                message = conn.recv()
            except (EOFError, OSError):  # the forwarding process closed its end or is gone
                break
            child.handle(message)
    finally:
        child.close()
        logging.shutdown()


if __name__ == "__main__":
    main()
