"""Requesting storage commitment as SCU (`stowage send --commit`): N-ACTION to the
destination, then wait for its N-EVENT-REPORT, on our association (kept open until the
report or the timeout) or, with `listen_port`, on a new association it opens to us."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.presentation import build_context

from stowage.engine.transfer.requestor import Peer, PeerError, associate, new_ae
from stowage.engine.store.commitment import SOP_CLASS, WELL_KNOWN_INSTANCE
from stowage.engine.transfer.results import Instance
from stowage.protocol.status import SUCCESS

log = logging.getLogger("stowage.commit")
_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]


class CommitError(RuntimeError):
    """No verdict: the request was refused, or no report came in time."""


@dataclass
class Report:
    transaction_uid: str
    event_type: int = 0
    committed: list[str] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    same_association: bool = True


class _Waiter:
    def __init__(self, transaction_uid: str) -> None:
        self.transaction_uid = transaction_uid
        self.report: Report | None = None
        self.done = threading.Event()

    def on_report(self, event: evt.Event, same: bool) -> tuple[int, None]:
        try:
            info = event.event_information
        except Exception:
            return 0x0110, None
        if str(info.get("TransactionUID", "")) != self.transaction_uid:
            log.warning("commitment report for another transaction %s ignored", info.get("TransactionUID"))
            return 0x0000, None
        report = Report(self.transaction_uid, int(event.event_type or 0), same_association=same)
        report.committed = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
        report.failed = [(str(i.ReferencedSOPInstanceUID), int(i.get("FailureReason", 0x0110)))
                         for i in info.get("FailedSOPSequence", [])]
        self.report = report
        self.done.set()
        return 0x0000, None


def request_commitment(peer: Peer, calling_aet: str, instances: Sequence[Instance], *, timeout: float = 60.0,
                       listen_port: int | None = None, bind: str = "0.0.0.0") -> Report:
    waiter = _Waiter(generate_uid())
    server = None
    if listen_port is not None:
        scp = new_ae(calling_aet, dimse_timeout=timeout)
        scp.add_supported_context(SOP_CLASS, _SYNTAXES, scu_role=True, scp_role=True)
        try:
            server = scp.start_server((bind, listen_port), block=False, evt_handlers=[
                (evt.EVT_N_EVENT_REPORT, waiter.on_report, [False])])
        except OSError as e:
            raise CommitError(f"cannot listen on {bind}:{listen_port} for the report: {e.strerror or e}") from None
    try:
        ae = new_ae(calling_aet, dimse_timeout=timeout)
        try:
            assoc = associate(ae, peer, [build_context(SOP_CLASS, _SYNTAXES)],
                              handlers=[(evt.EVT_N_EVENT_REPORT, waiter.on_report, [True])])
        except PeerError as e:
            raise CommitError(f"{e} (does it offer Storage Commitment Push Model as SCP?)") from None
        try:
            if not any(str(cx.abstract_syntax) == SOP_CLASS for cx in assoc.accepted_contexts):
                raise CommitError(f"{peer} does not offer Storage Commitment Push Model as SCP")
            info = Dataset()
            info.TransactionUID = waiter.transaction_uid
            info.ReferencedSOPSequence = []
            for inst in instances:
                item = Dataset()
                item.ReferencedSOPClassUID = inst.sop_class_uid
                item.ReferencedSOPInstanceUID = inst.sop_instance_uid
                info.ReferencedSOPSequence.append(item)
            status, _reply = assoc.send_n_action(info, 1, SOP_CLASS, WELL_KNOWN_INSTANCE)
            if "Status" not in status:
                raise CommitError(f"{peer} sent no N-ACTION response")
            if int(status.Status) != SUCCESS:
                raise CommitError(f"{peer} refused the request with status 0x{int(status.Status):04X}"
                                  + (f" ({status.ErrorComment})" if "ErrorComment" in status else ""))
            deadline = time.monotonic() + timeout
            while not waiter.done.wait(0.05):
                if time.monotonic() > deadline:
                    raise CommitError(f"no report from {peer} within {timeout:g} s (transaction "
                                      f"{waiter.transaction_uid})" + ("" if listen_port else
                                      "; if it reports on a new association, give --commit-port"))
                if not assoc.is_established and listen_port is None:
                    raise CommitError(f"{peer} closed the association without a report and we do not "
                                      "listen for one (give --commit-port)")
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        if server is not None:
            server.shutdown()
    assert waiter.report is not None
    return waiter.report
