"""Ask the kernel to start reading a batch of records before they are read one by one: a
WADO-RS series from a cold page cache otherwise waits on each record's read (its head for
the answer's length, then its payload) in turn, a disk round trip each. posix_fadvise
(WILLNEED) queues the reads of whole runs of records at once and returns; the reads that
follow find the pages there or in flight. Advice only: nothing fails because of it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

MAX_BYTES = 256 << 20  # advised per call: past it the kernel's own readahead carries on
_SLACK = 64 << 10  # a record's prefix, header and file meta beyond its data set's length


def spans(records: Iterable[tuple[str, int, int]], limit: int = MAX_BYTES) -> dict[str, list[tuple[int, int]]]:
    """(segment, offset, data set length) of records, in the order they will be read, as
    merged (offset, length) runs per segment: each record's bytes bounded by its data set's
    length (a stored payload is at most that, compressed, plus _SLACK; a run may take in
    a neighbour's bytes); at most `limit` bytes in all, the first records first."""
    wanted: dict[str, list[list[int]]] = {}
    total = 0
    for segment, offset, length in records:
        n = length + _SLACK
        if total + n > limit:
            break
        total += n
        wanted.setdefault(segment, []).append([offset, offset + n])
    out: dict[str, list[tuple[int, int]]] = {}
    for segment, ranges in wanted.items():
        ranges.sort()
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][0] = min(merged[-1][0], start)
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        out[segment] = [(start, end - start) for start, end in merged]
    return out


def will_need(folder: Path, records: Iterable[tuple[str, int, int]], limit: int = MAX_BYTES) -> None:
    """posix_fadvise(WILLNEED) over the records' spans in `folder`'s segments; segments
    that are missing (compacted, in object storage) are left to the reads."""
    for segment, runs in spans(records, limit).items():
        try:
            fd = os.open(folder / segment, os.O_RDONLY)
        except OSError:
            continue
        try:
            for offset, length in runs:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
