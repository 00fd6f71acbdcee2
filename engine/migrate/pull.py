"""Pulling one study from the source: C-MOVE to the running archive, or C-GET with the
C-STOREs received here, on the lean path (engine/receive/get_scu.py), and stored through
engine.store.archive.Archive (in a slot of our own).

Stall: no response for --stall-timeout (pynetdicom's DIMSE timeout for C-MOVE, the
socket's for C-GET), or Pending responses without a sub-operation done for that long.
Either way the association is aborted (which ends the retrieve at the source) and the
study counts as failed-and-busy: it is retried after a longer back-off.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.uid import (AllTransferSyntaxes, BasicTextSRStorage, BreastTomosynthesisImageStorage, CTImageStorage,
                         ComprehensiveSRStorage, ComputedRadiographyImageStorage,
                         DigitalMammographyXRayImageStorageForPresentation, DigitalXRayImageStorageForPresentation,
                         EncapsulatedPDFStorage, EnhancedSRStorage, EnhancedUSVolumeStorage, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, GrayscaleSoftcopyPresentationStateStorage, ImplicitVRLittleEndian,
                         MRImageStorage, NuclearMedicineImageStorage, PositronEmissionTomographyImageStorage,
                         RTDoseStorage, RTImageStorage, RTPlanStorage, RTStructureSetStorage,
                         SecondaryCaptureImageStorage, SegmentationStorage, UltrasoundImageStorage,
                         UltrasoundMultiFrameImageStorage, XRayAngiographicImageStorage,
                         XRayRadiofluoroscopicImageStorage)
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from stowage.engine.migrate.source import Session, SourceError
from stowage.engine.transfer.requestor import Peer
from stowage.protocol import store_scu
from stowage.protocol.status import OUT_OF_RESOURCES_STATUSES, PENDING_STATUSES, SUCCESS
from stowage.engine.receive.get_scu import GetAssociation, SubOperations
from stowage.engine.receive.store import StorageSCP

log = logging.getLogger("stowage.migrate")
MAX_CONTEXTS = 128
_KINDS = ("Completed", "Failed", "Warning")
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
# When we do not know a study's SOP classes, the C-GET proposes these (one context each).
COMMON_CLASSES = (CTImageStorage, MRImageStorage, ComputedRadiographyImageStorage,
                  DigitalXRayImageStorageForPresentation, UltrasoundImageStorage, SecondaryCaptureImageStorage,
                  PositronEmissionTomographyImageStorage, NuclearMedicineImageStorage,
                  XRayAngiographicImageStorage, XRayRadiofluoroscopicImageStorage,
                  DigitalMammographyXRayImageStorageForPresentation, BasicTextSRStorage, EnhancedSRStorage,
                  ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage, RTImageStorage, RTDoseStorage,
                  RTStructureSetStorage, RTPlanStorage, SegmentationStorage, EncapsulatedPDFStorage,
                  UltrasoundMultiFrameImageStorage, EnhancedUSVolumeStorage, BreastTomosynthesisImageStorage)


@dataclass
class Pulled:
    """How a C-MOVE or C-GET ended."""

    status: int | None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    comment: str = ""
    stalled: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS and not self.failed

    @property
    def busy(self) -> bool:
        return self.stalled or self.status in OUT_OF_RESOURCES_STATUSES  # the source is struggling: slow down

    def describe(self) -> str:
        if self.stalled:
            return self.comment
        what = "no final response" if self.status is None else f"status 0x{self.status:04X}"
        text = f"{what}; {self.completed} completed, {self.failed} failed, {self.warning} warning"
        return f"{text}: {self.comment}" if self.comment else text


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword, None)
    try:
        return int(value) if value not in (None, "") else 0
    except (TypeError, ValueError):
        return 0


def _study(study_uid: str) -> Dataset:
    """The identifier of a study-level retrieve."""
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study_uid
    return ident


def move_study(session: Session, study_uid: str, move_aet: str, stall_timeout: float,
               on_progress: Callable[[int], None] = lambda n: None) -> Pulled:
    """Run one study-level C-MOVE to its end, reporting sub-operations as they go."""
    subops = SubOperations(on_progress)
    for status, _ident in session.moved(_study(study_uid), move_aet):
        code = status.get("Status") if status else None
        if code is None:
            return Pulled(None, *subops.counts, stalled=True, comment=f"no response from the source for "
                          f"{stall_timeout:g} s (stall timeout); association aborted")
        if any(f"NumberOf{k}Suboperations" in status for k in _KINDS):
            subops.update(*(_count(status, f"NumberOf{k}Suboperations") for k in _KINDS))
        if code in PENDING_STATUSES:
            if subops.stalled_for(stall_timeout):
                session.assoc.abort()
                return Pulled(None, *subops.counts, stalled=True, comment=f"C-MOVE pending without progress "
                              f"for {stall_timeout:g} s (stall timeout); association aborted")
            continue
        return Pulled(int(code), *subops.counts, comment=str(status.get("ErrorComment", "") or ""))
    return Pulled(None, *subops.counts, comment="the source ended the retrieve without a final response")


def get_contexts(sop_classes: list[str]) -> list[tuple[str, list[str]]]:
    """Storage contexts for a C-GET (SCP role): one per SOP class and transfer syntax, so
    that the source can send each instance as it holds it (byte-exact); as many syntaxes
    per class as the 127 free contexts allow, the uncompressed ones first. With more
    classes than that allows, one context per class proposing every syntax."""
    classes = list(dict.fromkeys(sop_classes or COMMON_CLASSES))[: MAX_CONTEXTS - 1]
    syntaxes = _UNCOMPRESSED + sorted(set(map(str, AllTransferSyntaxes)) - set(_UNCOMPRESSED))
    per_class = max(1, (MAX_CONTEXTS - 1) // len(classes))
    if per_class == 1:
        return [(uid, syntaxes) for uid in classes]
    return [(uid, [ts]) for uid in classes for ts in syntaxes[:per_class]][: MAX_CONTEXTS - 1]




def get_study(peer: Peer, our_aet: str, study_uid: str, sop_classes: list[str], scp: StorageSCP, key: int,
              stall_timeout: float, on_progress: Callable[[int], None] = lambda n: None, *,
              max_command_bytes: int) -> Pulled:
    """One study-level C-GET on an association of its own, its instances stored through
    `scp` as they arrive (engine/receive/get_scu.py); raises SourceError if no association."""
    contexts = get_contexts(sop_classes)
    assoc = store_scu.Association(peer.host, peer.port, peer.ae_title, our_aet,
                                  [(StudyRootQueryRetrieveInformationModelGet, [ImplicitVRLittleEndian]), *contexts],
                                  roles=list(dict.fromkeys(uid for uid, _ts in contexts)),
                                  timeout=min(stall_timeout, 30.0), tls=peer.tls)
    try:
        assoc.open()
    except store_scu.AssociationError as e:
        raise SourceError(str(e)) from None
    try:
        got = GetAssociation(assoc, scp, key, stall_timeout, on_progress, max_command_bytes).get(
            StudyRootQueryRetrieveInformationModelGet,
            encode(_study(study_uid), True, True))  # Implicit VR Little Endian, the GET context's syntax
    except BaseException:
        # mid-operation: a release would wait out the stall timeout on a peer that is
        # waiting for our C-STORE response
        assoc.abort()
        raise
    if assoc.sock is not None:  # still open: the C-GET ended with a final response
        assoc.release()
    return Pulled(got.status, *got.counts, comment=got.comment, stalled=got.stalled)
