"""One import process: it claims a slot of its own (engine/store/slots.py), recovers what a
previous owner of that slot left, and stores files through `Archive.store`, the storage
API that C-STORE uses, on several threads at once so that one group-committed fsync
covers many instances.

The source is only ever opened read-only (with O_NOATIME where the kernel allows), and
the bytes stored are exactly the file's bytes after its File Meta Information. Files
over `spill_threshold` never sit whole in memory (a kernel copy into the spool).
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import signal
import threading
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from pydicom.uid import DeflatedExplicitVRLittleEndian

from stowage.catalog.attributes import UnreadableDataset, extract
from stowage.catalog.limits import LimitExceeded
from stowage.engine.deidentify.ingest import Router
from stowage.engine.deidentify.ingest import store as deidentified_store
from stowage.engine.deidentify.project import Project
from stowage.engine.store.archive import Archive
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.runtime.logs import setup_logging
from stowage.engine.importer.part10 import FileInfo, Malformed, NotDicom, check_whole, read_info
from stowage.engine.store.recovery import recover
from stowage.engine.store.segment import FileRange
from stowage.engine.importer.outcome import HELD, NOT_ATTEMPTED, REFUSED, SKIPPED, STORED, Outcome, Task
from stowage.engine.store.slots import IMPORT_FIRST_SLOT, IMPORT_LAST_SLOT, claim_slot
from stowage.protocol.status import OUT_OF_RESOURCES
from stowage.engine.runtime.malloc import keep_large_buffers_in_heap

log = logging.getLogger("stowage.import")

DEFAULT_SOURCE_AE = "IMPORT"  # the calling AE recorded when a file names no Source AE
_HEAD = 64 << 10       # of a data set without file meta: enough to find its UIDs
_META_READ = 8 << 10   # the first read of a file: preamble and file meta, usually whole


_RENAMED = {
    "dataset SOP Instance UID differs from Affected SOP Instance UID":
        "Media Storage SOP Instance UID (0002,0003) differs from the data set's (0008,0018)",
    "dataset SOP Class UID differs from Affected SOP Class UID":
        "Media Storage SOP Class UID (0002,0002) differs from the data set's (0008,0016)",
}


# Errors a spool copy can only get from writing into the data directory, never from
# reading the source: the archive's disk is full or read-only, not the file unreadable.
_OUR_DISK = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class SpoolFailed(OSError):
    """A large file could not be copied into the spool for want of room in the data directory."""


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
    except PermissionError:  # O_NOATIME needs ownership; plain read-only then
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _forget(fd: int) -> None:
    """Drop the file from the page cache: an import reads terabytes once, and they would
    push out what `serve` reads (the segments written leave too: engine/store/writer.py)."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:  # advice only (e.g. a pipe or a file system without it)
        pass


def _read_from(fd: int, offset: int, size: int) -> bytes:
    """The file's bytes from `offset` to its end (to where it ends now, should it have grown)."""
    chunks = []
    while True:
        chunk = os.pread(fd, max(size - offset, 1 << 16), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_file(fd: int, size: int) -> tuple[FileInfo, bytes, bytes]:
    """The file's meta information, its data set, and the bytes before the data set.

    The head is read first, so that the data set arrives as a bytes object of its own,
    ready to store, rather than as a slice copied out of the whole file."""
    head = os.pread(fd, min(size, _META_READ), 0)
    info = read_info(head) if len(head) == size else _info_of_head(head)
    if info is None:  # a file meta group longer than _META_READ: read it all
        whole = _read_from(fd, 0, size)
        info = read_info(whole)
        return info, whole[info.dataset_offset:], whole[:info.dataset_offset]
    return info, _read_from(fd, info.dataset_offset, size), head[:info.dataset_offset]


def _info_of_head(head: bytes) -> FileInfo | None:
    """read_info on the first bytes of a longer file; None when they do not hold the
    whole file meta group (and the first element header after it)."""
    try:
        info = read_info(head)
    except Malformed:
        return None
    return info if info.dataset_offset + 8 <= len(head) else None


class Loader:
    """Stores files for one import process; thread-safe."""

    def __init__(self, archive: Archive, spool: Path, spill_threshold: int, stop: Any,
                 project: Project | None = None) -> None:
        self.archive = archive
        self.project = project          # `import --project`: de-identified before it is stored (issue #22)
        self.max_inflated_bytes = archive.config.max_inflated_bytes
        self.max_nesting_depth = archive.config.max_nesting_depth
        self.spool = spool
        self.spill_threshold = spill_threshold
        self.stop = stop                # shared: set on a full disk, so every process stops
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._spooled = 0

    def load(self, task: Task) -> Outcome:
        index, path, size = task
        if self.stop.is_set():
            return Outcome(index, NOT_ATTEMPTED, "import stopped (disk full); free space and run it again")
        try:
            fd = _open(path)
        except FileNotFoundError:
            return Outcome(index, REFUSED, "unreadable: the file vanished after the scan")
        except OSError as e:
            return Outcome(index, REFUSED, f"unreadable: {e.strerror or e}")
        try:
            return self._load_open(index, path, fd)
        except NotDicom as e:
            return Outcome(index, SKIPPED, f"not DICOM: {e}", size)
        except Malformed as e:
            return Outcome(index, REFUSED, str(e), size)
        except LimitExceeded as e:  # what reading the file would cost is past a limit
            process_counts.refused(e.limit)
            return Outcome(index, REFUSED, str(e), size)
        except SpoolFailed as e:  # the archive's disk, not the file: stop as Archive.store's 0xA700 does
            self.stop.set()
            return Outcome(index, REFUSED, f"cannot copy the file into the archive's spool ({e.strerror}); "
                                           f"not stored (status 0x{OUT_OF_RESOURCES:04X})", size)
        except OSError as e:
            return Outcome(index, REFUSED, f"unreadable: {e.strerror or e}")
        except Exception as e:  # a failure of ours on one file: it is refused, the others go on
            log.exception("importing %s failed", path)
            return Outcome(index, REFUSED, f"could not be imported ({type(e).__name__}: {e})", size)
        finally:
            _forget(fd)
            os.close(fd)

    def _load_open(self, index: int, path: str, fd: int) -> Outcome:
        size = os.fstat(fd).st_size
        if size <= self.spill_threshold:
            info, dataset, head = _read_file(fd, size)
            return self._store(index, path, info, dataset, dataset, head, size)
        # A large file is not read into memory: the kernel copies it into our spool, and
        # the copy is mapped and stored from (a map of the source itself would die of
        # SIGBUS if someone truncated the file meanwhile; our copy cannot shrink).
        copy = self._spool_copy(fd, size)
        try:
            with open(copy, "rb") as f, mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ) as data:
                view = memoryview(data)
                try:
                    info = read_info(view)
                    offset = info.dataset_offset
                    # Archive.store streams the copy's range, and compresses it into a file
                    # next to the copy when the syntax is native.
                    return self._store(index, path, info, view[offset:], FileRange(copy, offset, size - offset),
                                       view[:offset], size)
                finally:
                    view.release()
        finally:
            copy.unlink(missing_ok=True)

    def _spool_copy(self, fd: int, size: int) -> Path:
        with self._lock:
            self._spooled += 1
            copy = self.spool / f"{threading.get_ident()}-{self._spooled}.dcm"
        try:
            with open(copy, "wb") as out:
                pos = 0
                while pos < size:
                    try:
                        sent = os.copy_file_range(fd, out.fileno(), size - pos, pos, 0)
                    except OSError as e:  # another file system (EXDEV), or none of that in the kernel
                        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                        sent = out.write(os.pread(fd, min(size - pos, 8 << 20), pos))
                    if sent == 0:
                        raise OSError(errno.EIO, "the file shrank while it was read")
                    pos += sent
        except BaseException as e:
            copy.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in _OUR_DISK:
                raise SpoolFailed(e.errno, e.strerror) from None
            raise
        return copy

    def _store(self, index: int, path: str, info: FileInfo, dataset: bytes | memoryview,
               stored: bytes | FileRange, head: bytes | memoryview, size: int) -> Outcome:
        """Check the data set (`dataset`, the bytes after the file meta) and store
        `stored` (those bytes, or the spool copy's range holding them)."""
        if info.is_dicomdir:
            # PS3.10 never deflates a DICOMDIR, and pydicom would inflate one whole, unbounded.
            deflated = info.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
            missing = () if deflated else missing_references(path, bytes(head) + bytes(dataset))
            return Outcome(index, SKIPPED, "DICOMDIR: a media directory, not an instance "
                                           "(the files it references are imported from the folder)", size, missing)
        check_whole(dataset, info.transfer_syntax_uid, info.dataset_offset, self.max_nesting_depth)
        sop_class, sop_instance = self._identity(dataset, info)
        try:
            result = self._store_once(stored, info, sop_class, sop_instance)
        except OSError as e:  # Archive.store answers statuses; this is a failure of ours, said plainly
            return Outcome(index, REFUSED, f"could not store: {e.strerror or e}", size)
        if result.ok:
            return Outcome(index, HELD if result.held else STORED, "", size)
        if result.status == OUT_OF_RESOURCES:
            self.stop.set()
        return Outcome(index, REFUSED, _RENAMED.get(result.comment, result.comment) + f" (status 0x{result.status:04X})",
                       size)

    def _identity(self, dataset: bytes | memoryview, info: FileInfo) -> tuple[str, str]:
        """SOP Class and Instance UIDs: from the file meta, or from the data set itself
        when the file has none (Archive.store checks that both agree with the data set)."""
        if info.sop_class_uid and info.sop_instance_uid:
            return info.sop_class_uid, info.sop_instance_uid
        try:
            attrs = extract(bytes(dataset[:_HEAD]), info.transfer_syntax_uid, self.max_inflated_bytes,
                            self.max_nesting_depth)
        except LimitExceeded:
            raise
        except UnreadableDataset as e:
            if info.has_meta:
                raise Malformed(f"cannot parse the data set: {e}") from None
            raise NotDicom("no file meta, and no readable data set") from None
        cls, inst = attrs.get("sop_class_uid"), attrs.get("sop_instance_uid")
        if not inst:
            raise (Malformed if info.has_meta else NotDicom)("no SOP Instance UID (0008,0018)")
        if not cls:
            raise Malformed("no SOP Class UID (0008,0016)")
        return str(cls), str(inst)

    def _store_once(self, dataset: bytes | FileRange, info: FileInfo, sop_class: str, sop_instance: str):
        """Archive.store, with two copies of one instance in this process never stored at
        the same moment (the second then finds the first and stores nothing)."""
        while True:
            with self._lock:
                running = self._inflight.get(sop_instance)
                if running is None:
                    mine = self._inflight[sop_instance] = threading.Event()
                    break
            running.wait()
        try:
            store = self.archive.store if self.project is None else \
                partial(deidentified_store, self.project, self.archive)
            return store(dataset, info.transfer_syntax_uid, sop_class, sop_instance,
                         calling_ae=info.source_ae or DEFAULT_SOURCE_AE)
        finally:
            with self._lock:
                del self._inflight[sop_instance]
            mine.set()


def _exists(folder: Path, parts: list[str]) -> bool:
    """Whether the file a DICOMDIR names exists: exactly, or ignoring case (File IDs are
    upper case; media copied through another system often are not)."""
    path = folder.joinpath(*parts)
    if path.is_file():
        return True
    here = folder
    for part in parts:
        try:
            names = {n.upper(): n for n in os.listdir(here)}
        except OSError:
            return False
        if part.upper() not in names:
            return False
        here = here / names[part.upper()]
    return here.is_file()


def missing_references(path: str, raw: bytes) -> tuple[str, ...]:
    """Files a DICOMDIR references (PS3.10 File IDs, relative to its folder) that are not
    there; the folder walk imports those that are."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    try:
        records = dcmread(DicomBytesIO(raw), force=True).get("DirectoryRecordSequence") or []
    except Exception:  # an unreadable DICOMDIR promises nothing we could check
        return ()
    folder = Path(path).parent
    missing = []
    for record in records:
        parts = record.get("ReferencedFileID")
        if not parts:
            continue
        parts = [parts] if isinstance(parts, str) else list(parts)
        if not _exists(folder, parts):
            missing.append(str(folder.joinpath(*parts)))
    return tuple(missing)


def _quiet_logging(config: Config, slot: int) -> None:
    """Audit lines (duplicates with other content…) go to audit.jsonl as in serve; stderr
    gets warnings and errors only, so the progress bar stays readable; a file's odd values
    are the report's business, not pydicom's warnings'."""
    setup_logging(config, f"import-{slot}")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("stowage.audit").setLevel(logging.INFO)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")


def _clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def process_main(config_dict: dict[str, Any], tasks: Any, results: Any, stop: Any, threads: int,
                 project: str = "") -> None:
    """Entry point of an import process: results go back as ("ready", slot),
    ("done", [Outcome…]) per task chunk, then ("closed", slot) or ("failed", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when we stop
    keep_large_buffers_in_heap()  # CT-sized reads and compressions reuse heap pages, as in serve workers
    config = Config.from_dict(config_dict)
    try:
        slot = claim_slot(config.data_dir, IMPORT_FIRST_SLOT, IMPORT_LAST_SLOT)
        _quiet_logging(config, slot.number)
        recover(config.data_dir, slot.number)  # a previous import on this slot may have been killed
        spool = config.data_dir / "spool" / f"{slot.number:03d}"
        _clear(spool)
        archive = Archive(config, slot.number, bulk=True)
    except OSError as e:  # e.g. a full disk during recovery: say so; the files stay "not attempted"
        results.put(("failed", f"cannot start an import process: {e.strerror or e}"))
        results.put(("closed", None))
        return
    results.put(("ready", slot.number))
    router = Router(config.projects, config.data_dir)
    loader = Loader(archive, spool, config.spill_threshold, stop, router.project(project) if project else None)

    def work() -> None:
        while True:
            chunk = tasks.get()
            if chunk is None:
                return
            results.put(("done", [loader.load(task) for task in chunk]))

    pool = [threading.Thread(target=work, name=f"import-{i}") for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    try:
        archive.close()  # seals our catalog tail; on failure the next start recovers it
    except OSError as e:
        results.put(("failed", f"could not seal the catalog tail ({e.strerror or e}); "
                               "the next start of serve or import recovers it from the segments"))
    router.close()
    slot.release()
    results.put(("closed", slot.number))
