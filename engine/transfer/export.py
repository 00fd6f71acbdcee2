"""Export: stored instances as Part-10 files whose dataset bytes are those received.

Three ways to lay them out (docs/export.md): `flat` (`<SOP Instance UID>.dcm`), `tree`
(patient/study/series folders with readable, sanitized names, engine.transfer.export_names) and
a PS3.10 File-set with a DICOMDIR (engine.transfer.export_dicomdir). Every file is written to a
temporary name and renamed into place, so a partial file never has a final name; a file
already there with the same data set (length and CRC-32) is left as it is, so re-running
an export writes only what is missing or damaged.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from stowage.catalog.reader import Catalog
from stowage.engine.transfer import export_dicomdir, export_names
from stowage.engine.transfer.export_files import open_new
from stowage.engine.store.filemeta import PREAMBLE, group_length
from stowage.engine.store.integrity import marks_of
from stowage.engine.store.locate import Locator, RecordGone
from stowage.engine.store.segment import stream_payload

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same sums
    from zlib import crc32

SELECTORS = {"patient": "patient_id", "study": "study_instance_uid",
             "series": "series_instance_uid", "instance": "sop_instance_uid"}
LAYOUTS = ("flat", "tree")
_CHUNK = 1 << 20

# The patient an instance belongs to: Patient ID with its issuer; without an ID, its study.
_PATIENT_KEY = ("coalesce(issuer_of_patient_id, '')", "coalesce(patient_id, '')",
                "CASE WHEN coalesce(patient_id, '') = '' THEN coalesce(study_instance_uid, '') ELSE '' END")


class ExportError(Exception):
    """The export cannot go on (out folder unwritable, disk full): one line for the user."""


@dataclass
class ExportResult:
    written: int = 0
    skipped: int = 0  # already in place with the same data set
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Item:
    """One instance to write, and where its record lives."""
    uid: str
    segment: str
    offset: int
    dataset_length: int | None
    dataset_crc32: int | None
    instance_number: str | None
    patient: tuple[str, str, str]
    study_uid: str
    series_uid: str


def _where(level: str | None) -> str:
    return f" WHERE {SELECTORS[level]} IN (SELECT unnest(?))" if level else ""


def _items(execute: Callable, level: str | None, values: list[str]) -> list[Item]:
    sql = ("SELECT sop_instance_uid, segment, \"offset\", dataset_length, dataset_crc32, instance_number, "
           f"{', '.join(_PATIENT_KEY)}, coalesce(study_instance_uid, ''), coalesce(series_instance_uid, '') "
           f"FROM instances{_where(level)} ORDER BY segment, \"offset\"")
    _cols, rows = execute(sql, [values] if level else [])
    return [Item(r[0], r[1], r[2], r[3], r[4], r[5], (r[6], r[7], r[8]), r[9], r[10]) for r in rows]


def _first(execute: Callable, key: str, columns: str, level: str | None, values: list[str]) -> dict:
    """key -> the `columns` of the earliest-received instance with that key, over every
    instance (not only the selected ones) of the keys the selection touches: a folder's
    name then does not depend on what was selected, nor change when more arrives."""
    cols = [c.strip() for c in columns.split(",")]
    firsts = ", ".join(f"first({c} ORDER BY received_at, sop_instance_uid)" for c in cols)
    scope = f"SELECT {key} AS k, * FROM instances"
    sql = (f"SELECT k, {firsts} FROM ({scope}) WHERE k IN (SELECT {key} FROM instances{_where(level)}) "
           "GROUP BY k")
    _cols, rows = execute(sql, [values] if level else [])
    return {tuple(r[0]) if isinstance(r[0], list) else r[0]: r[1:] for r in rows}


def _tree_names(execute: Callable, level: str | None, values: list[str]) -> tuple[dict, dict, dict]:
    patient_key = f"[{', '.join(_PATIENT_KEY)}]"
    patients = _first(execute, patient_key, "patient_name, patient_id", level, values)
    studies = _first(execute, "coalesce(study_instance_uid, '')",
                     "study_date, accession_number, study_id, study_description", level, values)
    series = _first(execute, "coalesce(series_instance_uid, '')",
                    "series_number, modality, series_description", level, values)
    return patients, studies, series


def _plan(catalog: Catalog, level: str | None, values: list[str], tree: bool) -> tuple[list[Item], tuple]:
    def work(execute: Callable) -> tuple[list[Item], tuple]:
        items = _items(execute, level, values)
        return items, (_tree_names(execute, level, values) if tree and items else ({}, {}, {}))
    return catalog.snapshot(work)


def _tree_path(item: Item, names: tuple[dict, dict, dict], existing: export_names.Existing,
               out: Path) -> Path:
    patients, studies, series = names
    p, s, e = patients[item.patient], studies[item.study_uid], series[item.series_uid]
    parts = export_names.tree_parts(export_names.Names(
        item.patient, p[0], p[1], item.study_uid, s[0], s[1], s[2], s[3], item.series_uid, e[0], e[1], e[2]))
    path = out
    for part in parts:
        path = path / existing.name(path, part)
    return path / existing.name(path, export_names.file_name(item.instance_number, item.uid))


def _same(target: Path, item: Item) -> bool:
    """Whether `target` already holds this instance: our preamble, and a data set of the
    stored length and CRC-32 after its file meta."""
    if item.dataset_length is None or item.dataset_crc32 is None:
        return False
    try:
        with open(os.open(target, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:  # a link is never "ours"
            head = f.read(len(PREAMBLE) + 12)
            if head[:len(PREAMBLE)] != PREAMBLE:
                return False
            start = len(PREAMBLE) + group_length(head[len(PREAMBLE):])
            if os.fstat(f.fileno()).st_size != start + item.dataset_length:
                return False
            f.seek(start)
            crc = 0
            while chunk := f.read(_CHUNK):
                crc = crc32(chunk, crc)
            return crc == item.dataset_crc32 & 0xFFFFFFFF
    except (OSError, ValueError, struct.error):  # missing, a folder, unreadable, not ours: rewrite it
        return False


class _Unreadable(Exception):
    """The record could not be read from its segment (corrupt, missing)."""


class _SegmentGone(_Unreadable):
    """The record's segment is not there (compacted away since the export looked it up?)."""


def _payload(segments: Path, item: Item) -> Iterator[bytes]:
    chunks = stream_payload(segments / item.segment, item.offset, item.uid)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except FileNotFoundError as e:  # opening the segment
            raise _SegmentGone(str(e)) from None
        except (OSError, ValueError) as e:  # CorruptRecord is a ValueError
            raise _Unreadable(str(e)) from None
        yield chunk


def _why(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)


def _inside(folder: Path, root: str) -> None:
    """Refuse a folder that a symbolic link (made by someone else in a shared out folder,
    named as stowage would name it) leads out of the export's root."""
    real = os.path.realpath(folder)
    if real != root and not real.startswith(root + os.sep):
        raise ExportError(f"{folder} leads outside the out folder (a symbolic link?); not writing through it")


def write_file(segments: Path, item: Item, target: Path, root: str) -> None:
    """Write one instance to `target` through a temporary name in the same folder;
    `root` is the out folder's real path, which no write may leave."""
    if not target.parent.is_dir():
        there = target.parent
        while not there.exists() and there != there.parent:
            there = there.parent
        _inside(there, root)  # before making folders in it
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"cannot create folder {target.parent}: {_why(e)}") from None
    _inside(target.parent, root)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        with open_new(tmp) as f:
            f.write(PREAMBLE)
            for chunk in _payload(segments, item):
                f.write(chunk)
        os.replace(tmp, target)
    except _Unreadable:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as e:
        _unlink_quietly(tmp)
        raise ExportError(f"cannot write {target}: {_why(e)}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(folders: set[Path]) -> None:
    """Remove the temporary files (`.<name>.<pid>.tmp`) that an export killed mid-file left
    in these folders; a live export's are left alone."""
    for folder in folders:
        try:
            with os.scandir(folder) as it:
                stale = [e.name for e in it if e.name.startswith(".") and e.name.endswith(".tmp")]
        except OSError:
            continue
        for name in stale:
            pid = name[:-len(".tmp")].rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                _unlink_quietly(folder / name)


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {out}: {_why(e)}") from None
    if not out.is_dir():
        raise ExportError(f"{out} is not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write into {out}: permission denied")


@dataclass
class _Run:
    """One export's state: where files go, what was already checked."""
    out: Path
    segments: Path
    layout: str
    names: tuple
    fileset: export_dicomdir.FileSet | None
    locator: Locator
    result: ExportResult = field(default_factory=ExportResult)
    existing: export_names.Existing = field(default_factory=export_names.Existing)
    folders: set[Path] = field(default_factory=set)

    def target(self, item: Item) -> Path:
        if self.fileset is not None:
            return self.fileset.path(item.patient, item.study_uid, item.series_uid, item.uid)
        if self.layout == "tree":
            return _tree_path(item, self.names, self.existing, self.out)
        return self.out / f"{export_names.uid_name(item.uid)}.dcm"

    def one(self, item: Item, root: str) -> None:
        target = self.target(item)
        if target.parent not in self.folders and target.parent.exists():
            _inside(target.parent, root)  # before reading what is there, too
        self.folders.add(target.parent)
        if _same(target, item):
            self.result.skipped += 1
            return
        try:
            self._write(item, target, root)
        except _Unreadable as e:
            self.result.failed.append(f"{item.uid}: {e}")
            if self.fileset is not None:
                self.fileset.forget(item.uid)
            return
        self.result.written += 1

    def _write(self, item: Item, target: Path, root: str) -> None:
        """write_file; if the record's segment was compacted away meanwhile, from where
        the catalog has the record now (engine/store/locate.py)."""
        try:
            write_file(self.segments, item, target, root)
        except _SegmentGone as e:
            try:
                where = self.locator.elsewhere(item.uid, item.segment, item.offset, e)
            except RecordGone as gone:
                raise _Unreadable(str(gone)) from None
            write_file(self.segments, replace(item, **vars(where)), target, root)


def _lock(out: Path) -> int:
    """Hold the out folder for a --dicomdir export: two at once would each write a DICOMDIR
    without the other's instances."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ExportError(f"another export is writing a DICOMDIR into {out}; wait for it to finish") from None
    return fd


def export(data_dir: Path, out: Path, level: str | None, values: list[str],
           duplicates: str = "keep-newest", layout: str = "flat", dicomdir: bool = False,
           progress: Callable[[int, int], None] | None = None, cluster: bool = False) -> ExportResult:
    """Write the selected instances under `out`; raises ExportError when it cannot go on.
    `progress(done, total)` is called after each instance; `cluster`: the other nodes'
    instances too (their segments read from the bucket)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    catalog = Catalog(data_dir / "catalog", duplicates, cluster=cluster)
    try:
        items, names = _plan(catalog, level, values, tree=layout == "tree" and not dicomdir)
    finally:
        catalog.close()
    _prepare_out(out)
    lock = _lock(out) if dicomdir else None
    try:
        try:
            fileset = export_dicomdir.FileSet(out) if dicomdir else None
        except export_dicomdir.FileSetError as e:
            raise ExportError(str(e)) from None
        run = _Run(out, data_dir / "segments", layout, names, fileset, Locator(data_dir, duplicates, cluster), folders={out})
        root, marks = os.path.realpath(out), marks_of(data_dir)
        try:
            for done, item in enumerate(tqdm(items, unit="inst", disable=None, leave=False), 1):
                mark = marks.get(item.segment, item.offset)
                if mark is not None:  # found corrupt by verify or the scrub: never exported (engine/store/integrity.py)
                    run.result.failed.append(f"{item.uid}: stored record marked corrupt by {mark.by} "
                                             f"({item.segment} @ {item.offset}): {mark.problem}")
                else:
                    run.one(item, root)
                if progress is not None:
                    progress(done, len(items))
        finally:
            run.locator.close()
        if fileset is not None:
            try:
                run.result.failed.extend(fileset.write())
            except OSError as e:
                raise ExportError(f"cannot write {out / 'DICOMDIR'}: {_why(e)}") from None
    finally:
        if lock is not None:
            os.close(lock)
    sweep(run.folders)
    return run.result


def describe(result: ExportResult, out: Path) -> str:
    """The summary line the CLI prints."""
    extra = f" ({result.skipped} already there)" if result.skipped else ""
    return f"exported {result.written + result.skipped} instance(s) to {out}{extra}"

