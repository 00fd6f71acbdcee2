"""Edges of the archive's lifecycle an administrator hits: a deletion given a list with a
mistyped UID in it, and a damaged catalog file met by verify, compact and delete. Real
servers, DCMTK findscu and getscu, the CLI as a user runs it."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from conftest import storescu
from test_delete import delete, find, instances

pytestmark = pytest.mark.timeout(600)


def test_a_mistyped_uid_in_a_list_is_not_passed_over_in_silence(make_server, tmp_path):
    server = make_server("--workers", "1")
    s1, s2, s3 = generate_uid(), generate_uid(), generate_uid()
    files = [*instances(tmp_path / "in", "EDGE1", s1, generate_uid(), 2),
             *instances(tmp_path / "in", "EDGE1", s2, generate_uid(), 2),
             *instances(tmp_path / "in", "EDGE2", s3, generate_uid(), 2)]
    storescu(server.port, files)
    typo = s2[:-1] + ("1" if s2[-1] != "1" else "2")
    q = tmp_path / "q"

    asked = delete(server.data_dir, "--study", f"{s1},{typo}", confirm="n\n")
    assert asked.returncode != 0 and f"not found: no stored instance has study {typo}" in asked.stderr, asked

    r = delete(server.data_dir, "--study", f"{s1},{typo}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "deleted 1 patient(s), 1 study(ies), 1 series, 2 instance(s)" in r.stdout
    assert typo in r.stderr and "matched no stored instance" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    studies = {x.StudyInstanceUID for x in find(server.port, q, "STUDY", "PatientID=EDGE*", "StudyInstanceUID=")}
    assert studies == {s2, s3}

    # run again with the right UIDs: the one deleted already is named, the rest deleted, exit 0
    r = delete(server.data_dir, "--study", f"{s1},{s2}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"deleted already: study {s1}" in r.stderr
    studies = {x.StudyInstanceUID for x in find(server.port, q, "STUDY", "PatientID=EDGE*", "StudyInstanceUID=")}
    assert studies == {s3}
