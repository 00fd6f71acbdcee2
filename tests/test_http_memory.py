"""What one QIDO-RS answer costs an HTTP process follows its pieces, not its size (issue #20,
docs/fuzzing.md#memory).

An HTTP process's resident size followed the largest answer it had made: a QIDO-RS
`instances?includefield=all` over a large study held the whole answer as Python objects
(each instance's DICOM JSON dict) before encoding it, in each of the pool's eight threads,
and the allocator keeps such peaks. engine/web/qido.py now makes and encodes the answer 100
results at a time and writes the pieces as they are. Measured here with tracemalloc (Python's
own allocations, so no timing and no other process counts): 824 CT instances, peak 20.2 MiB
before, 9.1 MiB after, where the catalog query alone peaks at about 9 MiB.
"""
from __future__ import annotations

import itertools
import json
import tracemalloc
from dataclasses import replace
from pathlib import Path

from multidict import MultiDict, MultiDictProxy
from pydicom.data import get_testdata_file

from stowage.bench.harness import damage, fuzz
from stowage.catalog.keys import STUDY_ROOT_FIND
from stowage.catalog.query import parse_request, run
from stowage.catalog.reader import Catalog
from stowage.engine.runtime.config import Config
from stowage.engine.store.archive import Archive
from stowage.engine.web import qido

_INSTANCES = 400  # 4 pieces; before the fix the answer's objects alone were about 5 MiB
_SLACK = 2 << 20  # one piece of 100 results' objects, and what the interpreter does besides


def _peak(work) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_qido_answer_is_made_in_pieces(tmp_path):
    """A QIDO-RS answer of 400 instances with every field: the memory making it needs beyond
    the catalog query's own is its encoded bytes and one piece, not every instance's JSON
    objects at once. The answer is one valid JSON array with every instance, in order."""
    config = replace(Config(), data_dir=tmp_path, durability="os-buffer", seal_interval=3600.0)
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    dataset = ct[damage.meta_end(ct):]
    archive = Archive(config, 0)
    try:
        for n in range(_INSTANCES):
            uid = f"1.2.826.0.1.3680043.8.498.78.{n + 1}"
            assert archive.store(fuzz.with_uid(dataset, uid), "1.2.840.10008.1.2.1", fuzz.CT_STORAGE,
                                 uid).status == 0
        archive.sealer.seal()
    finally:
        archive.close()
    catalog = Catalog(tmp_path / "catalog")
    try:
        wanted = qido.parse_search(MultiDictProxy(MultiDict([("includefield", "all")])), "IMAGE", {}, 1000)
        request = parse_request(wanted.identifier, STUDY_ROOT_FIND, relational=True)
        answer = lambda: qido.search(catalog, wanted, "http://127.0.0.1/dicom-web", "STOWAGE", False)  # noqa: E731
        query = lambda: list(itertools.islice(run(catalog, request), 0, wanted.limit + 1))  # noqa: E731
        answer()  # caches and pools warm (the header JSON pieces, DuckDB's)
        (pieces, found, more), answer_peak = _peak(answer)
        _rows, query_peak = _peak(query)
    finally:
        catalog.close()
    body = b"".join(pieces)
    objects = json.loads(body)
    assert (found, more, len(objects)) == (_INSTANCES, False, _INSTANCES)
    assert [o["00080018"]["Value"][0] for o in objects] == sorted(o["00080018"]["Value"][0] for o in objects)
    assert all(o["00081190"]["Value"][0].startswith("http://127.0.0.1/dicom-web/studies/") for o in objects)
    assert len(pieces) == -(-_INSTANCES // qido._PIECE)
    print(f"peak MiB: answer {answer_peak / 2**20:.1f}, query alone {query_peak / 2**20:.1f}, "
          f"body {len(body) / 2**20:.1f}")
    assert answer_peak < query_peak + len(body) + _SLACK, (answer_peak, query_peak, len(body))
