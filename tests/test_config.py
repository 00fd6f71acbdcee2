"""Configuration precedence and the CLI's answers to bad input: one line, non-zero exit."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stowage.engine.runtime.config import Config, ConfigError, load

from conftest import HOST, free_port


def stowage(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_defaults_are_the_embedded_ones():
    c = load(None, env={})
    assert (c.aet, c.port, c.data_dir, c.durability, c.duplicates) == \
        ("STOWAGE", 11112, Path("stowage-data"), "fsync", "keep-newest")


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('aet = "FROMFILE"\nport = 2000\nworkers = 3\nzstd_level = 5\n'
                 '[remotes.VIEWER]\nhost = "10.0.0.5"\nport = 104\n')
    c = load(f, env={"STOWAGE_PORT": "3000", "STOWAGE_WORKERS": "4"}, overrides={"workers": 5, "aet": None})
    assert (c.aet, c.port, c.workers, c.zstd_level) == ("FROMFILE", 3000, 5, 5)
    assert c.remotes["VIEWER"].host == "10.0.0.5" and c.remotes["VIEWER"].port == 104
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("values,needle", [({"port": 0}, "port"), ({"aet": "A\\B"}, "aet"),
                                           ({"durability": "maybe"}, "durability"),
                                           ({"durability": "object-store"}, "object-store.*needs storage"),
                                           ({"max_pdu": 0}, "max_pdu"), ({"nonsense": 1}, "nonsense"),
                                           ({"workers": "many"}, "workers"), ({"zstd_level": 23}, "zstd_level"),
                                           ({"zstd_level": -8}, "zstd_level"),
                                           ({"pending_interval": -1}, "pending_interval"),
                                           ({"tls_port": 70000}, "tls_port"), ({"tls_port": 2762}, "tls_cert"),
                                           ({"s3_retries": -1}, "s3_retries"),
                                           ({"remotes": {"X": {"host": "h", "port": 1, "associations": 0}}},
                                            "associations"),
                                           # checked nowhere before: each failed later, elsewhere
                                           ({"log_level": "verbose"}, "log_level"),
                                           ({"network_timeout": -1}, "network_timeout"),
                                           ({"acse_timeout": 0}, "acse_timeout"),
                                           ({"dimse_timeout": float("inf")}, "dimse_timeout"),
                                           ({"drain_timeout": -1}, "drain_timeout"),
                                           ({"segment_size": -5}, "segment_size"),
                                           ({"compact_min_files": 0}, "compact_min_files"),
                                           ({"spill_threshold": -1}, "spill_threshold"),
                                           ({"remotes": 5}, "remotes"),
                                           ({"remotes": {"X": {"host": "h", "port": 70000}}}, "remotes.X.*port"),
                                           ({"remotes": {"X": {"host": "h", "port": 0}}}, "remotes.X.*port"),
                                           ({"remotes": {"X": {"host": "h", "port": True}}}, "remotes.X.*port"),
                                           ({"remotes": {"X": {"host": "", "port": 104}}}, "remotes.X.*host"),
                                           ({"remotes": {"ABCDEFGHIJKLMNOPQ": {"host": "h", "port": 104}}},
                                            "not a valid AE title"),
                                           # TOML values of the wrong type are refused, not converted
                                           ({"port": True}, "port: True is not a whole number"),
                                           ({"workers": 2.5}, "workers: 2.5 is not a whole number"),
                                           ({"cache_writes": "maybe"}, "cache_writes: 'maybe' is not true or false"),
                                           ({"cache_writes": 1}, "cache_writes"),
                                           ({"aet": {"a": 1}}, "aet: .* is not a string"),
                                           ({"data_dir": 5}, "data_dir: 5 is not a path")])
def test_bad_values_name_the_key(values, needle):
    with pytest.raises(ConfigError, match=needle):
        load(None, env={}, overrides=values)


def test_a_bad_environment_variable_is_named():
    """Said as "workers: 'abc' is not a whole number" alone, it was looked for in the file."""
    with pytest.raises(ConfigError, match="workers: 'abc' is not a whole number .*STOWAGE_WORKERS"):
        load(None, env={"STOWAGE_WORKERS": "abc"})


def test_s3_retries_reach_the_s3_client():
    """s3_retries is botocore's retry count (5 by default, as before the key: 6 tries in all);
    tests of an unreachable bucket set fewer, so as not to wait out the backoff."""
    from stowage.engine.storage.objects import ObjectStore
    for retries in (None, 1):
        config = load(None, env={}, overrides={"storage": "s3://bucket/prefix", "s3_endpoint": "http://127.0.0.1:9",
                                               "s3_retries": retries})
        got = ObjectStore(config).client.meta.config.retries
        assert got == {"total_max_attempts": (5 if retries is None else retries) + 1, "mode": "standard"}, got


def test_fast_zstd_levels_and_parallel_associations_are_accepted():
    c = load(None, env={}, overrides={"zstd_level": -1,
                                       "remotes": {"X": {"host": "h", "port": 104, "associations": 4}}})
    assert c.zstd_level == -1 and c.remotes["X"].associations == 4


def test_cli_bad_flag_is_one_clear_line(tmp_path):
    r = stowage("serve", "--data-dir", str(tmp_path), "--port", "70000")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "port" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_bad_config_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("port = [\n")
    r = stowage("serve", "--config", str(f))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "bad.toml" in r.stderr


def test_values_of_the_right_type_still_load():
    """What the stricter types still take: whole floats for sizes, strings from variables,
    and a negative min_free_bytes (the free-space checks off: docs/configuration.md;
    tests/test_bad_input.py's ENOSPC case runs so)."""
    c = load(None, env={"STOWAGE_CACHE_WRITES": "off", "STOWAGE_PORT": "2000", "STOWAGE_LOG_LEVEL": "DEBUG"},
             overrides={"max_storage_bytes": 1e9, "compact_rate": 5, "scrub_rate": 20, "min_free_bytes": -1})
    assert (c.cache_writes, c.port, c.max_storage_bytes, c.compact_rate, c.scrub_rate, c.min_free_bytes) == \
        (False, 2000, 10 ** 9, 5.0, "20", -1)


@pytest.mark.parametrize("content,needle", [(b"\xff\xfeport = 1\n", "not UTF-8"),
                                            (b"remotes = 5\n", "remotes"),
                                            (b'log_level = "verbose"\n', "log_level")])
def test_cli_config_files_that_cannot_be_used(tmp_path, content, needle):
    """A file in UTF-16 (as some Windows editors save), a scalar where tables belong, an
    unknown log level: each used to end in a traceback (log_level once serve set up logging)."""
    f = tmp_path / "stowage.toml"
    f.write_bytes(content)
    r = stowage("serve", "--config", str(f), "--data-dir", str(tmp_path / "d"), "--bind", HOST,
                "--port", str(free_port()), "--workers", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        r = stowage("serve", "--data-dir", str(tmp_path / "d"), "--bind", HOST, "--port",
                    str(s.getsockname()[1]), "--workers", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "cannot listen" in r.stderr


def test_one_server_per_data_dir(server):
    r = stowage("serve", "--data-dir", str(server.data_dir), "--bind", HOST, "--port", str(free_port()),
                "--workers", "1")
    assert r.returncode != 0 and "another stowage process" in r.stderr


def test_export_of_a_missing_archive(tmp_path):
    r = stowage("export", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--all")
    assert r.returncode != 0 and "no archive" in r.stderr and "Traceback" not in r.stderr
