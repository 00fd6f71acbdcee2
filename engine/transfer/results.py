"""What a transfer sends and how each instance went: shared by `stowage send`, C-MOVE,
C-GET and forwarding (engine/transfer/send.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from stowage.protocol.status import STORE_WARNINGS, SUCCESS


@dataclass(frozen=True)
class Instance:
    """One stored instance, as the catalog locates it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    segment: str
    offset: int
    dataset_length: int = 0
    received_at: int | None = None  # µs since the epoch: with the UID, names the record (as a tombstone does)


@dataclass(frozen=True)
class Outcome:
    instance: Instance
    state: str                      # "completed" | "warning" | "failed"
    status: int | None = None       # the peer's C-STORE status, if it answered
    reason: str = ""                # why it failed, for a person
    sent_as: str = ""               # the transfer syntax it went out in
    sent_uid: str = ""              # the SOP Instance UID it went out with, if a rewrite changed it


@dataclass
class SendResult:
    outcomes: list[Outcome] = field(default_factory=list)
    remaining: list[Instance] = field(default_factory=list)   # not attempted (cancelled)
    bytes_sent: int = 0

    def count(self, state: str) -> int:
        return sum(1 for o in self.outcomes if o.state == state)

    @property
    def completed(self) -> int:
        return self.count("completed")

    @property
    def warning(self) -> int:
        return self.count("warning")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def converted(self) -> int:
        return sum(1 for o in self.outcomes if o.state != "failed" and o.sent_as != o.instance.transfer_syntax_uid)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "failed"]


Context = tuple[str, str]  # (abstract syntax, transfer syntax): one presentation context
# (instance, its record's payload: file meta + dataset) -> (SOP Instance UID, transfer syntax,
# payload) of the copy to send instead; raises RewriteError (the instance fails with its reason).
Rewrite = Callable[[Instance, bytes], tuple[str, str, bytes]]


class RewriteError(ValueError):
    """The rewrite refused an instance; the message says why (e.g. quarantined)."""


def outcome_of(inst: Instance, status: int, syntax: str, comment: str = "", sent_uid: str = "") -> Outcome:
    if status == SUCCESS:
        return Outcome(inst, "completed", status, sent_as=syntax, sent_uid=sent_uid)
    if status in STORE_WARNINGS:
        return Outcome(inst, "warning", status, sent_as=syntax, sent_uid=sent_uid)
    return Outcome(inst, "failed", status, reason=f"refused with status 0x{status:04X}"
                   + (f": {comment.strip()}" if comment.strip() else ""), sent_as=syntax)
