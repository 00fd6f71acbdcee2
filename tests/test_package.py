"""The installed layout: everything lives under `stowage.`; nothing imports a bare
`engine`, `workers`, `catalog` or `bench`, so a folder of that name in the current
directory (or another distribution's package) can neither shadow nor be shadowed.
Well-known UIDs go by pydicom's names, and renamed modules leave no old name behind."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pydicom.uid
import pytest

REPO = Path(__file__).resolve().parent.parent
BARE = re.compile(r"^\s*(from|import) (engine|workers|catalog|bench|protocol)\b", re.M)


def test_no_module_imports_a_bare_top_level_package():
    folders = ("engine", "workers", "catalog", "bench", "protocol", "tests", "ops")
    offenders = [str(p.relative_to(REPO)) for folder in folders
                 for p in (REPO / folder).rglob("*.py") if BARE.search(p.read_text())]
    assert not offenders, offenders


def test_a_decoy_engine_folder_in_the_working_directory_does_not_shadow_ours(tmp_path):
    for name in ("engine", "workers", "catalog", "bench", "protocol"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the decoy was imported')\n")
    r = subprocess.run([sys.executable, "-m", "stowage", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "migrate" in r.stdout and "import" in r.stdout


# The well-known UIDs that pydicom.uid has no name for: the installed code may write these
# out, as named constants only (`NAME = "1.2..."` at module level).
UIDS_PYDICOM_LACKS = {
    "1.2.840.10008.3.1.1.1": "DICOM Application Context Name",
    "1.2.840.10008.1.20.1": "Storage Commitment Push Model SOP Class",
    "1.2.840.10008.1.20.1.1": "Storage Commitment Push Model SOP Instance",
    "1.2.840.10008.5.1.4.1.2.1.1": "Patient Root Query/Retrieve Information Model - FIND",
    "1.2.840.10008.5.1.4.1.2.2.1": "Study Root Query/Retrieve Information Model - FIND",
    "1.2.840.10008.5.1.4.1.2.3.1": "Patient/Study Only Query/Retrieve Information Model - FIND",
}
# Modules renamed for what they hold; their old names must not come back.
OLD_MODULES = {"engine/served.py": "engine/served_versions.py", "engine/client.py": "engine/requestor.py",
               "catalog/versions.py": "catalog/sealed_uids.py and catalog/versions_table.py"}


def installed_sources() -> list[Path]:
    """The .py files of every package pyproject.toml installs (bench/harness/ is not one)."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = []
    for package in setup["packages"]:
        root = max((p for p in setup["package-dir"] if package == p or package.startswith(p + ".")), key=len)
        folders.append(REPO / setup["package-dir"][root] / Path(*package[len(root):].split(".")[1:]))
    return sorted(p for folder in folders for p in folder.glob("*.py"))


@pytest.mark.unit
def test_well_known_uids_go_by_pydicom_names():
    pydicom_names = {v: k for k, v in vars(pydicom.uid).items() if isinstance(v, str)}
    named = [pydicom_names[uid] for uid in UIDS_PYDICOM_LACKS if uid in pydicom_names]
    assert not named, f"pydicom.uid names these now: use its names {named}"
    sources = installed_sources()
    assert REPO / "engine" / "archive.py" in sources and not [p for p in sources if "harness" in p.parts]
    offenders = []
    for path in sources:
        tree = ast.parse(path.read_text())
        allowed = {id(node.value) for node in tree.body if isinstance(node, ast.Assign) and len(node.targets) == 1
                   and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)
                   and node.value.value in UIDS_PYDICOM_LACKS}
        offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str)
                      and "1.2.840.10008" in node.value and id(node) not in allowed]
    assert not offenders, ("a well-known UID written out: use its pydicom.uid name (pynetdicom.sop_class where "
                           "pydicom has none), or one named constant listed in UIDS_PYDICOM_LACKS:\n"
                           + "\n".join(offenders))


@pytest.mark.unit
def test_old_module_names_are_gone():
    assert not [old for old in OLD_MODULES if (REPO / old).exists()]
    mention = re.compile(r"\b(engine[./](served|client)|catalog[./]versions)\b")
    texts = [p for folder in ("engine", "workers", "catalog", "bench", "stowage", "tests", "ops", "docs")
             for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".sh", ".toml")]
    texts += [REPO / "README.md", REPO / "pyproject.toml"]
    offenders = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in texts if p != Path(__file__).resolve()
                 for n, line in enumerate(p.read_text().splitlines(), 1) if mention.search(line)]
    assert not offenders, f"old module names ({OLD_MODULES}) still named:\n" + "\n".join(offenders)
