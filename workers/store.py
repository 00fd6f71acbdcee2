"""Storage SCP (C-STORE): hands the received bytes, untouched, to the archive."""
from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom import evt

from stowage.engine.archive import Archive
from stowage.engine.segment import FileRange
from stowage.workers.audit import Trail
from stowage.workers.spill import SpillBuffer

log = logging.getLogger("stowage.store")


def handle_store(event: evt.Event, archive: Archive, trail: Trail) -> int | Dataset:
    req = event.request
    buf = req.DataSet
    try:
        # The dataset bytes exactly as received, never decoded here: in memory, or the
        # spool file a large dataset went to.
        dataset = FileRange(*_spooled(buf)) if isinstance(buf, SpillBuffer) and buf.spilled else buf.getvalue()
        result = archive.store(dataset, str(event.context.transfer_syntax), str(req.AffectedSOPClassUID),
                               str(req.AffectedSOPInstanceUID), calling_ae=event.assoc.requestor.ae_title,
                               called_ae=event.assoc.acceptor.ae_title)
    finally:
        if isinstance(buf, SpillBuffer):
            buf.discard()
    trail.stored(id(event.assoc), event.assoc.requestor.ae_title, str(req.AffectedSOPInstanceUID),
                 result.status, dataset.length if isinstance(dataset, FileRange) else len(dataset),
                 result.comment)
    if result.ok:
        return 0x0000
    log.warning("C-STORE %s from %s refused 0x%04X: %s", req.AffectedSOPInstanceUID,
                event.assoc.requestor.ae_title, result.status, result.comment)
    rsp = Dataset()
    rsp.Status = result.status
    rsp.ErrorComment = result.comment[:64]  # LO: 64 characters at most
    return rsp


def _spooled(buf: SpillBuffer) -> tuple:
    path, length = buf.finish()
    return path, 0, length
