"""Every change stowage makes inside pynetdicom, in one place: upgrading pynetdicom means
re-reading this file. `install()` applies them all (once per process, idempotent) and
refuses any pynetdicom but the pinned one; nothing else in stowage assigns into
pynetdicom's modules or classes (tests/test_layering.py checks it).

The patches, why each exists, and what to re-check on upgrade:

1. Event-driven reactors: `Association.__init__`, `Association._run_reactor`,
   `DULServiceProvider.run_reactor`, `.stop_dul`, `.kill_dul`. pynetdicom polls (the DUL
   thread sleeps 1 ms whenever it finds nothing to do, the association thread sleeps 1 ms
   before every look at its DIMSE queue): a C-STORE waits out several sleeps while using a
   fraction of that in CPU, and idle associations wake 1,000 times a second
   (shared/notes/pynetdicom.md, "Latency"; docs/benchmarks.md). Here both threads block
   until there is work: the DUL thread in select() on its socket and a wake-up pipe that
   its queues write to, the association thread on an Event its DIMSE and ACSE queues set;
   a tick bounds each wait so timers (ARTIM, idle) still fire. Associations without our
   queues fall back to the original loops. Re-check: the two loop bodies below are copies
   of 3.0.4's `run_reactor` and `_run_reactor`, changed only where they wait; diff them
   against the new version, and check the queue attributes `make_event_driven` swaps.
   The association loop also takes only requests off the DIMSE queue, so a response
   that arrives while a send_*() call pauses the reactor is not lost (pynetdicom issue
   #875), and keeps `_is_paused` true while paused (an N-EVENT-REPORT thread clears it).
2. State-machine errors (in 1's DUL loop): an event the PS3.8 state table has no action
   for raises `InvalidEventError` in pynetdicom and ends the DUL thread with a traceback;
   we abort the association instead (`_do_action`). Re-check: `fsm.InvalidEventError`.
3. Pending responses in one PDU: `DIMSEServiceProvider.send_msg`. pynetdicom sends each
   DIMSE message as P-DATA primitives of one fragment each and encodes its command set with
   pydicom every time: a C-FIND pending response costs two PDUs, and a C-MOVE or C-GET
   that reports every sub-operation spends as much on its pending responses as on the
   instance it sent (docs/benchmarks.md). C-FIND pendings that fit go as command and
   identifier in two PDVs of one P-DATA-TF (PS3.8 9.3.5), the command set encoded once per
   request; C-MOVE/C-GET pendings are encoded by protocol/dimse.py. Any association that
   watches EVT_DIMSE_SENT goes pynetdicom's way. Re-check: `send_msg`, the primitives'
   attribute names, `dimse_messages.C_FIND_RSP.primitive_to_message`, `dsutils.encode`.
4. C-STORE responses routed to a queue: `DIMSEServiceProvider.receive_primitive`. On an
   association we write C-STOREs on directly (C-GET, engine/transfer/send.py `_DirectLink`) each
   C-STORE-RSP is decoded by struct on the DUL thread and queued (`route`), instead of
   pynetdicom decoding it with pydicom into a validated primitive. Only while routed,
   only a whole command set in one PDV, only a C-STORE-RSP. Re-check: `receive_primitive`
   and `self.message` (a message being reassembled).
5. Our C-MOVE / C-GET SCP: `QueryRetrieveServiceClass._move_scp`, `._get_scp` (the hook
   `retrieve_scp` of `install`, workers/retrieve.py). pynetdicom's own takes only decoded
   `Dataset`s from the handler and opens the sub-association itself
   (shared/notes/pynetdicom.md, "Service handlers"). Re-check: the two methods' names and
   arguments.
6. Received datasets that spill to disk: `pynetdicom.dimse_messages.BytesIO` and
   `pynetdicom.dimse.BytesIO` (the hook `dataset_buffer` of `install`, engine/receive/spill.py),
   so a worker's memory does not grow with instance size (DESIGN.md, invariant 7).
   Re-check: that both modules still create the dataset buffer through a module-level
   `BytesIO`.
7. One connection's socket class: `quick_ack` turns a requestor's `AssociationSocket`
   into one that re-arms TCP_QUICKACK before each read (peers that leave Nagle on would
   otherwise cost a 40 ms delayed ACK per message; shared/notes/pynetdicom.md). Re-check:
   `AssociationSocket.recv`.
8. `_config`: `LOG_HANDLER_LEVEL = "none"` (the standard handlers lock the AE on every
   PDU), `LOG_REQUEST_IDENTIFIERS` / `LOG_RESPONSE_IDENTIFIERS = False` (else every C-FIND
   response is pretty-printed, logged or not), `STORE_SEND_CHUNKED_DATASET = True` (a
   Part-10 file given to `send_c_store` goes out from disk in PDU-sized pieces, untouched).
   Re-check: that the flags still exist and mean the same.
9. Bounded command sets: `DIMSEServiceProvider.receive_primitive` (with 4). pynetdicom
   appends every command fragment (PDVs with the command bit) to one buffer until one has
   the last-fragment bit: a peer that never sends it grows that buffer without end (issue
   #25). With `install(max_command_bytes=...)`, a command set longer than that aborts the
   association (A-ABORT, source service user) before the fragment is kept, and
   `on_command_limit(peer)` is told. Re-check: `DIMSEMessage.decode_msg` (the command
   buffer, `encoded_command_set`) and that `self.message` is None between messages.
10. Sends give way to a release (in 1's loops: `_do_action`, `_give_way` and the release
   branch of the association loop). Every pynetdicom `send_*()` pauses the association's
   reactor (`_reactor_checkpoint`) until its response comes. A peer that asks to release
   meanwhile has sent its A-RELEASE-RQ and may send no more P-DATA (PS3.8 Sta7): that
   response can never come, and pynetdicom left the release unanswered until its DIMSE
   timeout, then aborted; the peer's own release timed out first (30 s for pynetdicom) and
   it aborted too. A Storage Commitment requester releasing right after the N-ACTION-RSP,
   the common case, met this whenever its report was on its way as it released. Here the DUL
   thread, as it hands the A-RELEASE indication up (Sta6 + Evt12, AR-2), lets a reactor
   that a send_*() paused go on; the reactor answers the release (A-RELEASE-RP), marks the
   association released, then ends any wait for a response on it with "no response" (the
   `(None, None)` that pynetdicom's AA-2/3/4 queue when the peer aborts or the connection
   drops, so an abort already ends the wait). The send returns its empty status, with no
   A-ABORT (the association is no longer established); its caller goes on as after a
   DIMSE timeout (workers/commitment.py: a new association). Not while our own release()
   holds the reactor (a release collision stays pynetdicom's), and not for a send made in
   a handler on the association's own thread: the reactor that would answer is the one
   waiting (the DIMSE timeout, then A-ABORT, as before). Re-check: that every send_*()
   waits in `dimse.get_msg(block=True)` between `_reactor_checkpoint.clear()` and `.set()`,
   that only send_*() and release() clear it, `_handle_no_response`,
   `Association._sent_release` (set by `acse.send_release`), and fsm AR-2.
"""
from __future__ import annotations

import io
import logging
import queue
import select
import socket
import ssl
import threading
from typing import Any, Callable

import pynetdicom
import pynetdicom.dimse
import pynetdicom.dimse_messages
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.transport import AssociationSocket

from stowage.protocol import dimse
from stowage.protocol.pdu import ABORT_SERVICE_PROVIDER, A_ABORT_USER, COMMAND, COMMAND_LAST, DATA_LAST, a_abort
from stowage.protocol.status import PENDING, PENDING_STATUSES

PYNETDICOM_VERSION = "3.0.4"  # the version every patch here was written against
RetrieveScp = Callable[[QueryRetrieveServiceClass, Any, Any, type], None]

log = logging.getLogger("stowage.reactor")
TICK_S = 0.1  # longest wait between timer checks on an association in use
IDLE_TICK_S = 1.0  # ... and once nothing has happened on it for IDLE_AFTER ticks
IDLE_AFTER = 10

_ORIGINAL_DUL_RUN = DULServiceProvider.run_reactor
_ORIGINAL_ASSOC_RUN = Association._run_reactor
_ORIGINAL_STOP_DUL = DULServiceProvider.stop_dul
_ORIGINAL_KILL_DUL = DULServiceProvider.kill_dul
_ORIGINAL_ASSOC_INIT = Association.__init__
_ORIGINAL_SEND_MSG = DIMSEServiceProvider.send_msg
_ORIGINAL_RECEIVE = DIMSEServiceProvider.receive_primitive
_retrieve_scp: RetrieveScp | None = None
_max_command_bytes = 0  # 9: 0 until install() is given a limit
_on_command_limit: Callable[[str], None] | None = None


def install(*, dataset_buffer: type[io.BytesIO] | None = None, retrieve_scp: RetrieveScp | None = None,
            max_command_bytes: int = 0, on_command_limit: Callable[[str], None] | None = None) -> None:
    """Apply patches 1-4, 8 and 10 (this process; idempotent), and 6 / 5 when given
    `dataset_buffer` (the class pynetdicom collects received datasets in) or
    `retrieve_scp` (called as `retrieve_scp(service, request, context, C_MOVE or C_GET)`),
    9 when given `max_command_bytes` (`on_command_limit(peer)` is called on each abort).
    7 is per connection (`quick_ack`)."""
    global _retrieve_scp, _max_command_bytes, _on_command_limit
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        raise RuntimeError(f"stowage.protocol.pynetdicom_patches patches pynetdicom {PYNETDICOM_VERSION}; "
                           f"found {pynetdicom.__version__}: re-check every patch it lists, then its pin")
    if Association.__init__ is not _assoc_init:
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.STORE_SEND_CHUNKED_DATASET = True
        Association.__init__ = _assoc_init
        Association._run_reactor = _assoc_run_reactor
        DULServiceProvider.run_reactor = _dul_run_reactor
        DULServiceProvider.stop_dul = _stop_dul
        DULServiceProvider.kill_dul = _kill_dul
        DIMSEServiceProvider.send_msg = _send_msg
        DIMSEServiceProvider.receive_primitive = _receive_primitive
    if dataset_buffer is not None:
        pynetdicom.dimse_messages.BytesIO = dataset_buffer
        pynetdicom.dimse.BytesIO = dataset_buffer
    if max_command_bytes:
        _max_command_bytes, _on_command_limit = max_command_bytes, on_command_limit
    if retrieve_scp is not None:
        _retrieve_scp = retrieve_scp
        QueryRetrieveServiceClass._move_scp = _move_scp
        QueryRetrieveServiceClass._get_scp = _get_scp


# --- 1, 2: event-driven reactors ---------------------------------------------------------

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


def _dul_run_reactor(self: DULServiceProvider) -> None:
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
                _abort(self)
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
        _abort(dul)
        return
    if releasing:
        _give_way(dul.assoc)


def _give_way(assoc: Association) -> None:
    """10: the peer asked to release (its A-RELEASE indication is queued for the reactor).
    If a send_*() holds the reactor paused, waiting for a response the peer may no longer
    send (PS3.8 Sta7), let the reactor go on: it answers the release, then ends that wait
    (the release branch of `_assoc_run_reactor`). A paused reactor looks at nothing: this
    is the only thing that lets it go on."""
    if not assoc._reactor_checkpoint.is_set() and not assoc._sent_release:  # not our own release()
        assoc._reactor_checkpoint.set()


def _abort(dul: DULServiceProvider, pdu: bytes | None = None) -> None:
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


def _assoc_run_reactor(self: Association) -> None:
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


def _stop_dul(self: DULServiceProvider) -> bool:
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        _wake_dul(self)  # it may be blocked in select(): do not make stop_dul wait a tick
    return _ORIGINAL_STOP_DUL(self)


def _kill_dul(self: DULServiceProvider) -> None:
    _ORIGINAL_KILL_DUL(self)
    _wake_dul(self)


def _assoc_init(self: Association, *args: Any, **kwargs: Any) -> None:
    _ORIGINAL_ASSOC_INIT(self, *args, **kwargs)
    make_event_driven(self)  # every association of this process, acceptor or requestor


# --- 3: pending responses in one PDU -----------------------------------------------------

_RETRIEVE_RSP = {C_MOVE: dimse.C_MOVE_RSP, C_GET: dimse.C_GET_RSP}


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    kind = type(primitive)
    if (kind in (C_FIND, C_MOVE, C_GET) and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status in PENDING_STATUSES and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        pdvs = _find_pdvs(self, primitive) if kind is C_FIND else _retrieve_pdvs(primitive, _RETRIEVE_RSP[kind])
        if pdvs:
            pdata = P_DATA()
            pdata.presentation_data_value_list.extend((context_id, pdv) for pdv in pdvs)
            self.dul.send_pdu(pdata)
            return
    _ORIGINAL_SEND_MSG(self, primitive, context_id)


def _find_pdvs(provider: DIMSEServiceProvider, primitive: C_FIND) -> list[bytes]:
    if primitive.Identifier is None:
        return []
    data = primitive.Identifier.getvalue()
    command = _find_command_set(provider, primitive)
    limit = provider.maximum_pdu_size
    if not data or (limit and len(command) + len(data) + 12 > limit):
        return []
    return [bytes([COMMAND_LAST]) + command, bytes([DATA_LAST]) + data]


def _find_command_set(provider: DIMSEServiceProvider, primitive: C_FIND) -> bytes:
    key = (str(primitive.AffectedSOPClassUID), primitive.MessageIDBeingRespondedTo, primitive.Status)
    cache = provider.__dict__.setdefault("_stowage_find_commands", {})
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        msg = C_FIND_RSP()
        msg.primitive_to_message(primitive)
        cache[key] = encode(msg.command_set, True, True)
    return cache[key]


def _retrieve_pdvs(primitive: C_MOVE | C_GET, command_field: int) -> list[bytes]:
    if primitive.Identifier is not None or primitive.NumberOfRemainingSuboperations is None:
        return []
    counts = (primitive.NumberOfRemainingSuboperations, primitive.NumberOfCompletedSuboperations or 0,
              primitive.NumberOfFailedSuboperations or 0, primitive.NumberOfWarningSuboperations or 0)
    command = dimse.retrieve_response(command_field, primitive.MessageIDBeingRespondedTo,
                                      str(primitive.AffectedSOPClassUID), primitive.Status, counts)
    return [bytes([COMMAND_LAST]) + command]


def send_retrieve_pending(provider: DIMSEServiceProvider, context_id: int, kind: type, message_id: int,
                          sop_class: str, counts: tuple[int, int, int, int]) -> bool:
    """Send a C-MOVE or C-GET pending response (remaining, completed, failed, warning
    `counts`) in one PDU, with no pynetdicom primitive (whose setters validate the SOP
    Class UID by regular expression every time); False, sending nothing, if the
    association watches EVT_DIMSE_SENT (pynetdicom's `send_msg` must then be used)."""
    if provider.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return False
    command = retrieve_pending_command(kind, message_id, sop_class, counts)
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, bytes([COMMAND_LAST]) + command))
    provider.dul.send_pdu(pdata)
    return True


def retrieve_pending_command(kind: type, message_id: int, sop_class: str, counts: tuple[int, int, int, int]) -> bytes:
    """The command set of a C-MOVE or C-GET (`kind`) pending response (no identifier)."""
    return dimse.retrieve_response(_RETRIEVE_RSP[kind], message_id, sop_class, PENDING, counts)


# --- 4: C-STORE responses routed to a queue ----------------------------------------------

_ROUTE = "_stowage_store_responses"


def route(assoc: Association) -> "queue.SimpleQueue[tuple[int, int]]":
    """From now on, C-STORE responses on `assoc` arrive here as (Message ID Being
    Responded To, Status)."""
    install()
    q: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    setattr(assoc, _ROUTE, q)
    return q


def unroute(assoc: Association) -> None:
    setattr(assoc, _ROUTE, None)


def _receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
    command = _command_fragment_bytes(primitive) if _max_command_bytes else 0  # 9
    held = getattr(self.message, _COMMAND_BYTES, 0) if command else 0
    if held + command > _max_command_bytes > 0:
        _refuse_command(self)
        return
    q = getattr(self.assoc, _ROUTE, None)
    if q is not None and self.message is None:
        pdvs = primitive.presentation_data_value_list
        if len(pdvs) == 1 and len(pdvs[0][1]) > 1 and pdvs[0][1][0] & COMMAND_LAST == COMMAND_LAST:
            try:
                fields = dimse.decode(pdvs[0][1][1:])
            except dimse.CommandError:
                fields = {}
            if fields.get("command_field") == dimse.C_STORE_RSP and "status" in fields \
                    and "responding_to" in fields:
                q.put((int(fields["responding_to"]), int(fields["status"])))
                return
    try:
        _ORIGINAL_RECEIVE(self, primitive)
    except Exception as e:  # a command set pynetdicom cannot decode (no Command Field, bad values)
        _refuse_undecodable(self, e)
        return
    if command and self.message is not None:  # still being reassembled: keep its running count
        setattr(self.message, _COMMAND_BYTES, held + command)


# --- 5: our C-MOVE / C-GET SCP -----------------------------------------------------------

def _move_scp(self: QueryRetrieveServiceClass, req: C_MOVE, context: Any) -> None:
    assert _retrieve_scp is not None
    _retrieve_scp(self, req, context, C_MOVE)


def _get_scp(self: QueryRetrieveServiceClass, req: C_GET, context: Any) -> None:
    assert _retrieve_scp is not None
    _retrieve_scp(self, req, context, C_GET)


# --- 7: one connection's socket class ----------------------------------------------------

class QuickAckSocket(AssociationSocket):
    """An AssociationSocket that ACKs every read at once (no 40 ms delayed ACK)."""

    def recv(self, nr_bytes: int) -> bytearray:
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except (AttributeError, OSError):
            pass
        return super().recv(nr_bytes)


def quick_ack(sock: AssociationSocket) -> None:
    """Make `sock` (a plain AssociationSocket) ACK every read at once: same state, one
    method more; only this connection."""
    if type(sock) is AssociationSocket:
        sock.__class__ = QuickAckSocket


# --- 9: bounded command sets ------------------------------------------------------------

_COMMAND_BYTES = "_stowage_command_bytes"  # on a DIMSEMessage being reassembled


def _command_fragment_bytes(primitive: Any) -> int:
    """Command-set bytes in a P-DATA primitive (its PDVs with the command bit; one or two)."""
    return sum(len(pdv) - 1 for _cx, pdv in primitive.presentation_data_value_list if pdv and pdv[0] & COMMAND)


def _refuse_undecodable(provider: DIMSEServiceProvider, error: Exception) -> None:
    """pynetdicom raised decoding a message (a command set without a Command Field, say):
    it would end the DUL thread with a traceback and drop the connection unannounced. One
    log line instead, and an A-ABORT (the association's message stream is lost)."""
    assoc = provider.assoc
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    log.warning("peer %s:%s: undecodable DIMSE message (%s: %s); aborting", remote.address, remote.port,
                type(error).__name__, str(error)[:200])
    provider.message = None
    _abort(provider.dul, A_ABORT_USER)
    try:
        provider.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass


def _refuse_command(provider: DIMSEServiceProvider) -> None:
    """The command set being reassembled grew past _max_command_bytes: drop it, abort the
    association and stop reading its socket."""
    assoc = provider.assoc
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    peer = f"{remote.address}:{remote.port}"
    log.warning("peer %s: command set longer than max_command_bytes (%d bytes) without its last fragment; "
                "aborting", peer, _max_command_bytes)
    if _on_command_limit is not None:
        _on_command_limit(peer)
    provider.message = None  # what was buffered goes
    _abort(provider.dul, A_ABORT_USER)
    try:
        provider.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass
