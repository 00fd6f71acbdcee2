"""What an HTTP process sets up for STOW-RS when its store opens (engine/web/store.py)."""
from __future__ import annotations

from stowage.engine.runtime.config import Config
from stowage.engine.web import store as web_store


def test_the_http_process_keeps_large_buffers_in_the_heap(tmp_path, monkeypatch):
    """STOW-RS parts, their shuffled copies and zstd frames are CT-sized (~525 KB): the
    HTTP process tunes malloc as the DIMSE workers do, so that they reuse heap pages
    rather than fault in a fresh mmap each (docs/benchmarks.md: faults per instance 90-100
    before, 26-45 after, and half the system CPU). Only once it opens the store path: a
    WebStore that only reads leaves malloc as it is."""
    calls = []
    monkeypatch.setattr(web_store, "keep_large_buffers_in_heap", lambda: calls.append(1) or True)
    store = web_store.WebStore(Config(data_dir=tmp_path / "data"))
    try:
        assert calls == []
        store.archive()
        assert calls == [1]
    finally:
        store.close()
