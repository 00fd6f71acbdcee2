"""Storage SCP (PS3.4 Annex B, C-STORE): hands the received bytes, untouched, to the
archive. `StorageSCP` is the one adapter both receive paths call, the lean one
(engine/receive/ingest.py) and pynetdicom's (`handle_store`); each keeps only its framing."""
from __future__ import annotations

import io
import logging
from functools import partial

from pydicom.dataset import Dataset
from pynetdicom import evt

from stowage.engine.store.archive import Archive, StoreResult
from stowage.engine.store.segment import FileRange
from stowage.protocol.status import OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS
from stowage.engine.runtime.audit import Trail
from stowage.engine.receive.spill import SpillBuffer

log = logging.getLogger("stowage.store")


class StorageSCP:
    """A received C-STORE request to an `Archive.store` call, its line in the audit trail
    (and the store metrics), and the status and Error Comment of the response."""

    def __init__(self, archive: Archive, trail: Trail) -> None:
        self.archive = archive
        self.trail = trail
        # [projects.NAME]: C-STORE to a project's Called AE title is de-identified first (issue #22).
        # The de-identification chain is imported only when a project is configured: it
        # pulls in pydicom's pixel handlers, about a tenth of a worker's import time.
        self.projects = None
        if archive.config.projects:
            from stowage.engine.deidentify.ingest import Router
            self.projects = Router(archive.config.projects, archive.config.data_dir)

    def store(self, key: int, received: io.BytesIO | bytes, transfer_syntax: str, sop_class: str, sop_instance: str,
              calling_ae: str, called_ae: str) -> StoreResult:
        """Store the dataset in `received` (a buffer, then emptied, or the bytes of a dataset
        that came in one PDV) for the association `key` of the trail; never raises: a bug of ours must not cost the sender its association."""
        dataset: bytes | FileRange = b""
        try:
            if isinstance(received, SpillBuffer) and received.spilled:
                received.close_spool()  # its last bytes reach the disk, or a failed write refuses it
            if isinstance(received, SpillBuffer) and received.refused:  # a spool limit or a failed spool write
                result = StoreResult(OUT_OF_RESOURCES, received.refused)
            else:
                dataset = _dataset(received)
                project = self.projects.for_association(called_ae, calling_ae) if self.projects else None
                store = self.archive.store if project is None else _deidentified(project, self.archive)
                result = store(dataset, transfer_syntax, sop_class, sop_instance,
                               calling_ae=calling_ae, called_ae=called_ae)
        except Exception:
            log.exception("storing %s failed", sop_instance)
            result = StoreResult(PROCESSING_FAILURE, "processing failure; see the archive log")
        finally:
            if isinstance(received, SpillBuffer):
                received.discard()
        if not result.ok:
            log.warning("C-STORE %s from %s refused 0x%04X: %s", sop_instance, calling_ae, result.status,
                        result.comment)
        size = dataset.length if isinstance(dataset, FileRange) else len(dataset)
        self.trail.stored(key, calling_ae, sop_instance, result.status, size, result.comment)
        return result


def _deidentified(project, archive: Archive) -> partial:
    """The project's store call (engine/deidentify/ingest.py), imported with the first project."""
    from stowage.engine.deidentify.ingest import store
    return partial(store, project, archive)


def _dataset(received: io.BytesIO | bytes) -> bytes | FileRange:
    """The dataset bytes exactly as received, never decoded here: in memory, or the spool
    file a large dataset went to."""
    if isinstance(received, bytes):
        return received
    if isinstance(received, SpillBuffer) and received.spilled:
        path, length = received.finish()
        return FileRange(path, 0, length)
    return received.getvalue()


def handle_store(event: evt.Event, scp: StorageSCP) -> int | Dataset:
    """EVT_C_STORE: the request pynetdicom decoded, answered with StorageSCP's status."""
    req, assoc = event.request, event.assoc
    result = scp.store(assoc.dul.socket.trail_key, req.DataSet, str(event.context.transfer_syntax), str(req.AffectedSOPClassUID),
                       str(req.AffectedSOPInstanceUID), assoc.requestor.ae_title, assoc.acceptor.ae_title)
    if result.ok:
        return SUCCESS
    rsp = Dataset()
    rsp.Status = result.status
    rsp.ErrorComment = result.comment[:64]  # LO: 64 characters at most
    return rsp
