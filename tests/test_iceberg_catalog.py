"""The catalog as Apache Iceberg tables (issue #24, docs/scale-out.md): what stowage stored
and deleted is read back by pyiceberg and DuckDB with stowage stopped; two publishers
committing to one catalog at once all land, none twice; a publisher killed with SIGKILL
between copying and committing, or between committing and recording it, loses and
doubles nothing when it starts again. SQL catalog on SQLite with a local warehouse, and
SeaweedFS's Iceberg REST catalog with the warehouse in its S3 buckets."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from conftest import HOST, MR, catalog_sealed, copies, free_port, wait_for
from s3_server import s3_server  # noqa: F401 - the session's SeaweedFS (fixture)
from stowage.catalog import iceberg_outbox, tombstones
from stowage.catalog.schema import SCHEMA
from stowage.catalog.sealer import compact, seal_rows
from stowage.engine.iceberg import ledger
from test_find import storescu


def _sqlite(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'iceberg-catalog.db'}"


def _catalog(uri: str, **props: str):
    from pyiceberg.catalog import load_catalog
    kind = {"type": "rest", "oauth2-server-uri": f"{uri}/v1/oauth/tokens"} if uri.startswith("http") else {"type": "sql"}
    return load_catalog("stowage", uri=uri, **kind, **props)


def _publish(data_dir: Path, uri: str, fault: str = "", **env: str) -> subprocess.Popen:
    """`stowage iceberg publish` on `data_dir`, as a process of its own."""
    env = dict(os.environ, STOWAGE_ICEBERG_CATALOG=uri, STOWAGE_NODE_NAME=data_dir.name, **env)
    if fault:
        env["STOWAGE_ICEBERG_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "stowage.cli", "iceberg", "publish", "--data-dir", str(data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _publish_here(data_dir: Path, uri: str, **env: str) -> tuple[int, str]:
    """`stowage iceberg publish` on `data_dir` in this process (no fault injection here)."""
    from click.testing import CliRunner
    from stowage.cli import main
    r = CliRunner().invoke(main, ["iceberg", "publish", "--data-dir", str(data_dir)],
                           env={"STOWAGE_ICEBERG_CATALOG": uri, "STOWAGE_NODE_NAME": data_dir.name, **env})
    return r.exit_code, r.output + (repr(r.exception) if r.exception and r.exit_code != 1 else "")


def _finished(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def _seal_files(data_dir: Path, files: int, rows: int) -> list[str]:
    """Seal `files` catalog files of `rows` rows each with the real sealer; their UIDs."""
    (data_dir / "catalog").mkdir(parents=True, exist_ok=True)
    uids = []
    for f in range(files):
        batch = []
        for r in range(rows):
            uid = f"2.25.{abs(hash(data_dir.name)) % 10**8}.{f}.{r}"
            uids.append(uid)
            batch.append({**{c: None for c in SCHEMA.names}, "sop_instance_uid": uid, "study_instance_uid": "1.2.3",
                          "segment": f"{data_dir.name}-0001.seg", "offset": (f * rows + r) * 100,
                          "record_length": 100, "received_at": 1_700_000_000_000_000 + f * rows + r})
        seal_rows(data_dir / "catalog", batch)
    return uids


def _uids(table) -> list[str]:
    return table.scan(selected_fields=("sop_instance_uid",)).to_arrow()["sop_instance_uid"].to_pylist()


def _local_paths(table) -> list[str]:
    return [p.removeprefix("file://") for p in table.inspect.data_files().column("file_path").to_pylist()]


def test_stored_and_deleted_instances_are_read_by_pyiceberg_and_duckdb_with_stowage_stopped(make_server, tmp_path):
    uri = _sqlite(tmp_path)
    server = make_server("--workers", "1", STOWAGE_ICEBERG_CATALOG=uri, STOWAGE_ICEBERG_INTERVAL="0.3",
                         STOWAGE_NODE_NAME="node-a")
    files = copies(MR, tmp_path / "in", 16, "ice")
    storescu(server.port, files)
    data = server.data_dir
    wait_for(lambda: catalog_sealed(data) and not iceberg_outbox.pending(data / "catalog")
             and ledger.load(data / "iceberg").instance_rows >= len(files), 60,
             lambda: f"every instance in Iceberg; the server's log:\n{server.log()[-3000:]}")
    import pydicom
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    gone = sorted(sent)[:2]
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "delete", "--data-dir", str(data), "--yes",
                        "--instance", ",".join(gone)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: ledger.load(data / "iceberg").deletion_rows >= 2, 60,
             lambda: f"the deletions in Iceberg; the server's log:\n{server.log()[-3000:]}")
    assert server.stop() == 0

    catalog = _catalog(uri)  # stowage is stopped: Iceberg alone answers
    instances, deletions = catalog.load_table("stowage.instances"), catalog.load_table("stowage.deletions")
    uids = _uids(instances)
    assert sorted(uids) == sorted(sent), "every stored instance once, nothing else"
    dels = deletions.scan().to_arrow()
    assert sorted(dels["sop_instance_uid"].to_pylist()) == gone
    assert set(dels["reason"].to_pylist()) == {"deleted"} and set(dels["node"].to_pylist()) == {"node-a"}
    assert all(p.split("/")[-2] == "node-a" for p in _local_paths(instances)), "data files under the node's name"

    # DuckDB (its iceberg extension cannot be installed offline): over the data files the
    # table lists, and over pyiceberg's scan.
    con = duckdb.connect()
    live = con.execute("SELECT count(*) FROM read_parquet(?) i ANTI JOIN read_parquet(?) d "
                       "USING (sop_instance_uid, received_at)",
                       [_local_paths(instances), _local_paths(deletions)]).fetchone()[0]
    assert live == len(sent) - 2
    scanned = instances.scan().to_duckdb("instances")
    assert scanned.execute("SELECT count(DISTINCT sop_instance_uid), count(*) FROM instances").fetchone() == \
        (len(sent), len(sent))


def test_publisher_killed_mid_commit_loses_and_doubles_nothing(tmp_path):
    uri = _sqlite(tmp_path)
    node = tmp_path / "node-k"
    expected = _seal_files(node, 6, 4)
    tombstones.append(node, [tombstones.Tombstone(expected[0], 1_700_000_000_000_000, reason="deleted")])
    batch2 = {"STOWAGE_ICEBERG_BATCH_FILES": "2"}
    # Killed after its first commit landed, before the ledger knew.
    code, out = _finished(_publish(node, uri, "instances-committed", **batch2))
    assert code == -signal.SIGKILL, out
    instances = _catalog(uri).load_table("stowage.instances")
    assert len(_uids(instances)) == 8 and ledger.load(node / "iceberg").batch is not None
    # Again: it finds that batch landed, copies the next one and is killed before committing it.
    code, out = _finished(_publish(node, uri, "instances-uploaded", **batch2))
    assert code == -signal.SIGKILL, out
    assert len(_uids(_catalog(uri).load_table("stowage.instances"))) == 8, "the first batch once"
    # A merge of the sealed files meanwhile must not change what reaches Iceberg. Then the
    # rest, and the deletion: killed after its commit landed.
    assert compact(node / "catalog", 2) is not None
    code, out = _finished(_publish(node, uri, "deletions-committed", **batch2))
    assert code == -signal.SIGKILL, out
    code, out = _publish_here(node, uri, **batch2)
    assert code == 0, out
    catalog = _catalog(uri)
    instances = catalog.load_table("stowage.instances")
    assert sorted(_uids(instances)) == sorted(expected)
    copied = sorted(p.name for p in Path(_local_paths(instances)[0]).parent.glob("*.parquet"))
    assert copied == sorted(Path(p).name for p in _local_paths(instances)), "each file copied once, all committed"
    dels = catalog.load_table("stowage.deletions").scan().to_arrow()
    assert dels["sop_instance_uid"].to_pylist() == [expected[0]]
    led = ledger.load(node / "iceberg")
    assert (led.batch, led.instance_files, led.instance_rows, led.deletion_rows) == (None, 6, 24, 1)


def test_rest_catalog_and_s3_warehouse_on_seaweedfs(s3_server, tmp_path):  # noqa: F811 - the fixture
    """Two nodes publish to SeaweedFS's Iceberg REST catalog at once; the tables' data files
    are objects in its table bucket, and pyiceberg and DuckDB read them back."""
    import boto3
    bucket = f"ice-{os.getpid()}-{tmp_path.name[-6:]}".lower().replace("_", "-")
    boto3.client("s3tables", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                 aws_secret_access_key=s3_server.secret_key, region_name=s3_server.region
                 ).create_table_bucket(name=bucket)
    credential = f"{s3_server.access_key}:{s3_server.secret_key}"
    env = {**s3_server.env(), "STOWAGE_ICEBERG_WAREHOUSE": f"s3://{bucket}", "STOWAGE_ICEBERG_BATCH_FILES": "2",
           "PYICEBERG_CATALOG__STOWAGE__CREDENTIAL": credential}
    nodes = [tmp_path / "rest-a", tmp_path / "rest-b"]
    expected = [uid for node in nodes for uid in _seal_files(node, 6, 3)]
    tombstones.append(nodes[0], [tombstones.Tombstone(expected[0], 1_700_000_000_000_000)])
    procs = [_publish(node, s3_server.iceberg_url, **env) for node in nodes]
    for proc in procs:
        code, out = _finished(proc)
        assert code == 0, out
    catalog = _catalog(s3_server.iceberg_url, warehouse=f"s3://{bucket}", credential=credential,
                       **{"s3.endpoint": s3_server.endpoint, "s3.access-key-id": s3_server.access_key,
                          "s3.secret-access-key": s3_server.secret_key, "s3.region": s3_server.region})
    instances = catalog.load_table("stowage.instances")
    assert sorted(_uids(instances)) == sorted(expected)
    paths = instances.inspect.data_files().column("file_path").to_pylist()
    assert len(paths) == 12 and all(p.startswith(f"s3://{bucket}/") for p in paths)
    objects = s3_server.objects(bucket)
    assert all(p[len(f"s3://{bucket}/"):] in objects for p in paths), "every data file is an object in the bucket"
    con = instances.scan().to_duckdb("instances")
    assert con.execute("SELECT count(DISTINCT sop_instance_uid) FROM instances").fetchone()[0] == len(expected)
    assert catalog.load_table("stowage.deletions").scan().to_arrow()["sop_instance_uid"].to_pylist() == [expected[0]]


def test_sql_catalog_with_its_warehouse_in_an_s3_bucket(s3_server, tmp_path):  # noqa: F811 - the fixture
    bucket = s3_server.new_bucket("warehouse")
    uri = _sqlite(tmp_path)
    node = tmp_path / "s3-node"
    expected = _seal_files(node, 3, 4)
    code, out = _publish_here(node, uri, **s3_server.env(), STOWAGE_ICEBERG_WAREHOUSE=f"s3://{bucket}/archive")
    assert code == 0, out
    catalog = _catalog(uri, **{"s3.endpoint": s3_server.endpoint, "s3.access-key-id": s3_server.access_key,
                               "s3.secret-access-key": s3_server.secret_key, "s3.region": s3_server.region})
    instances = catalog.load_table("stowage.instances")
    assert sorted(_uids(instances)) == sorted(expected)
    keys = s3_server.objects(bucket, "archive/")
    assert sum(1 for k in keys if k.endswith(".parquet") and "/data/s3-node/" in k) == 3


def test_a_catalog_uri_of_no_known_kind_is_refused_in_one_line(tmp_path):
    _seal_files(tmp_path / "n", 1, 1)
    code, out = _publish_here(tmp_path / "n", "mysql://somewhere/db")
    assert code == 1 and "iceberg_catalog" in out and "Traceback" not in out, out


def test_a_catalog_rebuilt_after_it_was_published_is_not_published_twice(tmp_path):
    from stowage.catalog import manifest
    uri, node = _sqlite(tmp_path), tmp_path / "node-r"
    expected = _seal_files(node, 2, 3)
    code, out = _publish_here(node, uri)
    assert code == 0, out
    with manifest.update(node / "catalog") as m:  # what `stowage rebuild-catalog` leaves: a manifest without an outbox
        m.outbox = None
    code, out = _publish_here(node, uri)
    assert code == 1 and "rebuilt" in out and "count its rows twice" in out and "Traceback" not in out, out
    assert sorted(_uids(_catalog(uri).load_table("stowage.instances"))) == sorted(expected)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL of our own (Debian package postgresql) on a free loopback port, its data
    in a temporary folder, trust authentication; run as the postgres user when we are root.
    Yields the SQLAlchemy URI of an empty database; stopped by PID."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (ops/test.sh does)")
    bin_dir = Path(found[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="stowage-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(base, "postgres")
    port = free_port()
    subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(base / "db"), "-A", "trust", "-U", "stowage"],
                   check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen([*as_postgres, str(bin_dir / "postgres"), "-D", str(base / "db"), "-p", str(port),
                             "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={base}",
                             "-c", "fsync=off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: subprocess.run([str(bin_dir / "pg_isready"), "-h", HOST, "-p", str(port)],
                                        capture_output=True).returncode == 0, 60, "PostgreSQL to accept connections")
        subprocess.run([str(bin_dir / "createdb"), "-h", HOST, "-p", str(port), "-U", "stowage", "iceberg"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://stowage@{HOST}:{port}/iceberg"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # fast shutdown of our postmaster (its session)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def test_two_nodes_publish_to_a_postgresql_catalog_at_once(postgres, tmp_path):
    """Two data directories (two nodes) commit one file per commit to one catalog at the
    same time: the losers of each race commit the same files again."""
    nodes = [tmp_path / "pg-a", tmp_path / "pg-b"]
    expected = []
    for node in nodes:
        expected += _seal_files(node, 8, 3)
        tombstones.append(node, [tombstones.Tombstone(f"{node.name}.deleted.{i}", 1000 + i) for i in range(3)])
    env = {"STOWAGE_ICEBERG_BATCH_FILES": "1", "STOWAGE_ICEBERG_WAREHOUSE": (tmp_path / "warehouse").as_uri()}
    procs = [_publish(node, postgres, **env) for node in nodes]
    for proc in procs:
        code, out = _finished(proc)
        assert code == 0, out
    catalog = _catalog(postgres)
    instances = catalog.load_table("stowage.instances")
    assert sorted(_uids(instances)) == sorted(expected)
    assert len(_local_paths(instances)) == 16
    dels = catalog.load_table("stowage.deletions").scan().to_arrow()
    assert sorted(dels["sop_instance_uid"].to_pylist()) == sorted(f"{n.name}.deleted.{i}" for n in nodes
                                                                 for i in range(3))
    for node in nodes:
        led = ledger.load(node / "iceberg")
        assert (led.instance_files, led.instance_rows, led.batch) == (8, 24, None)
        assert iceberg_outbox.pending(node / "catalog") == []
        print(f"{node.name}: {led.commits} commits, {led.conflicts} conflicts retried")
        code, out = _publish_here(node, postgres, **env)  # a second pass finds nothing left to do
        assert code == 0 and "published 0 catalog file(s)" in out and "0 deletion(s)" in out, out
    instances = catalog.load_table("stowage.instances")
    assert sorted(_uids(instances)) == sorted(expected)
    # What node A follows of node B: B's files, then nothing new since that snapshot.
    from stowage.engine.iceberg.follow import added_since
    seen = added_since(instances, None, skip_node="pg-a")
    assert (len(seen.files), seen.rows, seen.complete) == (8, 24, True)
    assert all("/data/pg-b/" in f for f in seen.files)
    assert added_since(instances, seen.snapshot_id, skip_node="pg-a").files == []


def test_a_pruned_tombstone_log_publishes_only_what_is_new(tmp_path):
    """`tombstones.prune` rewrites the log (a new file): the publisher reads it afresh and
    commits only the entries the deletions table lacks; a pruned entry stays in Iceberg."""
    uri, node = _sqlite(tmp_path), tmp_path / "node-p"
    _seal_files(node, 1, 1)
    old = [tombstones.Tombstone(f"2.25.{i}", 1000 + i) for i in range(4)]
    tombstones.append(node, old)
    assert _publish_here(node, uri)[0] == 0
    assert tombstones.prune(node, {("2.25.0", 1000)}) == 1
    tombstones.append(node, [tombstones.Tombstone("2.25.9", 2000)])
    code, out = _publish_here(node, uri)
    assert code == 0 and "1 deletion(s)" in out, out
    dels = _catalog(uri).load_table("stowage.deletions").scan().to_arrow()
    assert sorted(dels["sop_instance_uid"].to_pylist()) == ["2.25.0", "2.25.1", "2.25.2", "2.25.3", "2.25.9"]
