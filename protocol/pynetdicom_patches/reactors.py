"""Patches 1, 2 and 10 (the package's docstring): event-driven reactors for both threads of
an association, state-machine errors that abort rather than end the DUL thread, and sends
that give way to the peer's release."""
from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError

from stowage.protocol.pdu import ABORT_SERVICE_PROVIDER, a_abort

log = logging.getLogger("stowage.reactor")
TICK_S = 0.1  # longest wait between timer checks on an association in use
IDLE_TICK_S = 1.0  # ... and once nothing has happened on it for IDLE_AFTER ticks
IDLE_AFTER = 10

_ORIGINAL_DUL_RUN = DULServiceProvider.run_reactor
_ORIGINAL_ASSOC_RUN = Association._run_reactor
_ORIGINAL_STOP_DUL = DULServiceProvider.stop_dul
_ORIGINAL_KILL_DUL = DULServiceProvider.kill_dul
_ORIGINAL_ASSOC_INIT = Association.__init__


def _tick(owner: object, woken: bool) -> float:
    """The next wait of a reactor loop: short while its association is in use, longer once
    it has been idle a second (timers then fire within a second; 100 idle associations
    otherwise wake 2000 times a second)."""
    quiet = 0 if woken else getattr(owner, "_stowage_quiet", 0) + 1
    owner._stowage_quiet = quiet  # type: ignore[attr-defined]
    return IDLE_TICK_S if quiet >= IDLE_AFTER else TICK_S


class NotifyingQueue(queue.Queue):
    """A queue that calls `notify` after every put."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _Wakeup:
    """The DUL thread's wake-up: a self-pipe it can select() on beside its socket."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)

    def set(self) -> None:
        try:
            self.w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or closing

    def drain(self) -> None:
        try:
            while self.r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self.r.close()
        self.w.close()


def make_event_driven(assoc: Association) -> None:
    """Give `assoc` (not started yet) notifying queues so that both reactors can block."""
    if getattr(assoc, "_stowage_ready", None) is not None:
        return
    dul, provider = assoc.dul, assoc.dimse
    wake, ready = _Wakeup(), threading.Event()
    dul._stowage_wake = wake
    assoc._stowage_ready = ready
    _swap(dul, "to_provider_queue", wake.set)
    _swap(dul, "event_queue", wake.set)
    _swap(dul, "to_user_queue", ready.set)
    _swap(provider, "msg_queue", ready.set)


def _swap(owner: Any, name: str, notify: Callable[[], None]) -> None:
    """Replace a queue with a notifying one, keeping what is already in it (e.g. Evt5)."""
    old: queue.Queue = getattr(owner, name)
    new = NotifyingQueue(notify)
    while True:
        try:
            new.put(old.get_nowait())
        except queue.Empty:
            break
    setattr(owner, name, new)


def _dul_wait(dul: DULServiceProvider) -> None:
    wake: _Wakeup | None = getattr(dul, "_stowage_wake", None)
    sock = dul.socket.socket if dul.socket is not None else None
    if wake is None or sock is None or sock.fileno() < 0:
        import time
        time.sleep(dul._run_loop_delay)
        return
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted already: select() cannot see it
        return
    try:
        readable, _, _ = select.select([sock, wake.r], [], [], getattr(dul, "_stowage_tick", TICK_S))
    except (OSError, ValueError):
        return  # the socket closed under us; the loop finds out through Evt17
    dul._stowage_tick = _tick(dul, bool(readable))
    wake.drain()


def dul_run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom's DULServiceProvider.run_reactor, waiting in select() instead of sleeping."""
    if getattr(self, "_stowage_wake", None) is None:
        return _ORIGINAL_DUL_RUN(self)
    try:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                _dul_wait(self)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("DUL failure, aborting the association: %s", exc)
                abort(self)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            _do_action(self, event)
            sleep = False
    finally:
        ready = getattr(self.assoc, "_stowage_ready", None)
        if ready is not None:
            ready.set()  # the association thread notices the DUL is gone at once
        self._stowage_wake.close()


def _do_action(dul: DULServiceProvider, event: str) -> None:
    """One state-machine step. An event the PS3.8 state table has no action for (pynetdicom
    raises) would end the DUL thread with a traceback: typically our own accept or release
    primitive (Evt7, Evt14) arriving after a bad peer already put the association in
    Sta13, awaiting the close. The association is aborted, as the thread's end did before,
    with one log line where it was not closing already (the association's own line says
    it was aborted). After the peer's A-RELEASE-RQ has been handed up, a send_*() waiting
    on the association gives way (10)."""
    releasing = event == "Evt12" and dul.state_machine.current_state == "Sta6"  # AR-2: the peer releases
    try:
        dul.state_machine.do_action(event)
    except InvalidEventError as exc:
        closing = dul.state_machine.current_state == "Sta13"
        log.log(logging.DEBUG if closing else logging.WARNING, "aborting the association: %s", exc)
        abort(dul)
        return
    if releasing:
        _give_way(dul.assoc)


def _give_way(assoc: Association) -> None:
    """10: the peer asked to release (its A-RELEASE indication is queued for the reactor).
    If a send_*() holds the reactor paused, waiting for a response the peer may no longer
    send (PS3.8 Sta7), let the reactor go on: it answers the release, then ends that wait
    (the release branch of `assoc_run_reactor`). A paused reactor looks at nothing: this
    is the only thing that lets it go on."""
    if not assoc._reactor_checkpoint.is_set() and not assoc._sent_release:  # not our own release()
        assoc._reactor_checkpoint.set()


def abort(dul: DULServiceProvider, pdu: bytes | None = None) -> None:
    """Send an A-ABORT (service provider, or `pdu`) if the socket still takes it, and end
    both threads of the association. A send_*() waiting for a response gets "no response"
    now, not at its DIMSE timeout (as pynetdicom's own AA-2, AA-3 and AA-4 do)."""
    try:
        dul.socket.send(pdu or a_abort(ABORT_SERVICE_PROVIDER))
    except Exception:
        pass
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False
    dul.assoc.dimse.msg_queue.put((None, None))
    dul.assoc._kill = True
    dul._kill_thread = True


def assoc_run_reactor(self: Association) -> None:
    """pynetdicom's Association._run_reactor, waiting on an Event instead of sleeping 1 ms."""
    ready: threading.Event | None = getattr(self, "_stowage_ready", None)
    if ready is None:
        return _ORIGINAL_ASSOC_RUN(self)
    while not self._kill:
        # Blocked here the reactor touches nothing, so it counts as paused: a send_*() call
        # that pauses it must not wait for it to come round.
        self._is_paused = True
        if self.dimse.msg_queue.empty() and self.dul.to_user_queue.empty() and self.dul.is_alive():
            self._stowage_tick = _tick(self, ready.wait(getattr(self, "_stowage_tick", TICK_S)))
        else:
            self._stowage_tick = _tick(self, True)
        ready.clear()  # before looking at the queues, so a put after this wakes the next wait
        # pynetdicom's thread serving an N-EVENT-REPORT sets _is_paused False when it ends,
        # even while this thread sits paused here; a release() waiting for the flag would
        # then spin for ever. Keep saying so while paused.
        while not self._reactor_checkpoint.wait(0.01):
            self._is_paused = True
        self._is_paused = False

        # Only requests are the reactor's to serve. pynetdicom's own loop takes whatever is
        # first, so a response that arrives while a send_*() call is pausing the reactor can
        # be taken here and lost (pynetdicom issue #875; frequent against a fast peer).
        context_id, msg = self.dimse.peek_msg()
        if msg is not None and msg.is_valid_request:
            context_id, msg = self.dimse.get_msg(block=False)
            if msg is not None:
                self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            # 10: a send_*() waiting for a response (or about to) gets "no response" now, not
            # at its DIMSE timeout; no longer established, it does not abort.
            self.dimse.msg_queue.put((None, None))
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            log.warning("network timeout reached on an idle association")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def _wake_dul(dul: DULServiceProvider) -> None:
    wake = getattr(dul, "_stowage_wake", None)
    if wake is not None:
        wake.set()


def stop_dul(self: DULServiceProvider) -> bool:
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        _wake_dul(self)  # it may be blocked in select(): do not make stop_dul wait a tick
    return _ORIGINAL_STOP_DUL(self)


def kill_dul(self: DULServiceProvider) -> None:
    _ORIGINAL_KILL_DUL(self)
    _wake_dul(self)


def assoc_init(self: Association, *args: Any, **kwargs: Any) -> None:
    _ORIGINAL_ASSOC_INIT(self, *args, **kwargs)
    make_event_driven(self)  # every association of this process, acceptor or requestor
