"""Record integrity: the two checksums every stored record carries, and the durable marks
of the records found corrupt.

A record is intact when (1) its CRC-32 over prefix, header and payload as stored holds,
and (2) the dataset bytes as received (its payload decompressed, after the file meta
group) have the CRC-32 and length recorded at store time, in the catalog row and in the
record's own header. (1) catches damage on disk; (2) also catches bytes damaged before (1)
was computed, and a catalog row that names the wrong record.

Marks live in <data_dir>/corrupt/marks.jsonl, one JSON line per event, each appended with
one write and fsync'd before `mark` returns: {"segment", "offset", "sop_instance_uid",
"problem", "by", "at"} marks a record; the same with "cleared": true lifts the mark (the
record read back intact again, e.g. after its segment was restored from a backup). Every
process reads the file incrementally when its size changes (one stat per lookup); a torn
last line (a crash mid-write) is skipped and never glued to the next one. Storage
commitment fails a marked record (0x0110) and retrieve, send and export never send it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from stowage.engine.runtime.logs import audit_line
from stowage.catalog.durable import fsync_dir
from stowage.engine.store.segment import (CorruptRecord, Record, crc32, decoded, open_record, open_segment,
                                          read_payload)

log = logging.getLogger("stowage.integrity")

DIRECTORY = "corrupt"
MARKS = "marks.jsonl"
_META_HEAD = struct.Struct("<HH2sHI")  # (0002,0000) UL, explicit VR little endian
IN_MEMORY = 32 << 20  # records up to this payload size are checked whole, in memory


# -- the checks ----------------------------------------------------------------------

def dataset_checksum(payload: Iterable[bytes]) -> tuple[int, int]:
    """CRC-32 and length of the dataset bytes of a decoded payload (its file meta group
    skipped); raises CorruptRecord when it does not start with a file meta group."""
    crc, length, meta_left, head = 0, 0, -1, b""
    for chunk in payload:
        if meta_left < 0:
            head += chunk
            if len(head) < _META_HEAD.size:
                continue
            group, element, vr, _res, value = _META_HEAD.unpack_from(head)
            if (group, element, vr) != (2, 0, b"UL"):
                raise CorruptRecord("record payload does not start with a file meta group")
            meta_left = _META_HEAD.size + value
            chunk, head = head, b""
        if meta_left:
            skip = min(meta_left, len(chunk))
            meta_left -= skip
            chunk = chunk[skip:]
        crc = crc32(chunk, crc)
        length += len(chunk)
    if meta_left < 0:
        raise CorruptRecord("record payload does not start with a file meta group")
    return crc, length


def _paced(chunks: Iterator[bytes], pace: Callable[[int], None] | None) -> Iterator[bytes]:
    for chunk in chunks:
        if pace is not None:
            pace(len(chunk))
        yield chunk


def read_back(rec: Record, stored: Iterator[bytes], pace: Callable[[int], None] | None = None) -> tuple[int, int]:
    """(CRC-32, length) of the dataset of `rec`, from its stored payload chunks (as
    `open_record` gives them), the record CRC checked on the way; raises CorruptRecord.
    Damaged compressed bytes show before the CRC at the end does: the CRC's verdict is then
    the one reported, as it says more."""
    chunks = _paced(stored, pace)
    try:
        return dataset_checksum(decoded(rec, chunks))
    except CorruptRecord as e:
        try:
            for _ in chunks:  # the rest, for the record CRC (a no-op if that raised already)
                pass
        except CorruptRecord as crc_error:
            raise crc_error from None
        raise e


def checksum_in_memory(payload: bytes | memoryview) -> tuple[int, int]:
    """`dataset_checksum` of a payload held whole in memory, without copying it."""
    view = memoryview(payload)
    if len(view) < _META_HEAD.size:
        raise CorruptRecord("record payload does not start with a file meta group")
    group, element, vr, _res, value = _META_HEAD.unpack_from(view)
    if (group, element, vr) != (2, 0, b"UL") or _META_HEAD.size + value > len(view):
        raise CorruptRecord("record payload does not start with a file meta group")
    data = view[_META_HEAD.size + value:]
    return crc32(data), len(data)


def record_dataset(path: Path, rec: Record, stored: Iterator[bytes],
                   pace: Callable[[int], None] | None = None) -> tuple[int, int]:
    """(CRC-32, length) of the dataset of `rec` (from `open_record` on `path`), its record
    CRC checked first; raises CorruptRecord. A record of up to IN_MEMORY bytes (stored
    and decompressed) is read whole (one read, one CRC pass, one decompression: twice as
    fast as a stream of chunks), a larger one streamed."""
    dataset_length = rec.header.get("dataset_length")
    if rec.payload_length > IN_MEMORY or not isinstance(dataset_length, int) or dataset_length > IN_MEMORY:
        return read_back(rec, stored, pace)  # memory stays bounded, whatever the record's size
    if pace is not None:
        pace(rec.payload_length)
    return checksum_in_memory(read_payload(path, rec.offset))


def dataset_problem(crc: int, length: int, want_crc: int | None, want_length: int | None, whose: str) -> str | None:
    """What differs between the dataset read back and what `whose` recorded, if anything."""
    if want_crc is None or want_length is None:
        return None
    if length != want_length:
        return f"dataset length {length} differs from {whose} ({want_length})"
    if crc != (want_crc & 0xFFFFFFFF):
        return f"dataset CRC-32 {crc:08x} differs from {whose} ({want_crc & 0xFFFFFFFF:08x})"
    return None


def check_record(path: Path, offset: int, dataset_crc: int, dataset_length: int) -> str | None:
    """None when the record at `offset` of `path` reads back intact and holds the dataset
    the catalog row describes; else what is wrong with it."""
    try:
        with open_segment(path) as f:
            rec, stored = open_record(f, offset)
            crc, length = record_dataset(path, rec, stored)
    except CorruptRecord as e:
        return str(e)
    except OSError as e:
        return f"cannot read {path.name}: {e.strerror or e}"
    return dataset_problem(crc, length, dataset_crc, dataset_length, "the catalog's")


# -- the marks -----------------------------------------------------------------------

@dataclass(frozen=True)
class Mark:
    segment: str
    offset: int
    sop_instance_uid: str
    problem: str
    by: str
    at: float


class CorruptMarks:
    """The marks of one data directory, as this process last read them; thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = Path(data_dir) / DIRECTORY
        self.path = self.directory / MARKS
        self._lock = threading.Lock()
        self._reset(None)

    def _reset(self, ino: int | None) -> None:
        self._ino, self._pos = ino, 0
        self._marks: dict[tuple[str, int], Mark] = {}
        self.found = 0  # records marked, ever (a mark cleared and found again counts twice)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._ino is not None:
                self._reset(None)
            return
        if st.st_ino != self._ino or st.st_size < self._pos:  # replaced or cut by hand: read anew
            self._reset(st.st_ino)
        if st.st_size == self._pos:
            return
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            data = f.read(st.st_size - self._pos)
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
        for line in data[:end].splitlines():
            self._apply(line)
        self._pos += end

    def _apply(self, line: bytes) -> None:
        try:
            d = json.loads(line)
            key = (str(d["segment"]), int(d["offset"]))
            if d.get("cleared"):
                self._marks.pop(key, None)
                return
            mark = Mark(key[0], key[1], str(d.get("sop_instance_uid", "")), str(d.get("problem", "")),
                        str(d.get("by", "")), float(d.get("at", 0)))
        except (ValueError, KeyError, TypeError):
            return  # a torn line (crash mid-write): it marked nothing
        if key not in self._marks:
            self.found += 1
        self._marks[key] = mark

    def get(self, segment: str, offset: int) -> Mark | None:
        """The mark on the record at (segment, offset), if any; reads what changed first."""
        with self._lock:
            self._refresh()
            return self._marks.get((segment, offset))

    def all(self) -> list[Mark]:
        with self._lock:
            self._refresh()
            return sorted(self._marks.values(), key=lambda m: (m.segment, m.offset))

    def in_segment(self, segment: str) -> dict[int, Mark]:
        with self._lock:
            self._refresh()
            return {off: m for (seg, off), m in self._marks.items() if seg == segment}

    def counts(self) -> tuple[int, int]:
        """(records marked now, records marked ever)."""
        with self._lock:
            self._refresh()
            return len(self._marks), self.found

    def mark(self, segment: str, offset: int, sop_instance_uid: str, problem: str, by: str) -> bool:
        """Mark the record durably (fsync'd) and say so in the audit log; False if it was
        marked already. Raises OSError if the mark could not be written."""
        with self._lock:
            self._refresh()
            if (segment, offset) in self._marks:
                return False
        self._append({"segment": segment, "offset": offset, "sop_instance_uid": sop_instance_uid,
                      "problem": problem, "by": by, "at": round(time.time(), 3)})
        log.error("corrupt record %s @ %d (%s) found by %s: %s", segment, offset, sop_instance_uid or "no UID",
                  by, problem)
        audit_line(f"corrupt record {segment} @ {offset}: {problem}", {
            "event": "corrupt", "segment": segment, "offset": offset, "sop_instance_uid": sop_instance_uid,
            "problem": problem, "by": by})
        return True

    def clear(self, segment: str, offset: int, by: str) -> bool:
        """Lift the mark of a record that reads back intact again; False if none."""
        mark = self.get(segment, offset)
        if mark is None:
            return False
        self._append({"segment": segment, "offset": offset, "sop_instance_uid": mark.sop_instance_uid,
                      "cleared": True, "by": by, "at": round(time.time(), 3)})
        log.warning("record %s @ %d (%s) reads back intact again: its corrupt mark is lifted", segment, offset,
                    mark.sop_instance_uid)
        audit_line(f"corrupt mark lifted {segment} @ {offset}", {
            "event": "corrupt-cleared", "segment": segment, "offset": offset,
            "sop_instance_uid": mark.sop_instance_uid, "by": by})
        return True

    def _append(self, entry: dict) -> None:
        """One line, one write, under an exclusive lock (verify and the scrub may both
        write); a torn line before it is ended first, so it cannot swallow this one."""
        created = not self.path.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            line = (json.dumps(entry) + "\n").encode()
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            while line:
                line = line[os.write(fd, line):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.directory)


_shared: dict[str, CorruptMarks] = {}
_shared_lock = threading.Lock()


def marks_of(data_dir: Path) -> CorruptMarks:
    """This process's reader of the marks of `data_dir` (one per directory)."""
    key = os.path.abspath(data_dir)
    with _shared_lock:
        marks = _shared.get(key)
        if marks is None:
            marks = _shared[key] = CorruptMarks(Path(key))
        return marks
