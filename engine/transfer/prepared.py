"""An instance ready to go out (its record's payload in memory, or a Part-10 spool file),
or the reason it cannot."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.store import filemeta
from stowage.engine.store.filemeta import PREAMBLE
from stowage.engine.store.segment import OversizedRecord
from stowage.engine.transfer.results import Instance
from stowage.protocol import store_scu


@dataclass
class Prepared:
    """An instance ready to go out, in `syntax`: its record's payload (file meta +
    dataset) in memory, or a Part-10 spool file; or why it cannot go."""

    instance: Instance
    syntax: str = ""
    reason: str = ""
    payload: bytes | None = None
    path: Path | None = None
    sent_uid: str = ""  # the SOP Instance UID it goes out with, when a rewrite gave it a new one

    @property
    def ready(self) -> bool:
        return self.payload is not None or self.path is not None

    @property
    def size(self) -> int:
        """Bytes of it as a Part-10 file."""
        if self.payload is not None:
            return len(PREAMBLE) + len(self.payload)
        return self.path.stat().st_size if self.path is not None else 0

    def outgoing(self) -> store_scu.Dataset:
        """The dataset bytes (no file meta), for the lean association."""
        inst = self.instance
        uid = self.sent_uid or inst.sop_instance_uid
        if self.payload is not None:
            data = memoryview(self.payload)[filemeta.group_length(self.payload):]
            return store_scu.Dataset(inst.sop_class_uid, uid, self.syntax, len(data), data=data)
        assert self.path is not None
        with open(self.path, "rb") as f:
            head = f.read(len(PREAMBLE) + 12)
            start = len(PREAMBLE) + filemeta.group_length(head[len(PREAMBLE):])
            size = os.fstat(f.fileno()).st_size
        return store_scu.Dataset(inst.sop_class_uid, uid, self.syntax, size - start,
                                 path=str(self.path), offset=start)

    def part10(self, spool: Path) -> Path:
        """A Part-10 file of it, for pynetdicom's `send_c_store`."""
        if self.path is None:
            assert self.payload is not None
            self.path = spool / f"{self.instance.sop_instance_uid}.dcm"
            with open(self.path, "wb") as f:
                f.write(PREAMBLE)
                f.write(self.payload)
            self.payload = None
        return self.path

    def discard(self) -> None:
        self.payload = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def unreadable_record(inst: Instance, reason: str, error: Exception) -> "Prepared":
    """An instance whose record cannot be read is failed, not sent; a frame that claims
    more than its record holds is counted as the limit it ran into."""
    if isinstance(error, OversizedRecord):
        process_counts.refused(error.limit)
    return Prepared(inst, reason=reason)


def unreadable(inst: Instance) -> str:
    return f"stored record unreadable ({inst.segment} @ {inst.offset})"
