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
OLD_MODULES = {"engine/served.py": "engine/store/served_versions.py", "engine/client.py": "engine/transfer/requestor.py",
               "catalog/versions.py": "catalog/sealed_uids.py and catalog/versions_table.py",
               # issue #18: engine/ in subpackages, shared receive code out of workers/, the CLI in stowage/cli/
               "engine/config.py": "engine/runtime/config.py",
               "engine/logs.py": "engine/runtime/logs.py",
               "engine/tls.py": "engine/runtime/tls.py",
               "workers/audit.py": "engine/runtime/audit.py",
               "workers/malloc.py": "engine/runtime/malloc.py",
               "engine/segment.py": "engine/store/segment.py",
               "engine/writer.py": "engine/store/writer.py",
               "engine/archive.py": "engine/store/archive.py",
               "engine/recovery.py": "engine/store/recovery.py",
               "engine/slots.py": "engine/store/slots.py",
               "engine/filemeta.py": "engine/store/filemeta.py",
               "engine/integrity.py": "engine/store/integrity.py",
               "engine/locate.py": "engine/store/locate.py",
               "engine/freespace.py": "engine/store/freespace.py",
               "engine/served_versions.py": "engine/store/served_versions.py",
               "engine/rejection.py": "engine/store/rejection.py",
               "engine/commitment.py": "engine/store/commitment.py",
               "engine/quota.py": "engine/lifecycle/quota.py",
               "engine/delete.py": "engine/lifecycle/delete.py",
               "engine/compaction.py": "engine/lifecycle/compaction.py",
               "engine/verify.py": "engine/lifecycle/verify.py",
               "engine/scrub.py": "engine/lifecycle/scrub.py",
               "engine/send.py": "engine/transfer/send.py",
               "engine/export.py": "engine/transfer/export.py",
               "engine/export_dicomdir.py": "engine/transfer/export_dicomdir.py",
               "engine/export_files.py": "engine/transfer/export_files.py",
               "engine/export_names.py": "engine/transfer/export_names.py",
               "engine/convert.py": "engine/transfer/convert.py",
               "engine/requestor.py": "engine/transfer/requestor.py",
               "engine/commit_scu.py": "engine/transfer/commit_scu.py",
               "engine/selection.py": "engine/transfer/selection.py",
               "workers/store.py": "engine/receive/store.py",
               "workers/ingest.py": "engine/receive/ingest.py",
               "workers/negotiation.py": "engine/receive/negotiation.py",
               "workers/spill.py": "engine/receive/spill.py",
               "workers/get_scu.py": "engine/receive/get_scu.py",
               "engine/migrate/command.py": "stowage/cli/migrate.py",
               "engine/send_cli.py": "stowage/cli/send.py",
               "engine/query_cli.py": "stowage/cli/query.py",
               "engine/verify_cli.py": "stowage/cli/verify.py",
               "engine/cli.py": "stowage/cli/__init__.py"}


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
    assert REPO / "engine" / "store" / "archive.py" in sources and not [p for p in sources if "harness" in p.parts]
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
    mention = re.compile(r"(?<![\w./])(stowage\.)?(" + "|".join(
        re.escape(old[:-3]).replace("/", "[./]") for old in OLD_MODULES) + r")(?![\w/])")
    texts = [p for folder in ("engine", "workers", "catalog", "bench", "stowage", "tests", "ops", "docs")
             for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".sh", ".toml")]
    texts += [REPO / "README.md", REPO / "pyproject.toml"]
    offenders = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in texts if p != Path(__file__).resolve()
                 for n, line in enumerate(p.read_text().splitlines(), 1) if mention.search(line)]
    assert not offenders, f"old module names ({OLD_MODULES}) still named:\n" + "\n".join(offenders)
