"""De-identification on the way in: C-STORE to a project's Called AE title and
`stowage import --project` hand the received bytes here, and only the de-identified
instance reaches `Archive.store`. The original is never stored; an instance that cannot be
de-identified (burned-in pixels the project cannot clean, a data set that does not parse) is
refused with a status and a reason, and leaves an audit line."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Mapping

from stowage.engine.deidentify.project import NotRecorded, Project, ProjectConfig, Quarantined, parse
from stowage.engine.store.archive import Archive, StoreResult
from stowage.engine.store.segment import FileRange
from stowage.protocol.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES

log = logging.getLogger("stowage.deidentify")


class Router:
    """The configured projects of one process, each opened on first use."""

    def __init__(self, projects: Mapping[str, Any], data_dir: Path) -> None:
        self.configs: dict[str, ProjectConfig] = parse(projects)
        self.data_dir = data_dir
        self._open: dict[str, Project] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.configs)

    def project(self, name: str) -> Project:
        with self._lock:
            if name not in self._open:
                self._open[name] = Project.open(self.configs[name], self.data_dir)
            return self._open[name]

    def for_association(self, called_ae: str, calling_ae: str) -> Project | None:
        """The project whose Called AE title (and calling AE titles, if it names any) this is."""
        for name, config in self.configs.items():
            if config.applies_to(called_ae, calling_ae):
                return self.project(name)
        return None

    def close(self) -> None:
        with self._lock:
            for p in self._open.values():
                p.close()
            self._open.clear()


def _bytes_of(dataset: bytes | FileRange) -> bytes:
    # De-identification needs the parsed data set: a spooled (large) one is read whole.
    return dataset if isinstance(dataset, (bytes, bytearray, memoryview)) else b"".join(dataset.chunks())


def store(project: Project, archive: Archive, dataset: bytes | FileRange, transfer_syntax: str, sop_class: str,
          sop_instance: str, calling_ae: str = "", called_ae: str = "") -> StoreResult:
    """De-identify, then store what came out; the result answers for `sop_instance` as sent."""
    try:
        result = project.deidentify_bytes(bytes(_bytes_of(dataset)), transfer_syntax)
    except Quarantined as e:
        log.warning("%s quarantined by project %s: %s", sop_instance, project.config.name, e)
        return StoreResult(CANNOT_UNDERSTAND, f"quarantined ({project.config.name}): {e}"[:64])
    except NotRecorded as e:  # a full disk under the project: out of resources, the sender may try again
        log.warning("%s: %s", sop_instance, e)
        return StoreResult(OUT_OF_RESOURCES, f"{project.config.name}: cannot record pseudonyms"[:64])
    except Exception as e:  # a data set pydicom cannot read cannot be de-identified: refused, not stored
        log.warning("%s: cannot de-identify for project %s: %s", sop_instance, project.config.name, e)
        try:
            project.audit({"event": "refused", "sop_instance_uid": sop_instance,
                           "reason": f"{type(e).__name__}: {e}"})
        except NotRecorded as full:
            log.warning("%s: %s", sop_instance, full)
        return StoreResult(CANNOT_UNDERSTAND, f"cannot de-identify: {type(e).__name__}"[:64])
    return archive.store(result.dataset, result.transfer_syntax, result.sop_class_uid or sop_class,
                         result.outcome.sop_instance_uid[1], calling_ae=calling_ae, called_ae=called_ae)
