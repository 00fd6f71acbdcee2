"""The installed layout: everything lives under `stowage.`; nothing imports a bare
`engine`, `workers`, `catalog` or `bench`, so a folder of that name in the current
directory (or another distribution's package) can neither shadow nor be shadowed."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BARE = re.compile(r"^\s*(from|import) (engine|workers|catalog|bench)\b", re.M)


def test_no_module_imports_a_bare_top_level_package():
    offenders = [str(p.relative_to(REPO)) for folder in ("engine", "workers", "catalog", "bench", "tests", "ops")
                 for p in (REPO / folder).rglob("*.py") if BARE.search(p.read_text())]
    assert not offenders, offenders


def test_a_decoy_engine_folder_in_the_working_directory_does_not_shadow_ours(tmp_path):
    for name in ("engine", "workers", "catalog", "bench"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the decoy was imported')\n")
    r = subprocess.run([sys.executable, "-m", "stowage", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "migrate" in r.stdout and "import" in r.stdout
