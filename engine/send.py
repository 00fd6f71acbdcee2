"""The sending core: stored instances to another AE as C-STORE sub-operations, shared by
`stowage send`, and (to come) C-MOVE and C-GET.

For each SOP class we propose one presentation context per transfer syntax the
instances are stored in, plus Explicit and Implicit VR Little Endian as fallbacks, each
a context of its own so the peer can accept any subset (at most 128 contexts per
association: more SOP classes go on further associations). An instance goes out with
its dataset bytes exactly as received when the peer accepted its stored syntax (streamed
from a checksum-verified spool copy of the record, never decoded); otherwise it is
converted (engine/convert.py) to an uncompressed syntax the peer accepted, never to a
lossy one.

A store with no response within `dimse_timeout` (pynetdicom aborts the association then;
its rare lost-response race is one cause) is retried once on a new association.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from engine import convert
from engine.client import Peer, PeerError, associate, new_ae
from engine.filemeta import PREAMBLE
from engine.segment import CorruptRecord, stream_payload

log = logging.getLogger("stowage.send")

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
FALLBACKS = (EXPLICIT_LE, IMPLICIT_LE)
MAX_CONTEXTS = 128
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
_MAX_REOPEN = 3  # consecutive failed attempts to (re)open an association before giving up


@dataclass(frozen=True)
class Instance:
    """One stored instance, as the catalog locates it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    segment: str
    offset: int
    dataset_length: int = 0


@dataclass(frozen=True)
class Outcome:
    instance: Instance
    state: str                      # "completed" | "warning" | "failed"
    status: int | None = None       # the peer's C-STORE status, if it answered
    reason: str = ""                # why it failed, for a person
    sent_as: str = ""               # the transfer syntax it went out in


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


def context_batches(instances: Sequence[Instance]) -> list[list[PresentationContext]]:
    """Presentation contexts to propose, split into association batches of at most 128.
    Each SOP class lies wholly within one batch."""
    stored: OrderedDict[str, list[str]] = OrderedDict()
    for inst in instances:
        syntaxes = stored.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax_uid not in syntaxes:
            syntaxes.append(inst.transfer_syntax_uid)
    batches: list[list[PresentationContext]] = [[]]
    for sop_class, syntaxes in stored.items():
        wanted = syntaxes + [ts for ts in FALLBACKS if ts not in syntaxes]
        contexts = [build_context(sop_class, [ts]) for ts in wanted[:MAX_CONTEXTS]]
        if len(batches[-1]) + len(contexts) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(contexts)
    return [b for b in batches if b]


def accepted_syntaxes(assoc: Association) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes the peer accepted for it (as SCP: we are the SCU)."""
    out: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu is False:  # role selection gave us no SCU role on this context
            continue
        out.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return out


@dataclass
class _Prepared:
    """A Part-10 spool file ready for `send_c_store`, or why there is none."""

    instance: Instance
    path: Path | None = None
    syntax: str = ""
    reason: str = ""

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class Sender:
    """Sends instances to one peer. One Sender per transfer; not thread-safe."""

    def __init__(self, segments_dir: Path, peer: Peer, calling_aet: str, *, dimse_timeout: float = 30.0,
                 acse_timeout: float = 30.0, network_timeout: float = 60.0, max_pdu: int = 262144,
                 retries: int = 1, spool_dir: Path | None = None,
                 on_outcome: Callable[[Outcome], None] | None = None,
                 cancelled: Callable[[], bool] | None = None,
                 move_originator: tuple[str, int] | None = None) -> None:
        self.segments_dir = segments_dir
        self.peer = peer
        self.calling_aet = calling_aet
        self.timeouts = dict(acse_timeout=acse_timeout, dimse_timeout=dimse_timeout, network_timeout=network_timeout)
        self.max_pdu = max_pdu
        self.retries = retries
        self.spool_dir = spool_dir
        self.on_outcome = on_outcome or (lambda _o: None)
        self.cancelled = cancelled or (lambda: False)
        self.move_originator = move_originator
        # Send Part-10 files from disk in PDU-sized pieces, dataset bytes untouched; the
        # flag is process-wide and only changes how a file path given to send_c_store is read.
        _config.STORE_SEND_CHUNKED_DATASET = True

    def send(self, instances: Iterable[Instance]) -> SendResult:
        todo = list(instances)
        result = SendResult()
        spool = Path(tempfile.mkdtemp(prefix="send-", dir=self.spool_dir))
        try:
            for contexts in context_batches(todo):
                classes = {str(cx.abstract_syntax) for cx in contexts}
                batch = [i for i in todo if i.sop_class_uid in classes]
                self._send_batch(batch, contexts, spool, result)
        finally:
            for p in spool.iterdir():
                p.unlink(missing_ok=True)
            spool.rmdir()
        return result

    def send_on(self, assoc: Association, instances: Iterable[Instance]) -> SendResult:
        """Send on an association someone else opened (C-GET: the requester's, with
        SCP/SCU role selection for the storage classes). No new association is opened:
        a store without a response counts as failed, and the rest are not attempted."""
        todo = list(instances)
        result = SendResult()
        if not todo:
            return result
        spool = Path(tempfile.mkdtemp(prefix="send-", dir=self.spool_dir))
        pool = ThreadPoolExecutor(1, thread_name_prefix="send-prepare")
        try:
            attempts = {i.sop_instance_uid: self.retries for i in todo}  # no retries here
            rest = self._run(assoc, todo, attempts, spool, pool, result)
            for inst in rest:
                self._record(result, Outcome(inst, "failed", reason="the association ended before it was sent"))
        finally:
            pool.shutdown(wait=True)
            for p in spool.iterdir():
                p.unlink(missing_ok=True)
            spool.rmdir()
        return result

    # -- one association batch --------------------------------------------------------

    def _record(self, result: SendResult, outcome: Outcome) -> None:
        result.outcomes.append(outcome)
        if outcome.state == "failed":
            log.warning("sending %s to %s failed: %s", outcome.instance.sop_instance_uid, self.peer, outcome.reason)
        self.on_outcome(outcome)

    def _open(self, contexts: list[PresentationContext]) -> Association:
        ae = new_ae(self.calling_aet, **self.timeouts)
        return associate(ae, self.peer, contexts, max_pdu=self.max_pdu)

    def _send_batch(self, batch: list[Instance], contexts: list[PresentationContext], spool: Path,
                    result: SendResult) -> None:
        queue = list(batch)
        attempts: dict[str, int] = {}
        reopen_failures = 0
        pool = ThreadPoolExecutor(1, thread_name_prefix="send-prepare")
        try:
            while queue:
                if self.cancelled():
                    result.remaining.extend(queue)
                    return
                try:
                    assoc = self._open(contexts)
                except PeerError as e:
                    # The first association of a transfer fails fast (unknown AE, host down);
                    # one that drops mid-transfer gets a few more tries, with a short back-off.
                    reopen_failures += 1
                    if reopen_failures >= _MAX_REOPEN or not result.outcomes:
                        for inst in queue:
                            self._record(result, Outcome(inst, "failed", reason=str(e)))
                        return
                    time.sleep(0.5 * reopen_failures)
                    continue
                reopen_failures = 0
                try:
                    queue = self._run(assoc, queue, attempts, spool, pool, result)
                finally:
                    if assoc.is_established:
                        assoc.release()
        finally:
            pool.shutdown(wait=True)

    def _run(self, assoc: Association, queue: list[Instance], attempts: dict[str, int], spool: Path,
             pool: ThreadPoolExecutor, result: SendResult) -> list[Instance]:
        """Send `queue` on `assoc`; returns what still needs another association."""
        accepted = accepted_syntaxes(assoc)
        ahead: Future | None = pool.submit(self._prepare, queue[0], accepted, spool)
        for i, inst in enumerate(queue):
            prepared: _Prepared = ahead.result()  # type: ignore[union-attr]
            nxt = i + 1 < len(queue) and not self.cancelled()
            ahead = pool.submit(self._prepare, queue[i + 1], accepted, spool) if nxt else None
            try:
                if prepared.path is None:
                    self._record(result, Outcome(inst, "failed", reason=prepared.reason))
                    continue
                if self.cancelled():
                    result.remaining.extend(queue[i:])
                    return []
                status = self._store(assoc, prepared)
                if status is None:
                    attempts[inst.sop_instance_uid] = attempts.get(inst.sop_instance_uid, 0) + 1
                    if attempts[inst.sop_instance_uid] > self.retries:
                        self._record(result, Outcome(inst, "failed", reason=(
                            f"no C-STORE response within {self.timeouts['dimse_timeout']:g} s "
                            f"({attempts[inst.sop_instance_uid]} attempt(s))"), sent_as=prepared.syntax))
                        rest = queue[i + 1:]
                    else:
                        log.info("no response for %s from %s: retrying on a new association",
                                 inst.sop_instance_uid, self.peer)
                        rest = queue[i:]
                    if ahead is not None:
                        ahead.result().discard()
                    return rest
                result.bytes_sent += prepared.path.stat().st_size
                if status == 0x0000:
                    self._record(result, Outcome(inst, "completed", status, sent_as=prepared.syntax))
                elif status in WARNING_STATUSES:
                    self._record(result, Outcome(inst, "warning", status, sent_as=prepared.syntax))
                else:
                    self._record(result, Outcome(inst, "failed", status, reason=f"refused with status 0x{status:04X}",
                                                 sent_as=prepared.syntax))
            finally:
                prepared.discard()
        return []

    def _store(self, assoc: Association, prepared: _Prepared) -> int | None:
        """The peer's status, or None when the association ended without one."""
        if not assoc.is_established:
            return None
        kwargs = {}
        if self.move_originator is not None:
            kwargs = dict(originator_aet=self.move_originator[0], originator_id=self.move_originator[1])
        try:
            status = assoc.send_c_store(prepared.path, **kwargs)
        except (RuntimeError, ValueError, AttributeError) as e:  # context vanished, association gone
            log.info("send_c_store %s: %s", prepared.instance.sop_instance_uid, e)
            return None
        if "Status" not in status:
            return None
        return int(status.Status)

    # -- preparing one instance -------------------------------------------------------

    def _prepare(self, inst: Instance, accepted: dict[str, set[str]], spool: Path) -> _Prepared:
        syntaxes = accepted.get(inst.sop_class_uid)
        if not syntaxes:
            return _Prepared(inst, reason=f"{self.peer} accepted no presentation context for SOP class "
                                          f"{inst.sop_class_uid}")
        path = spool / f"{inst.sop_instance_uid}.dcm"
        try:
            with open(path, "wb") as f:
                f.write(PREAMBLE)
                for chunk in stream_payload(self.segments_dir / inst.segment, inst.offset):
                    f.write(chunk)
        except (OSError, CorruptRecord) as e:
            path.unlink(missing_ok=True)
            return _Prepared(inst, reason=f"stored record unreadable ({inst.segment} @ {inst.offset}): {e}")
        if inst.transfer_syntax_uid in syntaxes:
            return _Prepared(inst, path, inst.transfer_syntax_uid)
        target = convert.target_syntax(inst.transfer_syntax_uid, syntaxes)
        if target is None:
            path.unlink(missing_ok=True)
            return _Prepared(inst, reason=(f"{self.peer} accepts none of the syntaxes we can convert "
                                           f"{convert.name(inst.transfer_syntax_uid)} to "
                                           f"(accepted: {', '.join(sorted(map(convert.name, syntaxes)))})"))
        converted = path.with_suffix(".conv.dcm")
        try:
            convert.convert_file(path, converted, target)
        except convert.ConversionError as e:
            converted.unlink(missing_ok=True)
            return _Prepared(inst, reason=str(e))
        finally:
            path.unlink(missing_ok=True)
        os.replace(converted, path)
        return _Prepared(inst, path, target)

