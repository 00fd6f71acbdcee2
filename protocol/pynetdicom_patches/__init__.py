"""Every change stowage makes inside pynetdicom, in one place: upgrading pynetdicom means
re-reading this package (a module per patch family: reactors.py 1, 2 and 10; pending.py 3;
receive.py 4 and 9; retrieve_scp.py 5; quick_ack.py 7; 6 and 8 are in `install` below).
`install()` applies them all (once per process, idempotent) and
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
   association we write C-STOREs on directly (C-GET, engine/transfer/links.py `DirectLink`) each
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
import queue
from typing import Callable

import pynetdicom
import pynetdicom.dimse
import pynetdicom.dimse_messages
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.service_class import QueryRetrieveServiceClass

from stowage.protocol.pynetdicom_patches import pending, receive, reactors, retrieve_scp as scp
from stowage.protocol.pynetdicom_patches.pending import retrieve_pending_command, send_retrieve_pending
from stowage.protocol.pynetdicom_patches.quick_ack import quick_ack
from stowage.protocol.pynetdicom_patches.receive import unroute
from stowage.protocol.pynetdicom_patches.retrieve_scp import RetrieveScp

__all__ = ["PYNETDICOM_VERSION", "install", "quick_ack", "retrieve_pending_command", "route",
           "send_retrieve_pending", "unroute"]

PYNETDICOM_VERSION = "3.0.4"  # the version every patch here was written against


def install(*, dataset_buffer: type[io.BytesIO] | None = None, retrieve_scp: RetrieveScp | None = None,
            max_command_bytes: int = 0, on_command_limit: Callable[[str], None] | None = None) -> None:
    """Apply patches 1-4, 8 and 10 (this process; idempotent), and 6 / 5 when given
    `dataset_buffer` (the class pynetdicom collects received datasets in) or
    `retrieve_scp` (called as `retrieve_scp(service, request, context, C_MOVE or C_GET)`),
    9 when given `max_command_bytes` (`on_command_limit(peer)` is called on each abort).
    7 is per connection (`quick_ack`)."""
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        raise RuntimeError(f"stowage.protocol.pynetdicom_patches patches pynetdicom {PYNETDICOM_VERSION}; "
                           f"found {pynetdicom.__version__}: re-check every patch it lists, then its pin")
    if Association.__init__ is not reactors.assoc_init:
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.STORE_SEND_CHUNKED_DATASET = True
        Association.__init__ = reactors.assoc_init
        Association._run_reactor = reactors.assoc_run_reactor
        DULServiceProvider.run_reactor = reactors.dul_run_reactor
        DULServiceProvider.stop_dul = reactors.stop_dul
        DULServiceProvider.kill_dul = reactors.kill_dul
        DIMSEServiceProvider.send_msg = pending.send_msg
        DIMSEServiceProvider.receive_primitive = receive.receive_primitive
    if dataset_buffer is not None:
        pynetdicom.dimse_messages.BytesIO = dataset_buffer
        pynetdicom.dimse.BytesIO = dataset_buffer
    if max_command_bytes:
        receive.limit_command_sets(max_command_bytes, on_command_limit)
    if retrieve_scp is not None:
        scp.handler = retrieve_scp
        QueryRetrieveServiceClass._move_scp = scp.move_scp
        QueryRetrieveServiceClass._get_scp = scp.get_scp


def route(assoc: Association) -> "queue.SimpleQueue[tuple[int, int]]":
    """From now on, C-STORE responses on `assoc` arrive in the returned queue as (Message
    ID Being Responded To, Status): patch 4, installed first."""
    install()
    return receive.route(assoc)
