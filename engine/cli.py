"""The `stowage` command line."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from engine import config as cfg

_COMMON = [
    click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML configuration file."),
    click.option("--data-dir", type=click.Path(path_type=Path), help="Archive data directory [./stowage-data]."),
]


def _common(f):
    for opt in reversed(_COMMON):
        f = opt(f)
    return f


def _load(config_file: Path | None, **overrides) -> cfg.Config:
    try:
        return cfg.load(config_file, overrides=overrides)
    except cfg.ConfigError as e:
        raise click.ClickException(f"configuration: {e}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stowage")
def main() -> None:
    """stowage: a fast, durable DICOM archive."""


@main.command()
@_common
@click.option("--port", type=int, help="TCP port [11112].")
@click.option("--aet", help="Our AE title [STOWAGE].")
@click.option("--bind", help="Address to listen on [0.0.0.0].")
@click.option("--workers", type=int, help="Worker processes [one per core].")
@click.option("--max-associations", type=int, help="Global association cap [64].")
@click.option("--max-pdu", type=int, help="Maximum PDU length we receive [262144].")
@click.option("--durability", type=click.Choice(cfg.DURABILITY_MODES), help="fsync (default) or os-buffer.")
@click.option("--duplicates", type=click.Choice(cfg.DUPLICATE_POLICIES), help="Policy for a re-sent SOP Instance UID.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="stderr log format [text].")
def serve(config_file, **overrides) -> None:
    """Run the archive (acceptor plus worker processes) until SIGTERM/SIGINT."""
    from engine.acceptor import ServeError, serve as run
    from engine.logs import setup_logging
    config = _load(config_file, **overrides)
    setup_logging(config, "acceptor")
    try:
        sys.exit(run(config))
    except ServeError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@_common
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write files into.")
@click.option("--all", "everything", is_flag=True, help="Every stored instance.")
@click.option("--patient", multiple=True, help="Patient ID (repeatable).")
@click.option("--study", multiple=True, help="Study Instance UID (repeatable).")
@click.option("--series", multiple=True, help="Series Instance UID (repeatable).")
@click.option("--instance", multiple=True, help="SOP Instance UID (repeatable).")
def export(config_file, data_dir, out, everything, patient, study, series, instance) -> None:
    """Write stored instances as Part-10 files named <SOP Instance UID>.dcm."""
    from engine.export import export as run
    chosen = [(lvl, list(v)) for lvl, v in (("patient", patient), ("study", study), ("series", series),
                                            ("instance", instance)) if v]
    if len(chosen) + bool(everything) != 1:
        raise click.UsageError("choose exactly one of --all, --patient, --study, --series, --instance")
    config = _load(config_file, data_dir=data_dir)
    if not (config.data_dir / "catalog").exists():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    level, values = chosen[0] if chosen else (None, [])
    result = run(config.data_dir, out, level, values, config.duplicates)
    for failure in result.failed:
        click.echo(f"failed: {failure}", err=True)
    click.echo(f"exported {result.written} instance(s) to {out}")
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} instance(s) could not be exported")


@main.command("rebuild-catalog")
@_common
def rebuild_catalog(config_file, data_dir) -> None:
    """Rebuild the whole catalog from the segment files alone (archive must be stopped)."""
    import fcntl
    from engine.recovery import rebuild
    config = _load(config_file, data_dir=data_dir)
    if not (config.data_dir / "segments").is_dir():
        raise click.ClickException(f"{config.data_dir} holds no segments/ directory")
    with open(config.data_dir / "serve.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise click.ClickException("the archive is running on this data directory; stop it first") from None
        count = rebuild(config.data_dir)
    click.echo(f"catalog rebuilt: {count} record(s) indexed")


@main.command()
@click.argument("target")
@_common
@click.option("--aet", help="Our (calling) AE title [the configured aet].")
@click.option("--aec", help="Called AE title, for a host:port target [ANY-SCP].")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the peer.")
def echo(target, config_file, data_dir, aet, aec, timeout) -> None:
    """C-ECHO a remote AE: a configured AE title, or host:port."""
    from engine.client import PeerError, echo as run, resolve
    from engine.send_cli import quiet_libraries
    quiet_libraries()
    config = _load(config_file, data_dir=data_dir)
    try:
        peer = resolve(target, config, aec)
        status = run(peer, aet or config.aet, timeout)
    except PeerError as e:
        raise click.ClickException(str(e)) from None
    if status != 0:
        raise click.ClickException(f"{peer} answered C-ECHO with status 0x{status:04X}")
    click.echo(f"{peer}: C-ECHO ok")


def _split(values) -> list[str]:
    return [v for value in values for v in value.replace(",", " ").split()]


@main.command()
@_common
@click.option("--to", "target", required=True, help="Destination: a configured AE title, or host:port.")
@click.option("--aet", help="Our (calling) AE title [the configured aet].")
@click.option("--aec", help="Called AE title, for a host:port destination [ANY-SCP].")
@click.option("--patient", multiple=True, help="Patient ID (repeatable).")
@click.option("--study", multiple=True, help="Study Instance UID (repeatable, or comma-separated).")
@click.option("--series", multiple=True, help="Series Instance UID (repeatable, or comma-separated).")
@click.option("--instance", multiple=True, help="SOP Instance UID (repeatable, or comma-separated).")
@click.option("--query", "query_text", help="Catalog matches, e.g. 'Modality=CT PatientName=DOE*'.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for each C-STORE response (one retry on a new association).")
@click.option("--commit", is_flag=True, help="Then ask the destination for storage commitment of what arrived.")
@click.option("--commit-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the commitment report.")
@click.option("--commit-port", type=int, help="Also listen on this port for a report sent on a new association.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def send(config_file, data_dir, target, aet, aec, patient, study, series, instance, query_text, timeout,
         commit, commit_timeout, commit_port, quiet) -> None:
    """Send stored instances to another AE (C-STORE), byte-exact where the peer allows."""
    from engine.send_cli import SendCommandError, run_send
    chosen = [(lvl, _split(v)) for lvl, v in (("patient", patient), ("study", study), ("series", series),
                                              ("instance", instance)) if v]
    if len(chosen) + bool(query_text) != 1:
        raise click.UsageError("choose exactly one of --patient, --study, --series, --instance, --query")
    config = _load(config_file, data_dir=data_dir)
    level, values = chosen[0] if chosen else (None, [])
    try:
        ok = run_send(config, target, level, values, query_text, calling_aet=aet, called_aet=aec,
                      timeout=timeout, commit=commit, commit_timeout=commit_timeout, commit_port=commit_port,
                      progress=not quiet)
    except SendCommandError as e:
        raise click.ClickException(str(e)) from None
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("sql", required=False)
@_common
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "jsonl"]), default="table",
              show_default=True, help="Output format.")
@click.option("--schema", is_flag=True, help="List the tables and columns instead of running a query.")
def query(sql, config_file, data_dir, fmt, schema) -> None:
    """Run one read-only SQL query (DuckDB) over the catalog, e.g.
    stowage query "SELECT modality, count(*) FROM instances GROUP BY 1"."""
    from engine.query_cli import QueryCommandError, print_schema, run_query
    if schema:
        print_schema()
        return
    if not sql:
        raise click.UsageError("give a SQL query (or --schema to see the tables)")
    config = _load(config_file, data_dir=data_dir)
    try:
        run_query(config, sql, fmt)
    except QueryCommandError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
