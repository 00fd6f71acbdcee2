"""The services a worker offers: which presentation contexts it accepts and which
handler serves each DIMSE event. Adding a service is one entry here and one module."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pydicom.config

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from stowage.engine.store.archive import Archive
from stowage.engine.store.commitment import SOP_CLASS as STORAGE_COMMITMENT
from stowage.engine.runtime.config import Config
from stowage.protocol import pynetdicom_patches
from stowage.protocol.identity import identify
from stowage.engine.runtime.audit import Trail
from stowage.workers.commitment import SYNTAXES as COMMITMENT_SYNTAXES, Commitment, handle_n_action
from stowage.workers.contexts import storage_sop_classes, transfer_syntaxes
from stowage.workers.echo import handle_echo
from stowage.workers.find import FIND_SOP_CLASSES, Finder, handle_find, handle_sop_extended
from stowage.workers.retrieve import GET_SOP_CLASSES, MOVE_SOP_CLASSES, Retriever, scp as retrieve_scp
from stowage.engine.receive.store import StorageSCP, handle_store
from stowage.workers import access_gate
from stowage.engine.receive.access import Policy


@dataclass
class Services:
    """What every handler may need: the archive API, the audit trail, the configuration."""

    config: Config
    archive: Archive
    trail: Trail
    storage: StorageSCP = field(init=False)
    commitment: Commitment = field(init=False)
    finder: Finder = field(init=False)
    retriever: Retriever = field(init=False)
    access: Policy = field(init=False)

    def __post_init__(self) -> None:
        self.access = Policy(self.config)
        self.storage = StorageSCP(self.archive, self.trail)  # for pynetdicom's path and the lean one
        self.commitment = Commitment(self.config, self.archive)  # starts its delivery thread
        self.finder = Finder(self.config)
        self.retriever = Retriever(self.config)
        # C-MOVE / C-GET: workers/retrieve.py, behind the access check
        pynetdicom_patches.install(retrieve_scp=access_gate.retrieve(self.access, retrieve_scp(self.retriever)))

    def handlers(self) -> list[tuple[Any, Callable | tuple[Callable, list]]]:
        gate = access_gate.handler
        return [
            (evt.EVT_C_ECHO, gate(self.access, "echo", handle_echo)),
            (evt.EVT_C_STORE, gate(self.access, "store", handle_store, self.storage)),
            (evt.EVT_N_ACTION, gate(self.access, "commitment", handle_n_action, self.commitment)),
            (evt.EVT_C_FIND, access_gate.find(self.access, handle_find, self.finder)),
            (evt.EVT_SOP_EXTENDED, handle_sop_extended),
        ]

    def service_of(self) -> dict[str, str]:
        """The service (engine/receive/access.py's names) each abstract syntax we accept belongs to."""
        services = {str(uid): "store" for uid in storage_sop_classes()}
        services.update({str(Verification): "echo", str(STORAGE_COMMITMENT): "commitment"})
        for names, uids in (("find", FIND_SOP_CLASSES), ("move", MOVE_SOP_CLASSES), ("get", GET_SOP_CLASSES)):
            services.update({str(uid): names for uid in uids})
        return services


@contextmanager
def _known_valid_uids() -> Iterator[None]:
    """pydicom validates every UID made, and pynetdicom makes one of each transfer syntax of
    every supported context again (~8,200 of them): ~0.17 s. These are pydicom's,
    pynetdicom's and our own constants; pynetdicom still checks each (validate_uid)."""
    settings = pydicom.config.settings
    mode, settings.reading_validation_mode = settings.reading_validation_mode, pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = mode


def build_ae(config: Config) -> AE:
    """The AE whose supported contexts every association of this worker negotiates against."""
    ae = identify(AE(config.aet))
    ae.maximum_pdu_size = config.max_pdu
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    ae.require_called_aet = False
    ae.maximum_associations = config.max_associations  # the acceptor enforces the cap; pynetdicom would add 10 per worker
    # pynetdicom's setter would check each context again: the dict it keeps them in, copied
    ae._supported_contexts = dict(supported_contexts())
    return ae


@functools.cache
def supported_contexts() -> dict:
    """The contexts we accept, as pynetdicom's AE keeps them (abstract syntax: context).
    Constants, made once per process (~0.25 s: pynetdicom checks each of ~8,200 transfer
    syntaxes): in the fork server as it imports the worker, so a forked worker has them."""
    ae = AE()
    with _known_valid_uids():
        syntaxes = transfer_syntaxes()
        ae.add_supported_context(Verification, syntaxes)
        for uid in storage_sop_classes():
            # roles: a C-GET requester proposes SCP role for the storage classes it takes back
            ae.add_supported_context(uid, syntaxes, scu_role=True, scp_role=True)
        ae.add_supported_context(STORAGE_COMMITMENT, COMMITMENT_SYNTAXES + [ExplicitVRBigEndian])
        # Query/Retrieve identifiers in the uncompressed syntaxes only: pynetdicom would inflate
        # a Deflated identifier whole, past max_inflated_bytes (issue #25)
        identifiers = [s for s in syntaxes[:4] if s != DeflatedExplicitVRLittleEndian]
        for uid in (*FIND_SOP_CLASSES, *MOVE_SOP_CLASSES, *GET_SOP_CLASSES):
            ae.add_supported_context(uid, identifiers)
    return ae._supported_contexts
