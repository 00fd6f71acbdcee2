"""De-identify a folder of Part-10 files into another (`stowage deidentify`), in several
processes: each reads, de-identifies and writes its share; the pseudonym table (SQLite)
and the audit log (O_APPEND) take writes from all of them."""
from __future__ import annotations

import multiprocessing
import os
import signal
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Mapping

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MediaStorageDirectoryStorage)

from stowage.engine.store.filemeta import PREAMBLE, file_meta, group_length
from stowage.engine.deidentify.project import Project, ProjectError, Quarantined, open_project


@dataclass
class FolderResult:
    written: int = 0
    quarantined: list[str] = field(default_factory=list)   # "path: reason"
    failed: list[str] = field(default_factory=list)        # "path: reason"
    skipped: int = 0                                        # not DICOM files
    dicomdirs: list[str] = field(default_factory=list)      # media directories: paths, not written


def write_part10(ds, target: Path) -> None:
    """Write through a temporary name in the same folder, so no half file is ever seen."""
    meta = ds.file_meta
    for name, source in (("MediaStorageSOPClassUID", "SOPClassUID"), ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        if source in ds:
            setattr(meta, name, ds[source].value)
    if "TransferSyntaxUID" not in meta:  # a file without meta: what pydicom read it as
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    # A fragment without SOP Class or Instance UID (pydicom's test files hold some) is
    # written as it is rather than refused: its meta cannot be made complete.
    complete = all(meta.get(k) for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=complete)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _meta(payload: bytes) -> tuple[int, dict[int, str]] | None:
    """(length, UI values by tag) of the file meta group at the start of `payload`; None
    when it cannot be read so (cut short, a UID in another character set): the pydicom path
    then reads the file, or says why it cannot."""
    try:
        n = group_length(payload)
        values, pos = {}, 12
        while pos + 8 <= n:
            tag, vr = struct.unpack_from("<I", payload, pos)[0], bytes(payload[pos + 4:pos + 6])
            if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
                length, val = struct.unpack_from("<I", payload, pos + 8)[0], pos + 12
            else:
                length, val = struct.unpack_from("<H", payload, pos + 6)[0], pos + 8
            if vr == b"UI":
                text = bytes(payload[val:val + length]).decode("ascii")
                values[tag >> 16 | (tag & 0xFFFF) << 16] = text.rstrip("\0 ")
            pos = val + length
    except (ValueError, struct.error):  # UnicodeDecodeError is a ValueError
        return None
    return n, values


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        while len(data) < size:  # a short read (a file growing, a network mount): the rest
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


_IOV_MAX = 512


def _write_parts(target: str, parts: list) -> None:
    """Write `parts` to `target` through a temporary name in the same folder (so no half file
    is ever seen), with writev: the pieces are not joined in memory first."""
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            views = [memoryview(p) for p in parts]
            while views:
                batch = views[:_IOV_MAX]
                n = os.writev(fd, batch)
                while n:  # drop what was written, part of a piece included
                    if n >= len(views[0]):
                        n -= len(views.pop(0))
                    else:
                        views[0], n = views[0][n:], 0
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _meta_start(raw: bytes) -> int:
    """Where the file meta group starts: after the 128-byte preamble and "DICM", or after a
    "DICM" at the very start (the preamble left out, which DCMTK reads); 0: neither."""
    if raw[128:132] == b"DICM":
        return len(PREAMBLE)
    return 4 if raw[:4] == b"DICM" and raw[4:6] == b"\x02\x00" else 0


def one_file(project: Project, path: Path, out: Path) -> tuple[str, str]:
    """("written" | "quarantined" | "failed" | "skipped", detail) for one file."""
    try:
        raw = _read(os.fspath(path))
    except OSError as e:
        return "failed", f"{path}: cannot read ({e.strerror})"
    start = _meta_start(raw)
    if not start:
        return _without_prefix(project, raw, path, out)
    payload = memoryview(raw)[start:]
    meta = _meta(payload)
    ts = meta[1].get(0x00020010, "") if meta else ""
    if meta and meta[1].get(0x00020002, "") == MediaStorageDirectoryStorage:
        return "dicomdirs", str(path)
    if meta and ts and ts != DeflatedExplicitVRLittleEndian:
        answer = _bytes_in_bytes_out(project, raw, ts, start + meta[0], path, out)
        if answer is not None:
            return answer
    return _through_pydicom(project, path, out)


def _bytes_in_bytes_out(project: Project, raw: bytes, ts: str, offset: int, path: Path,
                        out: Path) -> tuple[str, str] | None:
    """The fast path (encoded.py; deidentify_bytes falls back itself); None: an instance
    without SOP Class or Instance UID, which the pydicom path writes as it can."""
    try:
        result = project.deidentify_bytes(raw, ts, offset)
    except Quarantined as e:
        return "quarantined", f"{path}: {e}"
    except Exception as e:
        return "failed", f"{path}: cannot de-identify ({type(e).__name__}: {e})"
    sop = result.outcome.sop_instance_uid[1]
    if not (sop and result.sop_class_uid):
        return None
    try:
        _write_parts(os.path.join(os.fspath(out), f"{sop}.dcm"),
                     [PREAMBLE + file_meta(result.sop_class_uid, sop, result.transfer_syntax), *result.parts])
    except OSError as e:
        return "failed", f"{path}: cannot write ({e.strerror})"
    return "written", ""


def _without_prefix(project: Project, raw: bytes, path: Path, out: Path) -> tuple[str, str]:
    """A file with neither preamble nor "DICM": one that starts with its file meta group, or
    a bare data set (old ACR-NEMA-style exports), both of which `stowage import` reads too
    (the transfer syntax guessed as import and DCMTK guess it); anything else is not DICOM."""
    if len(raw) < 16:
        return "skipped", ""
    group, vr = struct.unpack_from("<H", raw, 0)[0], raw[4:6]
    explicit = vr.isalpha() and vr.isupper()
    if group == 0x0002 and explicit:
        meta = _meta(memoryview(raw))
        if meta is None:
            return "failed", f"{path}: cannot read its file meta group"
        if meta[1].get(0x00020002, "") == MediaStorageDirectoryStorage:
            return "dicomdirs", str(path)
        ts, offset = meta[1].get(0x00020010, ""), meta[0]
        if not ts:
            return "failed", f"{path}: no Transfer Syntax UID in its file meta group"
    elif 0x0008 <= group <= 0x0028:  # a data set starts with a low group: 0008, 0010...
        ts, offset = (ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian), 0
    else:  # (big endian bare data sets are left out: pydicom and import read them; rare)
        return "skipped", ""
    answer = _bytes_in_bytes_out(project, raw, ts, offset, path, out)
    return answer if answer is not None else ("failed", f"{path}: no SOP Class or Instance UID to name it by")


def _through_pydicom(project: Project, path: Path, out: Path) -> tuple[str, str]:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        # pydicom wants the preamble: give it one when only "DICM" and the file meta are there
        ds = dcmread(BytesIO(bytes(128) + path.read_bytes())) if _meta_start(head) == 4 else dcmread(path)
    except (InvalidDicomError, EOFError):
        return "skipped", ""
    except Exception as e:  # a damaged file: say which and why, go on with the rest
        return "failed", f"{path}: cannot read ({type(e).__name__}: {e})"
    if _is_dicomdir(ds):
        return "dicomdirs", str(path)
    try:
        outcome = project.deidentify_dataset(ds)
    except Quarantined as e:
        return "quarantined", f"{path}: {e}"
    except Exception as e:
        return "failed", f"{path}: cannot de-identify ({type(e).__name__}: {e})"
    try:
        name = outcome.sop_instance_uid[1] or project.profile.keyed.token("file", str(path.resolve()), 26)
        write_part10(ds, out / f"{name}.dcm")
    except Exception as e:
        return "failed", f"{path}: cannot write ({type(e).__name__}: {e})"
    return "written", ""


def _is_dicomdir(ds) -> bool:
    """A DICOMDIR is a media directory, not an instance (`stowage import` skips it too): its
    records hold byte offsets into itself that a rewrite breaks, every patient's name and
    the original UIDs and file paths of its instances, which are de-identified on their own."""
    meta = getattr(ds, "file_meta", None)
    return (meta is not None and meta.get("MediaStorageSOPClassUID", "") == MediaStorageDirectoryStorage) \
        or "DirectoryRecordSequence" in ds


_project: Project | None = None
_stop: Any = None  # the parent's multiprocessing Event: set on Ctrl-C


def _init(projects: Mapping[str, Any], name: str, data_dir: str, stop: Any) -> None:
    # Ctrl-C is the parent's to handle: a worker that died of it where the pool does not
    # catch it (waiting for work) made the pool kill the others mid-write, leaving their
    # temporary files behind. The parent sets `stop` instead, and each ends its file.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _project, _stop
    _project, _stop = open_project(projects, name, Path(data_dir)), stop


def _work(paths: list[str], out: str) -> list[tuple[str, str]]:
    assert _project is not None
    answers = []
    for p in paths:
        if _stop.is_set():
            break
        answers.append(one_file(_project, Path(p), Path(out)))
    return answers


def files_under(folder: Path, but: Path | None = None) -> list[Path]:
    """The files under `folder`, none under `but` (OUT inside SRC: a second run read the first
    one's output as originals and wrote de-identified copies of de-identified copies)."""
    files = (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if but is not None:
        but = but.resolve()
        files = (p for p in files if but not in p.resolve().parents)
    return sorted(files)


def deidentify_folder(projects: Mapping[str, Any], name: str, data_dir: Path, src: Path, out: Path,
                      jobs: int = 0) -> FolderResult:
    open_project(projects, name, data_dir).close()  # a bad project or key: one clear error, before any work
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in files_under(src, but=out)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(paths) or 1))
    chunks = [paths[i::jobs * 8] for i in range(jobs * 8)]
    result = FolderResult()
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init,
                             initargs=(dict(projects), name, str(data_dir), stop)) as pool:
        try:
            for answers in pool.map(_work, chunks, [str(out)] * len(chunks)):
                _tally(result, answers)
        except KeyboardInterrupt:  # each worker ends the file it is writing; the rest is not begun
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return result


def _tally(result: FolderResult, answers: list[tuple[str, str]]) -> None:
    for kind, detail in answers:
        if kind == "written":
            result.written += 1
        elif kind == "skipped":
            result.skipped += 1
        else:
            getattr(result, kind).append(detail)


__all__ = ["FolderResult", "ProjectError", "deidentify_folder", "one_file", "write_part10"]
