"""engine/store/readahead.py: the records a WADO-RS retrieve is about to read are asked of
the kernel at once (posix_fadvise WILLNEED), as merged runs per segment, bounded."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import wait_for
from stowage.engine.store.readahead import _SLACK, spans, will_need


def test_runs_are_merged_per_segment_in_offset_order_and_bounded():
    records = [("b", 5, 10), ("a", 300_000, 100), ("a", 0, 100), ("a", 100, 100)]
    runs = spans(records, limit=1 << 30)
    assert runs["a"] == [(0, 100 + 100 + _SLACK), (300_000, 100 + _SLACK)]  # adjacent ones joined
    assert runs["b"] == [(5, 10 + _SLACK)]
    first_two = spans(records, limit=2 * (_SLACK + 100))  # the first records first, up to the limit
    assert first_two == {"b": [(5, 10 + _SLACK)], "a": [(300_000, 100 + _SLACK)]}
    assert spans(records, limit=0) == {}


def _resident(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_advised_records_come_into_the_page_cache_and_missing_segments_are_left_alone(tmp_path):
    seg = tmp_path / "segments" / "000-000001.seg"
    seg.parent.mkdir()
    with open(seg, "wb") as f:
        f.write(os.urandom(16 << 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident(seg) > 1 << 20:
        pytest.skip("this file system keeps the file in memory whatever it is advised")
    # eight records stored in 300 kB each, of 400 kB data sets: one run from 4 MB on
    records = [(seg.name, (4 << 20) + i * 300_000, 400_000) for i in range(8)] + [("gone.seg", 0, 1000)]
    will_need(seg.parent, records)  # the missing segment is not an error
    wanted = 7 * 300_000 + 400_000 + _SLACK - 8192  # (less two pages: the run's ends, page-aligned)
    wait_for(lambda: _resident(seg) >= wanted, 60, "the advised records never came into the page cache")
    assert _resident(seg) < 12 << 20  # what was asked for (and the kernel's readahead), not the whole file
