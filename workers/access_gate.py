"""The access check in front of each DIMSE service handler (policy: engine/receive/access.py):
a request the calling AE may not make is answered 0x0124 Refused: Not Authorized with an
Error Comment, and an audit line; the handler behind it never runs."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom import evt

from stowage.engine.receive.access import Caller, Policy, refusal_comment, refused
from stowage.protocol.status import NOT_AUTHORIZED


def _denied(policy: Policy, assoc: Any, service: str) -> Dataset | None:
    """None when `assoc`'s requestor may use `service`; else the status to answer with."""
    ae_title, address = str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address)
    if policy.allows(ae_title, address, service):
        return None
    comment = refusal_comment(ae_title, address, service, policy)
    refused(Caller(ae_title, address), str(assoc.acceptor.ae_title).strip(), service, comment)
    status = Dataset()
    status.Status = NOT_AUTHORIZED
    status.ErrorComment = comment
    return status


def handler(policy: Policy, service: str, serve: Callable, *args: Any) -> Callable[[evt.Event], Any]:
    """A handler returning one status (C-ECHO, C-STORE) or (status, dataset) (N-ACTION)."""
    pair = service == "commitment"

    def guarded(event: evt.Event) -> Any:
        status = _denied(policy, event.assoc, service)
        if status is None:
            return serve(event, *args)
        return (status, None) if pair else status
    return guarded


def find(policy: Policy, serve: Callable, *args: Any) -> Callable[[evt.Event], Iterator]:
    """The C-FIND handler, a generator of (status, identifier)."""
    def guarded(event: evt.Event) -> Iterator:
        status = _denied(policy, event.assoc, "find")
        if status is None:
            yield from serve(event, *args)
        else:
            yield status, None
    return guarded


def retrieve(policy: Policy, serve: Callable) -> Callable[[Any, Any, Any, type], None]:
    """The C-MOVE / C-GET SCP of protocol/pynetdicom_patches/retrieve_scp.py, called as
    serve(service_class, request, context, C_MOVE or C_GET)."""
    def guarded(service_class: Any, req: Any, context: Any, kind: type) -> None:
        name = "move" if kind.__name__ == "C_MOVE" else "get"
        status = _denied(policy, service_class.assoc, name)
        if status is None:
            return serve(service_class, req, context, kind)
        rsp = kind()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        rsp.Status = NOT_AUTHORIZED
        rsp.ErrorComment = status.ErrorComment
        service_class.dimse.send_msg(rsp, context.context_id)
    return guarded
