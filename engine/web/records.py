"""The instances a WADO-RS resource names, and their stored bytes.

Lookups read the catalog (the `instances` view: what the duplicates policy serves, never
deleted or rejected ones); bytes come from the segments exactly as stored (the record's
payload: file meta + data set as received). A record compacted away since it was looked
up is looked up again once (engine/store/locate.py); a record marked corrupt by verify or
the scrub is never served (engine/store/integrity.py).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from stowage.catalog.query import decode_header
from stowage.catalog.reader import Catalog
from stowage.engine.store.filemeta import PREAMBLE
from stowage.engine.store.integrity import marks_of
from stowage.engine.store.locate import Locator, RecordGone
from stowage.engine.store.payload_into import Alloc, payload_length, read_payload_into
from stowage.engine.store.readahead import will_need
from stowage.engine.store.segment import CorruptRecord, read_payload, stream_payload
from stowage.engine.storage.objects import ObjectStoreError

IN_MEMORY = 64 << 20  # records up to this size are read in one go; larger ones stream
T = TypeVar("T")


class Unreadable(Exception):
    """The record cannot be served; the message says why."""


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    segment: str
    offset: int
    dataset_length: int
    header: bytes | None

    def dataset_header(self):
        """The stored header (top-level non-bulk elements) as a pydicom Dataset, or None."""
        return decode_header({"h": self.header, "t": self.transfer_syntax_uid})


_COLUMNS = ('study_instance_uid, series_instance_uid, sop_instance_uid, sop_class_uid, transfer_syntax_uid, '
            'segment, "offset", dataset_length')
_ORDER = ("ORDER BY TRY_CAST(series_number AS INTEGER) NULLS LAST, series_instance_uid, "
          "TRY_CAST(instance_number AS INTEGER) NULLS LAST, sop_instance_uid")


def find(catalog: Catalog, study: str, series: str | None = None, instance: str | None = None,
         with_header: bool = False) -> list[Instance]:
    """The instances of a study, a series or one instance, in series then instance order."""
    where, params = ["study_instance_uid = ?"], [study]
    if series is not None:
        where.append("series_instance_uid = ?")
        params.append(series)
    if instance is not None:
        where.append("sop_instance_uid = ?")
        params.append(instance)
    header = ", header" if with_header else ", NULL"
    _cols, rows = catalog.execute(f"SELECT {_COLUMNS}{header} FROM instances WHERE {' AND '.join(where)} {_ORDER}",
                                  params)
    return [Instance(*row) for row in rows]


class SeriesLookups:
    """One instance looked up from its series' rows, fetched in one catalog query and kept
    while the catalog answers as it did (`Catalog.version`): a viewer asks for a series one
    slice at a time (OHIF: `frames/1` of each instance), and each lookup of its own cost a
    DuckDB query over the catalog's files, ~5-8 ms of CPU, more than the rest of the frame.
    The answer is the query's: a row is kept only as long as nothing was stored, sealed,
    deleted or compacted since. Thread-safe; the series used last are kept, up to `keep`
    instances in all (~0.4 kB each)."""

    def __init__(self, catalog: Catalog, keep: int = 50_000) -> None:
        self.catalog, self.keep = catalog, keep
        self._series: OrderedDict[tuple[str, str], tuple[tuple, dict[str, Instance]]] = OrderedDict()
        self._held = 0  # instances in _series
        self._lock = threading.Lock()

    def instance(self, study: str, series: str, instance: str) -> list[Instance]:
        """[the instance] as find(catalog, study, series, instance) gives it, or []."""
        version, key = self.catalog.version(), (study, series)
        with self._lock:
            kept = self._series.get(key)
            if kept is not None and kept[0] == version:
                self._series.move_to_end(key)
                return [kept[1][instance]] if instance in kept[1] else []
        members = {i.sop_instance_uid: i for i in find(self.catalog, study, series)}
        with self._lock:  # under the version read before the query: a change meanwhile refetches
            old = self._series.pop(key, None)
            self._held -= len(old[1]) if old is not None else 0
            if len(members) <= self.keep:
                self._series[key] = (version, members)
                self._held += len(members)
            while self._held > self.keep:
                self._held -= len(self._series.popitem(last=False)[1][1])
        return [members[instance]] if instance in members else []


class Reader:
    """Reads instances' records for one process; thread-safe."""

    def __init__(self, data_dir: Path, duplicates: str, cluster: bool = False) -> None:
        self.segments = data_dir / "segments"
        self.marks = marks_of(data_dir)
        self.locator = Locator(data_dir, duplicates, cluster)

    def _check(self, inst: Instance) -> None:
        mark = self.marks.get(inst.segment, inst.offset)
        if mark is not None:
            raise Unreadable(f"the stored record of {inst.sop_instance_uid} is marked corrupt by {mark.by}: "
                             f"{mark.problem}")

    def _moved(self, inst: Instance, error: Exception) -> Instance:
        try:
            where = self.locator.elsewhere(inst.sop_instance_uid, inst.segment, inst.offset, error)
        except RecordGone as gone:
            raise Unreadable(f"{inst.sop_instance_uid}: {gone}") from None
        return replace(inst, segment=where.segment, offset=where.offset)

    def payload(self, inst: Instance) -> bytes | memoryview:
        """File meta + data set, in memory (for records up to IN_MEMORY and for decoding)."""
        return self._read(inst, read_payload)

    def payload_into(self, inst: Instance, lead: int, alloc: Alloc) -> np.ndarray:
        """payload(), at [lead:] of a buffer from `alloc` (engine/store/payload_into.py)."""
        return self._read(inst, lambda path, offset, uid: read_payload_into(path, offset, lead, alloc, uid))

    def will_need(self, found: list[Instance]) -> None:
        """Start the kernel reading these records (engine/store/readahead.py): a series
        from a cold page cache then reads at the disk's pace, not a round trip a record."""
        will_need(self.segments, ((i.segment, i.offset, i.dataset_length) for i in found))

    def part10_length(self, inst: Instance) -> int | None:
        """The Part-10 file's length, from its record's head, or None when that does not say."""
        n = payload_length(self.segments / inst.segment, inst.offset)
        return None if n is None else len(PREAMBLE) + n

    def _read(self, inst: Instance, read: Callable[[Path, int, str], T]) -> T:
        self._check(inst)
        for attempt in (1, 2):
            try:
                return read(self.segments / inst.segment, inst.offset, inst.sop_instance_uid)
            except FileNotFoundError as e:
                if attempt == 2:
                    raise Unreadable(f"{inst.sop_instance_uid}: its segment is missing") from None
                inst = self._moved(inst, e)
            except (OSError, CorruptRecord, ObjectStoreError) as e:
                raise Unreadable(f"the stored record of {inst.sop_instance_uid} cannot be read: {e}") from None
        raise AssertionError("unreachable")

    def part10(self, inst: Instance) -> bytes:
        return PREAMBLE + bytes(self.payload(inst))

    def chunks(self, inst: Instance) -> Iterator[bytes]:
        """The Part-10 file (preamble, file meta, data set) in chunks, streamed from the
        segment; raises Unreadable (before the first chunk when it can tell)."""
        self._check(inst)
        stream = stream_payload(self.segments / inst.segment, inst.offset, inst.sop_instance_uid)
        try:
            first = next(stream)
        except FileNotFoundError as e:
            inst = self._moved(inst, e)
            stream = stream_payload(self.segments / inst.segment, inst.offset, inst.sop_instance_uid)
            first = next(stream)
        except StopIteration:
            first = b""
        except (OSError, CorruptRecord, ObjectStoreError) as e:
            raise Unreadable(f"the stored record of {inst.sop_instance_uid} cannot be read: {e}") from None
        yield PREAMBLE + first
        try:
            yield from stream
        except (OSError, CorruptRecord, ObjectStoreError) as e:
            raise Unreadable(f"the stored record of {inst.sop_instance_uid} broke off: {e}") from None

    def close(self) -> None:
        self.locator.close()
