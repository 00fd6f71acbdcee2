"""A catalog view's DuckDB spills what does not fit its memory_limit into the data directory's
spool/ (a folder per process, removed when the view closes), never into the working directory
of whoever started the process; `stowage serve` removes the folders of processes killed before
they could (catalog/duckdb_spill.py)."""
from __future__ import annotations

import os
from pathlib import Path

from stowage.catalog.reader import Catalog

from conftest import echo_ok


def test_a_spilling_query_writes_under_spool_and_leaves_nothing(tmp_path, monkeypatch):
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    (data / "catalog").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # DuckDB's default would be ./.tmp here
    catalog = Catalog(data / "catalog", "keep-newest")
    mine = data / "spool" / f"duckdb-{os.getpid()}"
    seen: list[list[str]] = []
    catalog.execute("SET memory_limit = '48MB'")  # a sort of 3M rows (~150 MB) cannot stay in memory
    sort = "SELECT i, md5(i::VARCHAR) AS m FROM range(3000000) t(i) ORDER BY m"
    columns, rows = catalog.execute(f"SELECT count(*), min(m) FROM ({sort})")
    seen.append(sorted(p.name for p in mine.iterdir()) if mine.exists() else [])
    assert rows[0][0] == 3_000_000
    assert not any(cwd.iterdir()), f"DuckDB wrote into the working directory: {list(cwd.iterdir())}"
    assert seen[0], "the sort spilled nothing: the test did not press the memory limit"
    catalog.close()
    assert not mine.exists(), "the view's spill folder outlived the view"


def test_serve_removes_the_spill_folders_of_dead_processes_only(make_server, tmp_path):
    data = tmp_path / "data"
    spool = data / "spool"
    spool.mkdir(parents=True)
    dead = spool / "duckdb-4194304"  # above any pid_max: no process has it
    (dead / "x").mkdir(parents=True)
    (dead / "x" / "duckdb_temp_block-1.block").write_bytes(b"\0" * 4096)
    alive = spool / f"duckdb-{os.getpid()}"  # this test's own process: still running
    alive.mkdir()
    server = make_server("--workers", "1", data_dir=data)
    assert echo_ok(server.port)
    assert not dead.exists(), "serve left a dead process's spill folder"
    assert alive.exists(), "serve removed the spill folder of a process that is still running"
