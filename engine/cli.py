"""The `stowage` command line."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from stowage.engine import config as cfg

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
@click.option("--tls-port", type=int, help="A second port, speaking DICOM over TLS (needs tls_cert, tls_key) [none].")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port, at /metrics [none].")
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
    from stowage.engine.acceptor import ServeError, serve as run
    from stowage.engine.logs import setup_logging
    from stowage.engine.compaction import Background
    config = _load(config_file, **overrides)
    setup_logging(config, "acceptor")
    background = Background(config).start()  # compaction (and the delete-oldest quota) in this process
    try:
        code = run(config)
    except ServeError as e:
        raise click.ClickException(str(e)) from None
    finally:
        background.stop()
    sys.exit(code)


@main.command()
@_common
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write files into.")
@click.option("--all", "everything", is_flag=True, help="Every stored instance.")
@click.option("--patient", multiple=True, help="Patient ID (repeatable).")
@click.option("--study", multiple=True, help="Study Instance UID (repeatable).")
@click.option("--series", multiple=True, help="Series Instance UID (repeatable).")
@click.option("--instance", multiple=True, help="SOP Instance UID (repeatable).")
@click.option("--layout", type=click.Choice(["flat", "tree"]), default="flat", show_default=True,
              help="flat: <SOP Instance UID>.dcm; tree: patient/study/series folders with readable names.")
@click.option("--dicomdir", is_flag=True, help="Write a PS3.10 File-set: 8-character file IDs and a DICOMDIR.")
def export(config_file, data_dir, out, everything, patient, study, series, instance, layout, dicomdir) -> None:
    """Write stored instances as Part-10 files, dataset bytes as received (docs/export.md)."""
    from stowage.engine.export import ExportError, describe, export as run
    if dicomdir and layout != "flat":
        raise click.UsageError("--dicomdir names the files itself (PS3.10 file IDs): drop --layout")
    chosen = [(lvl, list(v)) for lvl, v in (("patient", patient), ("study", study), ("series", series),
                                            ("instance", instance)) if v]
    if len(chosen) + bool(everything) != 1:
        raise click.UsageError("choose exactly one of --all, --patient, --study, --series, --instance")
    config = _load(config_file, data_dir=data_dir)
    if not (config.data_dir / "catalog").exists():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    level, values = chosen[0] if chosen else (None, [])
    try:
        result = run(config.data_dir, out, level, values, config.duplicates, layout=layout, dicomdir=dicomdir)
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    for failure in result.failed:
        click.echo(f"failed: {failure}", err=True)
    click.echo(describe(result, out))
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} instance(s) could not be exported")


@main.command()
@_common
@click.option("--patient", multiple=True, help="Patient ID (repeatable).")
@click.option("--study", multiple=True, help="Study Instance UID (repeatable, or comma-separated).")
@click.option("--series", multiple=True, help="Series Instance UID (repeatable, or comma-separated).")
@click.option("--instance", multiple=True, help="SOP Instance UID (repeatable, or comma-separated).")
@click.option("--reason", default="", help="Why (e.g. 'consent withdrawn'), kept in the audit log and the tombstones.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def delete(config_file, data_dir, patient, study, series, instance, reason, yes) -> None:
    """Delete stored instances (also while `stowage serve` runs): hidden at once from C-FIND,
    C-MOVE, C-GET, export, send and storage commitment; space comes back with compaction."""
    import getpass
    from stowage.engine.delete import DeleteError, delete as run
    from stowage.engine.logs import setup_logging
    chosen = [(lvl, [v for v in _split(vals)] if lvl != "patient" else list(vals))
              for lvl, vals in (("patient", patient), ("study", study), ("series", series),
                                ("instance", instance)) if vals]
    if len(chosen) != 1:
        raise click.UsageError("choose exactly one of --patient, --study, --series, --instance")
    config = _load(config_file, data_dir=data_dir)
    if not (config.data_dir / "catalog").is_dir():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    level, values = chosen[0]
    comment = " ".join(reason.split())[:200]
    try:
        actor = f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (a bare container)
        actor = "cli"
    try:
        plan = run(config, level, values, actor=actor, dry_run=True)
        if not plan.records:
            raise click.ClickException(f"nothing to delete: no stored instance has that {level} "
                                       "(or it is deleted already)")
        click.echo(f"would delete {plan.summary()}")
        if not yes:
            click.confirm("delete them?", abort=True)
        setup_logging(config, "delete")
        result = run(config, level, values, actor=actor, comment=comment)
    except DeleteError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write the tombstones ({e.strerror or e}): the deletion may be "
                                   "incomplete; run it again once that is fixed") from None
    click.echo(f"deleted {result.summary()}")


@main.command()
@_common
@click.option("--dry-run", is_flag=True, help="Only list the segments that would be rewritten.")
@click.option("--rate", type=float, default=0.0, show_default=True, help="MB/s to copy at most (0: unlimited).")
@click.option("--ratio", type=float, help="Rewrite segments whose live fraction is below this [compact_live_ratio].")
def compact(config_file, data_dir, dry_run, rate, ratio) -> None:
    """Reclaim the space of deleted and superseded instances (also while `stowage serve`
    runs): rewrite sparse segments into new ones, then drop the old ones."""
    from stowage.engine.compaction import CompactionBusy, compact as run
    from stowage.engine.logs import setup_logging
    config = _load(config_file, data_dir=data_dir)
    if not (config.data_dir / "catalog").is_dir():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    if ratio is not None and not 0 < ratio <= 1:
        raise click.UsageError("--ratio must be in (0, 1]")
    setup_logging(config, "compact")
    try:
        r = run(config, rate=rate, dry_run=dry_run, ratio=ratio)
    except CompactionBusy as e:
        raise click.ClickException(f"{e}; try again when it is done") from None
    except OSError as e:
        raise click.ClickException(f"compaction stopped: {e.strerror or e}; nothing was lost, "
                                   "run it again once that is fixed") from None
    if dry_run:
        for c in r.candidates:
            click.echo(f"{c.segment}: {c.size / 1e6:.1f} MB, {c.ratio:.0%} live ({c.live_records} record(s))")
        dead = sum(c.size - c.live_bytes for c in r.candidates)
        click.echo(f"would rewrite {len(r.candidates)} segment(s), reclaiming about {dead / 1e6:.1f} MB")
        return
    click.echo(f"rewrote {len(r.rewritten)} segment(s) into {len(r.written)}: {r.records_copied} live record(s) "
               f"copied, {r.reclaimed / 1e6:.1f} MB reclaimed, {r.mb_per_s:.1f} MB/s; "
               f"{r.purged} retired segment(s) removed")
    if r.errors:
        for e in r.errors:
            click.echo(f"skipped: {e}", err=True)
        raise click.ClickException(f"{len(r.errors)} round(s) skipped (see above); run stowage verify")


@main.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_common
@click.option("--processes", type=int, default=0, help="Import processes [one per core].")
@click.option("--threads", type=int, default=16, show_default=True, help="Concurrent stores per process.")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False),
              help="CSV of every file not stored, and why [DATA_DIR/import/refused-<time>.csv].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def import_(paths, config_file, data_dir, processes, threads, report, quiet) -> None:
    """Import DICOM files (Part-10, without preamble, DICOMDIR trees) from folders, recursively,
    through the same durable store path as C-STORE; safe while `stowage serve` runs. Exit status 1
    if a DICOM file could not be stored (see docs/import.md)."""
    import os
    from stowage.engine.importer.run import run_import
    config = _load(config_file, data_dir=data_dir)
    for p in paths:
        if not p.exists():
            raise click.ClickException(f"{p}: no such file or folder")
        if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
            raise click.ClickException(f"{p}: permission denied")
    if processes < 0 or threads < 1:
        raise click.UsageError("--processes must be >= 0 and --threads >= 1")
    try:
        summary = run_import(config, list(paths), processes=processes, threads=threads, report=report,
                             quiet=quiet)
    except OSError as e:
        raise click.ClickException(f"import into {config.data_dir}: {e.strerror or e}"
                                   f"{f' ({e.filename})' if e.filename else ''}") from None
    click.echo(summary.line())
    for problem in summary.problems:
        click.echo(f"import: {problem}", err=True)
    sys.exit(summary.exit_code)


@main.command()
@_common
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Read at most this many MB/s, evenly paced [unlimited].")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False),
              help="Write every problem found as CSV: segment, offset, sop_instance_uid, problem.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Segments verified at once (threads; the rate is theirs together).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(config_file, data_dir, rate, report, jobs, quiet) -> None:
    """Re-read every stored record and check its checksums and its catalog row; safe while
    `stowage serve` runs. Corrupt records are marked (never sent, commitment fails them).
    Exit status 1 if anything is wrong (see docs/lifecycle.md)."""
    from stowage.engine.verify_cli import VerifyCommandError, run_verify
    config = _load(config_file, data_dir=data_dir)
    try:
        tally = run_verify(config, rate, report, progress=not quiet, jobs=jobs)
    except VerifyCommandError as e:
        raise click.ClickException(str(e)) from None
    if tally.problems:
        raise click.ClickException(f"{tally.corrupt} corrupt record(s), {len(tally.problems) - tally.corrupt} "
                                   f"catalog problem(s)" + (f"; every one is listed in {report}" if report else ""))


@main.command("rebuild-catalog")
@_common
def rebuild_catalog(config_file, data_dir) -> None:
    """Rebuild the whole catalog from the segment files alone (archive must be stopped)."""
    import fcntl
    from stowage.engine.recovery import rebuild
    from stowage.engine.slots import SlotError
    config = _load(config_file, data_dir=data_dir)
    if not (config.data_dir / "segments").is_dir():
        raise click.ClickException(f"{config.data_dir} holds no segments/ directory")
    with open(config.data_dir / "serve.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise click.ClickException("the archive is running on this data directory; stop it first") from None
        try:
            count = rebuild(config.data_dir)
        except SlotError as e:  # e.g. a `stowage import` is writing: one line, no traceback
            raise click.ClickException(f"{config.data_dir}: {e.strerror}") from None
    click.echo(f"catalog rebuilt: {count} record(s) indexed")


@main.command()
@click.argument("target")
@_common
@click.option("--aet", help="Our (calling) AE title [the configured aet].")
@click.option("--aec", help="Called AE title, for a host:port target [ANY-SCP].")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the peer.")
def echo(target, config_file, data_dir, aet, aec, timeout) -> None:
    """C-ECHO a remote AE: a configured AE title, or host:port."""
    from stowage.engine.requestor import PeerError, echo as run, resolve
    from stowage.engine.send_cli import quiet_libraries
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
    from stowage.engine.send_cli import SendCommandError, run_send
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
    from stowage.engine.query_cli import QueryCommandError, print_schema, run_query
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


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The Storage SCP's host.")
@click.option("--port", type=int, default=11112, show_default=True, help="The Storage SCP's port.")
@click.option("--aet", default="STOWAGE", show_default=True, help="Called AE title (the target's).")
@click.option("--calling-aet", default="STOWAGE-BENCH", show_default=True, help="Our AE title.")
@click.option("--associations", "-k", multiple=True, default=["1"], show_default=True,
              help="Concurrent associations (one sender process each); repeat or comma-separate for "
                   "several configurations, e.g. -k 1,4.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Runs per configuration.")
@click.option("--corpus", "corpus_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Send the DICOM files under this directory instead of generating a corpus.")
@click.option("--kind", multiple=True, default=["small"], show_default=True,
              help="Corpus kinds: sr, small, mr, ct, cr, us (repeat or comma-separate).")
@click.option("--syntax", multiple=True, default=["explicit"], show_default=True,
              help="Transfer syntaxes: explicit, implicit, deflate, rle, j2k (repeat or comma-separate).")
@click.option("--count", type=int, default=1000, show_default=True, help="Instances per kind and syntax.")
@click.option("--patients", type=int, default=10, show_default=True)
@click.option("--studies-per-patient", type=int, default=2, show_default=True)
@click.option("--series-per-study", type=int, default=2, show_default=True)
@click.option("--frames", type=int, help="Frames per instance of a multi-frame kind (us) [10].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pid", type=int, help="PID of the target, to report its CPU and peak RSS [found by port "
                                      "when the target is local].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the results here as JSON.")
@click.option("--chart", "chart_path", type=click.Path(path_type=Path),
              help="Write a PNG chart here (needs the bench extra: matplotlib).")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the peer.")
@click.option("--max-pdu", type=int, default=1 << 20, show_default=True, help="Maximum PDU we receive.")
@click.option("--fresh", is_flag=True, help="Each run sends new instances (seed + run number), not the "
                                          "first run's again (generated corpora only).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bench(host, port, aet, calling_aet, associations, repeat, corpus_dir, kind, syntax, count, patients,
          studies_per_patient, series_per_study, frames, seed, pid, json_path, chart_path, timeout, max_pdu,
          fresh, quiet) -> None:
    """Load-test a Storage SCP: K sender processes, one association each, C-STORE a generated
    (or given) corpus; report instances/s, MB/s, latency percentiles and failures by status.
    Exit status 1 if any store was not successful."""
    from stowage.bench.command import BenchError, CorpusSpec, run_bench, split_list
    from stowage.bench.loadgen import Target
    try:
        ks = [int(k) for k in split_list(associations)]
    except ValueError:
        raise click.UsageError("--associations takes whole numbers, e.g. -k 1,4") from None
    if not ks or min(ks) < 1 or repeat < 1:
        raise click.UsageError("--associations and --repeat must be >= 1")
    spec = CorpusSpec(split_list(kind), split_list(syntax), count, patients, studies_per_patient,
                      series_per_study, frames, seed)
    try:
        results = run_bench(Target(host, port, aet, calling_aet), ks, repeat, corpus_dir=corpus_dir, spec=spec,
                            pid=pid, json_path=json_path, chart_path=chart_path, progress=not quiet,
                            timeout=timeout, max_pdu=max_pdu, fresh=fresh)
    except BenchError as e:
        raise click.ClickException(str(e)) from None
    if any(r.failed or r.warning for r in results):
        sys.exit(1)


@main.command()
@_common
@click.option("--from", "source", help="The legacy archive: AE@host:port, or a configured remote's name.")
@click.option("--method", type=click.Choice(["move", "get"]), default="move", show_default=True,
              help="C-MOVE to the running archive (stowage serve on this data dir), or C-GET stored here.")
@click.option("--aet", help="Our AE title, calling and C-MOVE destination [the configured aet].")
@click.option("--since", help="First StudyDate to migrate (YYYY-MM-DD) [everything].")
@click.option("--until", help="Last StudyDate to migrate (YYYY-MM-DD) [everything].")
@click.option("--parallel", type=int, default=3, show_default=True, help="Studies pulled at once (associations).")
@click.option("--find-limit", type=int, default=0, show_default=True,
              help="The source's cap on C-FIND matches (e.g. Orthanc's LimitFindResults); windows answering "
                   "that many are split. 0: unknown (only a failure status reveals a cap).")
@click.option("--verify-content", is_flag=True, help="Also re-read every migrated record and check its checksums.")
@click.option("--dry-run", is_flag=True, help="Enumerate only; print what would be pulled.")
@click.option("--status", "show_status", is_flag=True, help="Print the checkpoint's state (also while a migration runs).")
@click.option("--window", help="Start new work only in this local time window, e.g. 19:00-07:00.")
@click.option("--max-rate", help="Cap: instances/s (e.g. 50) or MB/s (e.g. 20MB/s).")
@click.option("--stall-timeout", type=float, default=300.0, show_default=True,
              help="Seconds a retrieve may go without progress before it is aborted and retried later.")
@click.option("--retries", type=int, default=5, show_default=True, help="Attempts per study before it is failed.")
@click.option("--retry-delay", type=float, default=30.0, show_default=True,
              help="First back-off in seconds (doubles per attempt; x4 when the source is out of resources).")
@click.option("--rescan", is_flag=True, help="Enumerate the source again (finds studies added since).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def migrate(config_file, data_dir, source, method, aet, since, until, parallel, find_limit, verify_content, dry_run,
            show_status, window, max_rate, stall_timeout, retries, retry_delay, rescan, quiet) -> None:
    """Move a whole legacy archive into stowage over DICOM: enumerate it by C-FIND, pull every
    study by C-MOVE or C-GET, verify each instance against the catalog; checkpointed, so a re-run
    resumes. Exit status 1 if any study failed."""
    from stowage.engine.migrate.command import MigrateError, options, source as parse, status_lines
    from stowage.engine.migrate.run import run
    config = _load(config_file, data_dir=data_dir, aet=aet)
    try:
        if show_status:
            for line in status_lines(config, source):
                click.echo(line)
            return
        if not source:
            raise click.UsageError("give the source: --from AE@host:port (or a configured remote)")
        opts = options(method=method, since=since, until=until, parallel=parallel, find_limit=find_limit,
                       verify_content=verify_content, dry_run=dry_run, window=window, max_rate=max_rate,
                       stall_timeout=stall_timeout, retries=retries, retry_delay=retry_delay, rescan=rescan,
                       progress=not quiet)
        code = run(config, parse(source, config), opts, click.echo)
    except MigrateError as e:
        raise click.ClickException(str(e)) from None
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
