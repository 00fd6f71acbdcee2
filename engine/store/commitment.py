"""Storage commitment, independent of any protocol: the verdict on a set of referenced
instances, and the durable queue of reports not yet delivered.

Verdict (PS3.4 J.3.3): an instance is committed when the catalog holds it, with the
SOP class the requester names, and its segment record is on stable storage and reads
back with a good checksum (record CRC, then the CRC-32 and length of the dataset bytes
as received: engine/store/integrity.py), and no verify or scrub has marked it corrupt.
Otherwise it fails with the standard's Failure Reason:
  0x0112 No such object instance   not in the catalog
  0x0119 Class / Instance conflict the catalog holds it under another SOP class
  0x0110 Processing failure        the record is unreadable, its checksum fails, or it is marked corrupt
  0x0122 Referenced SOP Class not supported / 0x0115 invalid argument: malformed UIDs

Queue: one write-once JSON file per accepted request in <data_dir>/commitment/pending/,
fsync'd (file and directory) before the N-ACTION is answered. Its name, <id>.<requester AE
title in hex>.json, lets add() count an AE's pending reports from the directory listing
alone, under a lock on the directory that every worker takes, and refuse one more than
the limit (PendingLimit): an AE that never takes its reports cannot make the archive
retry an unbounded number of them for MAX_AGE. The process that delivers
a report holds an exclusive flock on its file; the kernel drops the lock when that
process dies, whatever the cause, so any live worker can adopt the orphan (claim_orphans).
A delivered report's file is unlinked while still locked; one that could not be
delivered within MAX_AGE moves to commitment/undeliverable/.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from stowage.catalog.durable import fsync_dir
from stowage.catalog.reader import Catalog
from stowage.engine.store.archive import valid_uid
from stowage.engine.store.integrity import check_record, marks_of
from stowage.engine.store.segment import open_segment
from stowage.protocol.status import (CLASS_INSTANCE_CONFLICT, INVALID_ARGUMENT_VALUE, NO_SUCH_OBJECT_INSTANCE,
                                     PROCESSING_FAILURE)

log = logging.getLogger("stowage.commitment")

# pydicom.uid names neither (pynetdicom.sop_class does; this module does not import pynetdicom).
SOP_CLASS = "1.2.840.10008.1.20.1"            # Storage Commitment Push Model
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
EVENT_SUCCESSFUL = 1                          # Storage Commitment Request Successful
EVENT_FAILURES_EXIST = 2                      # Storage Commitment Request Complete - Failures Exist
MAX_AGE_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class Verdict:
    committed: list[Reference] = field(default_factory=list)
    failed: list[tuple[Reference, int]] = field(default_factory=list)

    @property
    def event_type(self) -> int:
        return EVENT_FAILURES_EXIST if self.failed else EVENT_SUCCESSFUL


def judge(catalog: Catalog, segments_dir: Path, references: list[Reference], *, sync: bool = False,
          aliases: Callable[[str], list[str]] | None = None) -> Verdict:
    """The verdict on `references`. `sync` fsyncs the segments first (for archives that
    run with durability = os-buffer, whose records are not on stable storage yet).

    Cost: one catalog query for the whole request, then per distinct record one open of
    its segment and one read of the whole record (decompressed, to check both CRCs):
    the request's stored bytes read once. The N-ACTION handler caps the references of a
    request (max_commitment_references) and the requests pending per AE, which bounds it.

    `aliases(uid)`: the UIDs an instance sent as `uid` may be held under (a research project
    de-identified it on the way in, engine/deidentify): the verdict names the UID as sent."""
    uids = sorted({r.sop_instance_uid for r in references if valid_uid(r.sop_instance_uid)})
    alias = {u: aliases(u) for u in uids} if aliases is not None else {}
    uids += sorted({a for found in alias.values() for a in found})
    _cols, rows = catalog.execute(
        "SELECT sop_instance_uid, sop_class_uid, segment, \"offset\", dataset_crc32, dataset_length "
        "FROM instances WHERE sop_instance_uid IN (SELECT unnest(?))", [uids])
    held = {r[0]: r[1:] for r in rows}
    marks = marks_of(segments_dir.parent)
    synced: dict[str, str | None] = {}
    checked: dict[str, str | None] = {}
    verdict = Verdict()
    for ref in references:
        if not valid_uid(ref.sop_instance_uid) or not valid_uid(ref.sop_class_uid):
            verdict.failed.append((ref, INVALID_ARGUMENT_VALUE))
            continue
        row = held.get(ref.sop_instance_uid)
        for other in alias.get(ref.sop_instance_uid, ()):
            row = row or held.get(other)
        if row is None:
            verdict.failed.append((ref, NO_SUCH_OBJECT_INSTANCE))
            continue
        sop_class, segment, offset, crc, length = row
        if sop_class != ref.sop_class_uid:
            verdict.failed.append((ref, CLASS_INSTANCE_CONFLICT))
            continue
        path = segments_dir / segment
        mark = marks.get(segment, offset)  # found corrupt by verify or the scrub (engine/store/integrity.py)
        problem = f"marked corrupt by {mark.by}: {mark.problem}" if mark is not None else None
        if sync and problem is None:
            if segment not in synced:
                synced[segment] = _fsync(path)
            problem = synced[segment]
        if problem is None:
            key = f"{segment}@{offset}"
            if key not in checked:
                checked[key] = check_record(path, offset, crc, length)
            problem = checked[key]
        if problem is not None:
            log.error("commitment: %s fails verification: %s", ref.sop_instance_uid, problem)
            verdict.failed.append((ref, PROCESSING_FAILURE))
            continue
        verdict.committed.append(ref)
    return verdict


def _fsync(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # evicted after a verified upload: the object store holds it durably
        try:
            open_segment(path).close()
        except OSError as e:
            return f"cannot fsync {path.name}: {e.strerror or e}"
        return None
    except OSError as e:
        return f"cannot fsync {path.name}: {e.strerror or e}"
    try:
        os.fsync(fd)
    except OSError as e:
        return f"cannot fsync {path.name}: {e.strerror or e}"
    finally:
        os.close(fd)
    return None


# -- the durable queue of pending reports -----------------------------------------------

@dataclass
class Request:
    """An accepted N-ACTION, as persisted: everything needed to deliver its report."""

    transaction_uid: str
    requester_ae: str
    requester_address: str
    references: list[Reference]
    accepted_at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["references"] = [[r.sop_class_uid, r.sop_instance_uid] for r in self.references]
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Request":
        d = json.loads(data)
        d["references"] = [Reference(str(c), str(i)) for c, i in d["references"]]
        return cls(**d)


class Claim:
    """A pending report this process owns: its file, kept open and flock'ed."""

    def __init__(self, path: Path, fd: int, request: Request) -> None:
        self.path, self.fd, self.request = path, fd, request

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the flock
            self.fd = -1


class PendingLimit(Exception):
    """The requester already has `count` reports pending: the request was not queued."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} reports pending")
        self.count = count


def _ae_key(ae_title: str) -> str:
    """The AE title as it goes into a file name: any character an AE title may hold is safe."""
    return ae_title.encode("utf-8", "surrogateescape").hex() or "-"


def _request_id(path: Path) -> str:
    """A pending file's request id (names without the AE part come from older versions)."""
    return path.name.split(".", 1)[0]


class ReportQueue:
    def __init__(self, directory: Path) -> None:
        self.pending = directory / "pending"
        self.undeliverable = directory / "undeliverable"
        self.pending.mkdir(parents=True, exist_ok=True)

    def pending_for(self, ae_title: str) -> int:
        """How many reports to `ae_title` are queued and not yet delivered or given up."""
        suffix = f".{_ae_key(ae_title)}.json"
        return sum(1 for name in os.listdir(self.pending) if name.endswith(suffix) and not name.startswith("."))

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The queue to ourselves among every worker (and thread): count, then add."""
        fd = os.open(self.pending, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the flock

    def add(self, request: Request, max_pending: int | None = None) -> Claim:
        """Persist `request` durably, owned (locked) by this process; raises OSError, or
        PendingLimit when its requester already has `max_pending` reports queued."""
        if max_pending is None:
            return self._write(request)
        with self._exclusive():
            count = self.pending_for(request.requester_ae)
            if count >= max_pending:
                raise PendingLimit(count)
            return self._write(request)

    def _write(self, request: Request) -> Claim:
        tmp = self.pending / f".{request.id}.tmp"
        path = self.pending / f"{request.id}.{_ae_key(request.requester_ae)}.json"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = request.to_json()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
            os.rename(tmp, path)
            fsync_dir(self.pending)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return Claim(path, fd, request)

    def claim_orphans(self, owned: set[str]) -> Iterator[Claim]:
        """Pending reports nobody holds (their process died, or the archive restarted)."""
        for path in sorted(self.pending.glob("*.json")):
            rid = _request_id(path)
            if rid in owned:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Still the file we opened? (its owner may have delivered and unlinked it)
                if os.fstat(fd).st_nlink == 0 or os.stat(path).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError(path)
                with os.fdopen(os.dup(fd), "rb") as f:
                    request = Request.from_json(f.read())
            except (BlockingIOError, FileNotFoundError):
                os.close(fd)
                continue
            except (ValueError, KeyError, TypeError) as e:
                log.error("commitment: unreadable pending report %s (%s); moved aside", path.name, e)
                self._move_aside(path)
                os.close(fd)
                continue
            yield Claim(path, fd, request)
        for stale in self.pending.glob(".*.tmp"):  # an add() cut short by a crash: never answered
            try:
                if time.time() - stale.stat().st_mtime > 60:
                    stale.unlink()
            except FileNotFoundError:
                pass

    def done(self, claim: Claim) -> None:
        """The report was delivered: forget it."""
        claim.path.unlink(missing_ok=True)
        fsync_dir(self.pending)
        claim.release()

    def give_up(self, claim: Claim) -> None:
        self._move_aside(claim.path)
        claim.release()

    def _move_aside(self, path: Path) -> None:
        self.undeliverable.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, self.undeliverable / path.name)
        except FileNotFoundError:
            pass
