"""`stowage query`: read-only SQL over the catalog, run as users run it (a subprocess)."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import find_corpus as fc
from stowage.catalog.sealer import Sealer
from conftest import CT, HOST, copies, dcmtk


def stowage_query(data_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", "query", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """An archive's data directory whose catalog holds the C-FIND corpus: some rows sealed,
    the rest still in a tail, as on a running archive."""
    d = tmp_path_factory.mktemp("query") / "data"
    rows = fc.rows(fc.datasets() + fc.charset_datasets())
    s = Sealer(d / "catalog", 0, compact_min_files=100)
    s.commit(rows[:10])
    s.seal()
    s.commit(rows[10:])
    return d


def test_table_output(data_dir):
    r = stowage_query(data_dir, "SELECT modality, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["modality", "n"] and set(lines[1]) <= {"-", " "}
    assert ["CT", "6"] in [line.split() for line in lines]
    assert lines[-1].startswith("(") and "rows" in lines[-1]


def test_csv_and_json_output(data_dir):
    sql = "SELECT study_instance_uid, modalities, instances FROM studies WHERE patient_id = 'PAT-1' ORDER BY 1"
    r = stowage_query(data_dir, "--format", "csv", sql)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(x["study_instance_uid"], json.loads(x["modalities"]), x["instances"]) for x in rows] == \
        [(fc.uid(1, 1), ["CT", "SR"], "4"), (fc.uid(1, 2), ["MR"], "2")]
    r = stowage_query(data_dir, "--format", "json", sql)
    assert json.loads(r.stdout)[0] == {"study_instance_uid": fc.uid(1, 1), "modalities": ["CT", "SR"], "instances": 4}
    r = stowage_query(data_dir, "--format", "jsonl", "SELECT patient_name, received_at, header FROM instances "
                                                     "WHERE patient_id = 'H31EXAMPLE'")
    row = json.loads(r.stdout)
    assert row["patient_name"] == "Yamada^Tarou=山田^太郎=やまだ^たろう" and "T" in row["received_at"]
    assert isinstance(row["header"], str)  # base64


def test_summary_views_and_header_attributes(data_dir):
    r = stowage_query(data_dir, "--format", "json",
                      "SELECT p.patient_id, p.studies, p.series, p.instances, "
                      "dicom_attribute(i.header, i.transfer_syntax_uid, 'Manufacturer') AS manufacturer, "
                      "dicom_attribute(i.header, i.transfer_syntax_uid, '00180050') AS slice_thickness "
                      "FROM patients p JOIN instances i USING (patient_id) WHERE patient_id = 'PAT-2' LIMIT 1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"patient_id": "PAT-2", "studies": 1, "series": 1, "instances": 2,
                                     "manufacturer": "ACME", "slice_thickness": "2.5"}]


@pytest.mark.parametrize("sql, words", [
    ("COPY (SELECT 1) TO 'out.csv'", "only SELECT"),               # relative: into the working folder
    ("COPY (SELECT 1) TO '{elsewhere}/out.csv'", "only SELECT"),   # absolute
    ("CREATE TABLE t AS SELECT 1", "only SELECT"),
    ("DROP VIEW instances", "only SELECT"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SET enable_external_access = true", "only SELECT"),
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission"),
    ("SELECT * FROM read_parquet('/tmp/*.parquet')", "Permission"),
    ("SELEC 1", "syntax"),
])
def test_only_read_only_queries_run(data_dir, tmp_path, sql, words):
    """Refused with the reason, and nothing written: not in the query's working folder (where
    a relative COPY target goes), not where an absolute one points, not beside the archive."""
    cwd, elsewhere = tmp_path / "cwd", tmp_path / "elsewhere"
    cwd.mkdir()
    elsewhere.mkdir()
    beside = sorted(p.name for p in data_dir.parent.iterdir())
    r = stowage_query(data_dir, sql.format(elsewhere=elsewhere), cwd=cwd)
    assert r.returncode != 0
    assert words in r.stderr
    assert list(cwd.iterdir()) == [] and list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in data_dir.parent.iterdir()) == beside


def test_copy_unguarded_writes_where_the_check_looks(tmp_path):
    """What test_only_read_only_queries_run looks for is where COPY writes: DuckDB itself,
    without stowage's guard, writes a relative target into its working folder and an
    absolute one where it points."""
    cwd, elsewhere = tmp_path / "cwd", tmp_path / "elsewhere"
    cwd.mkdir()
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-c", "import duckdb, sys\nfor sql in sys.argv[1:]:\n    duckdb.sql(sql)",
                        "COPY (SELECT 1 AS n) TO 'out.csv'", f"COPY (SELECT 2 AS n) TO '{elsewhere}/out.csv'"],
                       capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (cwd / "out.csv").read_text() == "n\n1\n"
    assert (elsewhere / "out.csv").read_text() == "n\n2\n"


def test_schema_lists_tables_and_columns(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "query", "--schema"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for word in ("records", "instances", "studies", "patient_name", "received_at", "dicom_attribute"):
        assert word in r.stdout


def test_no_archive_here(tmp_path):
    r = stowage_query(tmp_path, "SELECT 1")
    assert r.returncode != 0 and "no archive" in r.stderr


def test_query_a_running_archive_sees_what_it_just_stored(server, tmp_path):
    files = copies(CT, tmp_path / "in", 7, "q")
    r = subprocess.run([dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(server.port), *map(str, files)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = stowage_query(server.data_dir, "--format", "json", "SELECT count(*) AS n FROM instances")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"n": 7}]
