"""The presentation contexts we accept, generated from the conformance CSV and from the
SOP classes and transfer syntaxes pydicom and pynetdicom know."""
from __future__ import annotations

import csv
from functools import cache
from importlib import resources

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import (AllTransferSyntaxes, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian)
from pynetdicom import sop_class
from pynetdicom.service_class import ServiceClass, StorageServiceClass


@cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class: the conformance target's (retired and trial included),
    pydicom's and pynetdicom's."""
    with resources.files(__package__).joinpath("storage_sop_classes.csv").open() as f:
        target = {row["sop_class_uid"] for row in csv.DictReader(f)} - {sop_class.Verification}
    from_pydicom = {uid for uid, (name, kind, *_rest) in UID_dictionary.items()
                    if kind == "SOP Class" and "Storage" in name and "Commitment" not in name}
    uids = tuple(sorted(target | from_pydicom | set(sop_class._STORAGE_CLASSES.values())))
    _register_storage(uids)
    return uids


def _register_storage(uids: tuple[str, ...]) -> None:
    """pynetdicom aborts a C-STORE for a SOP class it maps to no service (retired, trial and
    newer classes): register those as Storage."""
    for uid in uids:
        if sop_class.uid_to_service_class(uid) is ServiceClass:
            name = UID_dictionary.get(uid, ("",) * 5)[4] or f"Storage_{uid.replace('.', '_')}"
            sop_class.register_uid(uid, name, StorageServiceClass, "C-STORE")


def transfer_syntaxes() -> list[str]:
    """Every transfer syntax pydicom knows, the uncompressed ones first."""
    first = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
    return first + sorted(set(map(str, AllTransferSyntaxes)) - set(first))
