"""docs/conformance.md cannot go stale: its generated tables must be what ops/conformance.py
makes from the code now, and they must name what a worker really negotiates."""
from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conformance.md"


def generator():
    spec = importlib.util.spec_from_file_location("ops_conformance", ROOT / "ops" / "conformance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_parts_are_current():
    committed = DOC.read_text()
    fresh = generator().render(committed)
    diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                             "docs/conformance.md", "what the code says now", n=1))[:60])
    assert fresh == committed, f"run: python ops/conformance.py --write\n{diff}"


def test_a_stale_table_is_rewritten():
    """A row dropped from a generated table (as when a class is added to the code) is put back."""
    committed = DOC.read_text()
    row = next(line for line in committed.splitlines() if line.startswith("| 1.2.840.10008.5.1.4.1.1.2 |"))
    stale = committed.replace(row + "\n", "", 1)
    assert stale != committed
    assert generator().render(stale) == committed


def test_every_negotiated_context_and_identification_is_stated():
    from stowage.engine.runtime.config import Config
    from stowage.workers.services import build_ae
    ae = build_ae(Config())
    text = DOC.read_text()
    for cx in ae.supported_contexts:
        assert f"{cx.abstract_syntax}" in text, cx.abstract_syntax
        for syntax in cx.transfer_syntax:
            assert f"| {syntax} |" in text or f"({syntax})" in text, syntax
    assert str(ae.implementation_class_uid) in text and ae.implementation_version_name in text


def test_every_generated_part_is_closed():
    text = DOC.read_text()
    begins = re.findall(r"<!-- begin generated: ([a-z-]+) -->", text)
    ends = re.findall(r"<!-- end generated: ([a-z-]+) -->", text)
    assert begins == ends and set(begins) == set(generator().SECTIONS)
