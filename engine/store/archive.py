"""The archive's storage API for one worker process: validate, deduplicate, compress and
durably append an instance; everything here is independent of any network protocol."""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, \
    ImplicitVRLittleEndian

from stowage.catalog.attributes import UnreadableDataset, extract
from stowage.catalog.limits import Inflater, LimitExceeded
from stowage.catalog.bloom import UidFilter
from stowage.catalog.cluster_view import ViewRejections, ViewUids
from stowage.catalog.reader import Catalog
from stowage.catalog.sealed_uids import SealedView
from stowage.catalog.sealer import Sealer
from stowage.catalog.tail import TailUids, read_tails
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.store import rejection
from stowage.engine.store.filemeta import PREAMBLE, file_meta
from stowage.engine.store.freespace import FreeSpace
from stowage.engine.store.segment import (
    FLAG_SHUFFLE,
    FLAG_ZSTD,
    SHUFFLE_BLOCK,
    FileRange,
    Part,
    crc32,
    part_length,
    record_parts,
    shuffle,
    shuffle_joined,
)
from stowage.engine.store.served_versions import ServedVersions
from stowage.engine.store.usage import Usage
from stowage.engine.store.writer import OutOfResources, SegmentWriter
from stowage.protocol.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    OUT_OF_RESOURCES,
    SUBSEQUENT_OCCURRENCE_OF_REJECTED_OBJECT,
    SUCCESS,
)

log = logging.getLogger("stowage.store")
audit = logging.getLogger("stowage.audit")

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # used with fullmatch: "$" would let a newline end it
# Uncompressed syntaxes: little endian implicit/explicit, big endian. Everything else is
# encapsulated (JPEG, RLE…) or deflated, and does not compress further.
NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})
_INCOMPRESSIBLE = 0.97  # keep the raw bytes when zstd saves less than 3 %
_LEARN_INTERVAL_S = 0.1
_HEAD_BYTES = 4 << 20


@dataclass(frozen=True)
class StoreResult:
    status: int
    comment: str = ""  # becomes the Error Comment (LO): keep it within 64 characters
    held: bool = False  # success without a new record: the same instance was already held

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def _head(dataset: Part) -> bytes | bytearray | memoryview:
    """Enough of the dataset to find the catalog attributes (they come before pixel data)."""
    if not isinstance(dataset, FileRange):
        return dataset
    with open(dataset.path, "rb") as f:
        f.seek(dataset.offset)
        return f.read(min(dataset.length, _HEAD_BYTES))


def _crc32(dataset: Part) -> tuple[int, int]:
    if not isinstance(dataset, FileRange):
        return crc32(dataset), len(dataset)
    crc = 0
    for chunk in dataset.chunks():
        crc = crc32(chunk, crc)
    return crc, dataset.length


def valid_uid(uid: str | None) -> bool:
    return bool(uid) and len(uid) <= 64 and _UID.fullmatch(uid) is not None


def _check_identity(attrs: dict[str, Any], sop_class_uid: str, sop_instance_uid: str) -> StoreResult | None:
    """A refusal when the dataset does not identify itself as the request says, else None."""
    for column, tag, name in (("sop_instance_uid", "(0008,0018)", "SOP Instance UID"),
                              ("study_instance_uid", "(0020,000D)", "Study Instance UID"),
                              ("series_instance_uid", "(0020,000E)", "Series Instance UID")):
        if not attrs.get(column):
            return StoreResult(CANNOT_UNDERSTAND, f"no {name} {tag} in the dataset")
        if not valid_uid(attrs[column]):
            return StoreResult(CANNOT_UNDERSTAND, f"{name} {tag} is not a valid UID")
    if attrs.get("sop_class_uid") != sop_class_uid:
        return StoreResult(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                           "dataset SOP Class UID differs from Affected SOP Class UID")
    if attrs["sop_instance_uid"] != sop_instance_uid:
        return StoreResult(CANNOT_UNDERSTAND,
                           "dataset SOP Instance UID differs from Affected SOP Instance UID")
    return None


CATALOG_RESERVE = 1 << 20  # bytes kept free for the catalog's Parquet files whatever min_free_bytes says


class Archive:
    """Storage for one worker: its segment writer, its tail, and a view of the catalog."""

    def __init__(self, config: Config, slot: int, *, bulk: bool = False) -> None:
        """`bulk`: a bulk loader (import, migrate), whose segments leave the page cache
        once durable (engine/store/writer.py), as serve's do with `cache_writes = false`."""
        self.config = config
        self.slot = slot
        self.data_dir = config.data_dir
        self.catalog_dir = config.data_dir / "catalog"
        self.sealer = Sealer(self.catalog_dir, slot, config.compact_min_files)
        self.catalog = Catalog(self.catalog_dir, config.duplicates, cluster=config.cluster_view)  # the whole archive's
        self.writer = SegmentWriter(config.data_dir / "segments", slot, segment_size=config.segment_size,
                                    fsync=config.durability in ("fsync", "object-store"), on_commit=self.sealer.commit,
                                    keep_cache=config.cache_writes and not bulk)
        self.free_space = FreeSpace(config.data_dir)
        # Room the store path never takes, so that the sealers can always catalogue what was
        # acknowledged, even with min_free_bytes 0 (a negative value turns every check off).
        self._reserve = self.config.min_free_bytes if self.config.min_free_bytes < 0 else \
            max(self.config.min_free_bytes, CATALOG_RESERVE)
        self.quota = Usage(config.data_dir, config.max_storage_bytes, config.quota_policy)
        self.served = ServedVersions(self.catalog)
        # "Certainly new?" gate of the store path: UIDs in tails (stored since the last
        # seal, by any worker; learned as they come) or in the shared sealed-UID filter.
        # Start-up reads the tails only, not every UID the archive holds.
        self.known = UidFilter()
        self.known.update(read_tails(self.catalog.tails_dir)["sop_instance_uid"].to_pylist())
        self.sealed = SealedView(self.catalog_dir)
        self.sealed.refresh()
        self.others = ViewUids(config.data_dir) if config.cluster_view else None  # UIDs other nodes hold
        if self.others is not None:
            self.others.refresh()
        self.rejections = rejection.Rejections(config.data_dir)
        # notes other nodes applied (their published deletions), refused alike
        self.rejected_elsewhere = ViewRejections(config.data_dir) if config.cluster_view else None
        self._recover_notes()
        self._local = threading.local()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._seal_loop, name="sealer", daemon=True),
                         threading.Thread(target=self._learn_loop, name="uid-learner", daemon=True)]
        for t in self._threads:
            t.start()

    # -- the store path -------------------------------------------------------------

    def store(self, dataset: Part, transfer_syntax_uid: str, sop_class_uid: str,
              sop_instance_uid: str, calling_ae: str = "", called_ae: str = "",
              attrs: dict[str, Any] | None = None) -> StoreResult:
        """Store one instance exactly as received (in memory, or spooled to a file when
        large); the result is final and durable. `attrs`: the data set's catalog attributes
        when the caller has extracted them already, within the same limits (STOW-RS does,
        to check the study of the URL), so they are not parsed twice."""
        try:
            if attrs is None:
                attrs = extract(_head(dataset), transfer_syntax_uid, self.config.max_inflated_bytes,
                                self.config.max_nesting_depth)
            if sop_class_uid == rejection.KOS and transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
                # A rejection note is parsed whole (engine/store/rejection.py): within the limit too.
                Inflater(_head(dataset), self.config.max_inflated_bytes).drain()
        except LimitExceeded as e:
            process_counts.refused(e.limit)
            return StoreResult(CANNOT_UNDERSTAND, str(e))
        except UnreadableDataset as e:
            return StoreResult(CANNOT_UNDERSTAND, f"cannot parse the dataset: {e}")
        refusal = _check_identity(attrs, sop_class_uid, sop_instance_uid)
        if refusal:
            return refusal
        if not self.config.rejected_reaccept:
            code = self.rejections.code(sop_instance_uid)
            if code is None and self.rejected_elsewhere is not None:
                code = self.rejected_elsewhere.code(sop_instance_uid)
            if code is not None:
                return StoreResult(SUBSEQUENT_OCCURRENCE_OF_REJECTED_OBJECT,
                                   f"rejected by a rejection note ({code}); not stored")
        crc, length = _crc32(dataset)
        study = str(attrs.get("study_instance_uid") or "")
        if sop_instance_uid in self.known or self.sealed.may_hold(sop_instance_uid) or (
                self.others is not None and self.others.may_hold(sop_instance_uid)):
            verdict = self._duplicate(sop_instance_uid, study, crc, length, calling_ae)
            if verdict is not None:
                if verdict.ok and sop_class_uid == rejection.KOS:  # a note sent again: apply it again
                    applied = self._rejection_note(dataset, transfer_syntax_uid, sop_class_uid, sop_instance_uid,
                                                   None, calling_ae)
                    return verdict if applied.ok else applied
                return verdict
        if not self.free_space.has_room(self._reserve + length):
            return StoreResult(OUT_OF_RESOURCES, "not enough free disk space for this instance; not stored")
        over = self.quota.refusal(length)
        if over:
            return StoreResult(OUT_OF_RESOURCES, over)
        meta = file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae)
        try:
            payload, flags, spooled = self._payload(meta, dataset, transfer_syntax_uid)
        except OSError as e:
            return StoreResult(OUT_OF_RESOURCES, f"cannot spool the dataset: {e.strerror}")
        try:
            row = dict(attrs, transfer_syntax_uid=transfer_syntax_uid, dataset_length=length,
                       stored_length=sum(map(part_length, payload)),
                       dataset_crc32=crc, calling_ae=calling_ae, called_ae=called_ae,
                       received_at=time.time_ns() // 1000)
            header = dict(row, meta_length=len(meta))
            self.writer.append(record_parts(header, payload, flags), row)
        except OutOfResources as e:
            return StoreResult(OUT_OF_RESOURCES, f"{e.strerror}; nothing was stored")
        finally:
            if spooled is not None:
                spooled.unlink(missing_ok=True)
        self.known.add(sop_instance_uid)
        self.served.stored(study, sop_instance_uid, crc, length)
        self.free_space.used(row["stored_length"])
        self.quota.used(row["stored_length"])
        if sop_class_uid == rejection.KOS:  # durably stored: now what it rejects, before the answer
            return self._rejection_note(dataset, transfer_syntax_uid, sop_class_uid, sop_instance_uid,
                                        row["received_at"], calling_ae)
        return StoreResult(SUCCESS)

    def _rejection_note(self, dataset: Part, transfer_syntax_uid: str, sop_class_uid: str,
                        sop_instance_uid: str, received_at: int | None, calling_ae: str) -> StoreResult:
        """A stored Key Object Selection document: if it is a rejection note, hide what it
        rejects (engine.store.rejection). received_at None: the copy the catalog serves."""
        note = rejection.parse(PREAMBLE + file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae)
                               + _head(dataset))
        if note is None:
            return StoreResult(SUCCESS)
        if received_at is None:
            _cols, rows = self.catalog.execute(
                "SELECT epoch_us(received_at) FROM instances WHERE sop_instance_uid = ?", [sop_instance_uid])
            if not rows:
                return StoreResult(SUCCESS)
            received_at = rows[0][0]
        try:
            rejection.apply(self.data_dir, self.catalog, note, received_at,
                            actor=f"ae:{calling_ae} note:{sop_instance_uid}", rejections=self.rejections)
        except OSError as e:
            log.error("rejection note %s stored but not applied: %s", sop_instance_uid, e.strerror or e)
            return StoreResult(OUT_OF_RESOURCES, "note stored, rejection not applied: send it again")
        return StoreResult(SUCCESS)

    def _recover_notes(self) -> None:
        try:
            applied = rejection.recover_notes(self.data_dir, self.catalog, self.slot)
        except Exception:  # the checkpoint stays: the next start tries again
            log.exception("re-applying rejection notes of slot %03d failed", self.slot)
            return
        if applied:
            log.info("re-applied %d rejection note(s) of slot %03d", applied, self.slot)

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.config.zstd_level)
        return cctx

    def _payload(self, meta: bytes, dataset: Part,
                 transfer_syntax_uid: str) -> tuple[list[Part], int, Path | None]:
        """The payload parts, their flags, and the spool file to delete once appended.

        Native (uncompressed) syntaxes are byte-shuffled and zstd-compressed; encapsulated
        and deflated ones are already compressed and stored as they are, at no CPU cost.
        """
        if transfer_syntax_uid not in NATIVE_SYNTAXES:
            return [meta, dataset], 0, None
        flags = FLAG_ZSTD | FLAG_SHUFFLE
        if not isinstance(dataset, FileRange):
            packed = self._compressor().compress(shuffle_joined(meta, dataset))
            if len(packed) < _INCOMPRESSIBLE * (len(meta) + len(dataset)):
                return [packed], flags, None
            return [meta, dataset], 0, None
        packed_path = dataset.path.with_suffix(".zst")
        try:
            packed_length = self._pack(meta, dataset, packed_path)
        except BaseException:  # e.g. a full disk: the part written goes, or it holds that space until a restart
            packed_path.unlink(missing_ok=True)
            raise
        if packed_length < _INCOMPRESSIBLE * (len(meta) + dataset.length):
            return [FileRange(packed_path, 0, packed_length)], flags, packed_path
        packed_path.unlink()
        return [meta, dataset], 0, None

    def _pack(self, meta: bytes, dataset: FileRange, packed_path: Path) -> int:
        """Shuffle and compress the spooled dataset into `packed_path`; its length."""
        with open(packed_path, "wb") as out:
            z = self._compressor().stream_writer(out, size=len(meta) + dataset.length, closefd=False)
            try:
                pending = bytearray(meta)
                for chunk in dataset.chunks():
                    pending += chunk
                    whole = len(pending) // SHUFFLE_BLOCK * SHUFFLE_BLOCK
                    if whole:
                        z.write(shuffle(memoryview(pending)[:whole]))
                        del pending[:whole]
                z.write(shuffle(pending))
                z.close()  # ends the frame; `out` stays open (closefd=False)
            except BaseException:
                # The frame is abandoned. Ending it, as a `with` block would, raised zstd's
                # "Src size is incorrect" over the real error: a full disk (0xA700) was
                # answered as a processing failure. This thread's next store gets a fresh context.
                self._local.cctx = None
                raise
            return out.tell()

    def _duplicate(self, uid: str, study: str, crc: int, length: int, calling_ae: str) -> StoreResult | None:
        """The answer for an instance already held, or None to store this one too."""
        served = self.served.get(study, uid)
        if served is None:
            return None
        if served == (crc, length):
            audit.info("duplicate identical instance %s from %s: already stored, not stored again", uid, calling_ae,
                       extra={"fields": {"event": "duplicate", "sop_instance_uid": uid, "identical": True}})
            return StoreResult(SUCCESS, held=True)
        policy = self.config.duplicates
        audit.warning("duplicate instance %s from %s with different content: policy %s", uid, calling_ae, policy,
                      extra={"fields": {"event": "duplicate", "sop_instance_uid": uid, "identical": False,
                                        "policy": policy}})
        if policy == "keep-first":
            return StoreResult(SUCCESS, held=True)
        if policy == "reject":
            return StoreResult(DUPLICATE_SOP_INSTANCE, "instance already stored with other content (policy: reject)")
        return None  # keep-newest: store it; the catalog serves the newest

    # -- background sealing ---------------------------------------------------------

    def _seal_loop(self) -> None:
        while not self._stop.wait(self.config.seal_interval):
            self._roll_aged_segment()
            if not self.sealer.due(self.config.seal_max_rows, self.config.seal_max_age):
                continue
            try:
                self.sealer.seal()
            except OSError as e:  # e.g. a full disk: the rows stay readable in the tail
                log.error("sealing the catalog tail failed (%s); will retry", e.strerror or e)
            except Exception:
                log.exception("sealing the catalog tail failed; will retry")

    def _roll_aged_segment(self) -> None:
        """With storage in a bucket, only sealed segments are uploaded: roll one that has
        held records for segment_max_age, so a quiet worker's last records reach the bucket."""
        if not self.config.storage or self.config.segment_max_age <= 0:
            return
        try:
            if self.writer.roll_if_older(self.config.segment_max_age):
                log.info("rolled segment past segment_max_age (%.0f s) for upload", self.config.segment_max_age)
        except OSError as e:  # e.g. a full disk: the next look tries again
            log.error("rolling the active segment failed (%s); will retry", e.strerror or e)

    def _learn_loop(self) -> None:
        """Teach the UID filter what other workers stored, from their tails, every 0.1 s
        (each tail byte is parsed once; our own tail is skipped: we add as we store), and
        follow the sealed-UID filter the manifest names."""
        others = TailUids(self.catalog.tails_dir, skip_prefix=f"{self.slot:03d}-")
        while not self._stop.wait(_LEARN_INTERVAL_S):
            try:
                self.known.update(others.read())
                self.sealed.refresh()
                if self.others is not None:
                    self.others.refresh()
            except Exception:
                log.exception("reading other workers' tails failed; will retry")

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.writer.close()
        self.sealer.close()
        self.sealed.close()
        self.catalog.close()
