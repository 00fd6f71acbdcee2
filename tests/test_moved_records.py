"""A long export or send meets a compaction: the records it looked up at its start are
copied into a new segment and their old segment unlinked (grace 0 here) while it runs.
Every instance still goes out byte-identical, from where the catalog has it now; one
deleted meanwhile is reported as gone, not as a broken segment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from conftest import HOST, dataset_bytes
from stowage.bench import corpus
from stowage.engine.transfer.export import export
from stowage.engine.store.locate import GONE
from stowage.engine.transfer.requestor import Peer
from stowage.engine.transfer.selection import select
from stowage.engine.transfer.send import Sender
from stowage.catalog.reader import Catalog
from test_send import scps  # noqa: F401  (the DCMTK storescp fixture)

pytestmark = pytest.mark.timeout(600)
ENV = {"STOWAGE_SEGMENT_SIZE": "100000", "STOWAGE_COMPACT_GRACE": "0"}


def stowage(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, **ENV))
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def sparse(tmp_path) -> tuple[Path, dict[str, bytes], list[str]]:
    """An archive of small segments, every third instance deleted (so that they are worth
    compacting): its data directory, the kept instances' data sets, the deleted UIDs."""
    paths = corpus.generate(tmp_path / "src", "small", 60, seed=51)
    data = tmp_path / "data"
    stowage("import", str(tmp_path / "src"), "--data-dir", str(data), "--processes", "1", "-q")
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    deleted = sorted(uids)[::3]
    stowage("delete", "--data-dir", str(data), "--instance", ",".join(deleted), "-y")
    return data, {u: dataset_bytes(p) for u, p in uids.items() if u not in deleted}, deleted


def segments(data: Path) -> set[str]:
    return {p.name for p in (data / "segments").glob("*.seg")}


class Compactor:
    """Runs `stowage compact` once, at the first call (from inside the transfer), and
    optionally deletes an instance not yet transferred right after it."""

    def __init__(self, data: Path, delete: str | None = None) -> None:
        self.data, self.delete, self.ran = data, delete, False
        self.before: set[str] = set()

    def __call__(self, *_args) -> None:
        if self.ran:
            return
        self.ran = True
        self.before = segments(self.data)
        stowage("compact", "--data-dir", str(self.data), "--ratio", "0.99")
        if self.delete:
            stowage("delete", "--data-dir", str(self.data), "--instance", self.delete, "-y")

    def check_it_moved_records(self) -> None:
        assert self.ran
        gone = self.before - segments(self.data)
        assert len(gone) >= 2, f"the compaction removed {sorted(gone)}: nothing left to relocate"


def test_export_finds_records_compacted_away_under_it(sparse, tmp_path):
    data, kept, _deleted = sparse
    compactor = Compactor(data)
    result = export(data, tmp_path / "out", None, [], progress=compactor)
    compactor.check_it_moved_records()
    assert result.failed == []
    assert result.written == len(kept)
    out = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p)
           for p in (tmp_path / "out").glob("*.dcm")}
    assert out == kept


def test_export_reports_an_instance_deleted_under_it_as_gone(sparse, tmp_path):
    data, kept, _deleted = sparse
    catalog = Catalog(data / "catalog")
    try:
        _cols, rows = catalog.execute('SELECT segment, sop_instance_uid FROM instances ORDER BY segment, "offset"')
    finally:
        catalog.close()
    names = sorted({segment for segment, _uid in rows})
    assert len(names) >= 3
    # The last instance of the second segment: exported after the compaction, from a
    # segment it compacts (the last segment of a slot is never compacted).
    victim = [uid for segment, uid in rows if segment == names[1]][-1]
    compactor = Compactor(data, delete=victim)
    result = export(data, tmp_path / "out", None, [], progress=compactor)
    compactor.check_it_moved_records()
    assert result.failed == [f"{victim}: {GONE}"]
    assert result.written == len(kept) - 1


def test_send_finds_records_compacted_away_under_it(sparse, scps, tmp_path):
    data, kept, _deleted = sparse
    scp = scps(tmp_path / "received")
    catalog = Catalog(data / "catalog")
    try:
        instances = select(catalog)
    finally:
        catalog.close()
    assert len(instances) == len(kept)
    compactor = Compactor(data)
    sender = Sender(data / "segments", Peer("DEST", HOST, scp.port), "STOWAGE", on_outcome=compactor)
    result = sender.send(instances)
    compactor.check_it_moved_records()
    assert [o.reason for o in result.failures] == []
    assert result.completed == len(kept)
    assert {u: dataset_bytes(p) for u, p in scp.received().items()} == kept
