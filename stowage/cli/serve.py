"""`stowage serve`: the archive (acceptor, workers, background compaction) until SIGTERM."""
from __future__ import annotations

import sys

import click

from stowage.cli.checks import writable_data_dir
from stowage.cli.options import common, load
from stowage.engine.runtime import config as cfg


@click.command()
@common
@click.option("--port", type=int, help="TCP port for plain DICOM [11112]; 0: none, TLS only (needs --tls-port).")
@click.option("--tls-port", type=int, help="A second port, speaking DICOM over TLS (needs tls_cert, tls_key) [none].")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port, at /metrics [none].")
@click.option("--http-port", type=int, help="HTTP port for DICOMweb and the web pages [8080]; 0: none.")
@click.option("--http-processes", type=int, help="Processes serving the HTTP port [one per core].")
@click.option("--aet", help="Our AE title [STOWAGE].")
@click.option("--bind", help="Address to listen on [0.0.0.0].")
@click.option("--workers", type=int, help="Worker processes [one per core].")
@click.option("--max-associations", type=int, help="Global association cap [64].")
@click.option("--max-pdu", type=int, help="Maximum PDU length we receive [262144].")
@click.option("--durability", type=click.Choice(cfg.DURABILITY_MODES), help="fsync (default), os-buffer or object-store.")
@click.option("--duplicates", type=click.Choice(cfg.DUPLICATE_POLICIES), help="Policy for a re-sent SOP Instance UID.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="stderr log format [text].")
def serve(config_file, **overrides) -> None:
    """Run the archive (acceptor plus worker processes) until SIGTERM/SIGINT."""
    from stowage.engine.acceptor import ServeError
    from stowage.engine.acceptor import serve as run
    from stowage.engine.lifecycle.background import Background
    from stowage.engine.runtime.logs import setup_logging
    config = load(config_file, **overrides)
    writable_data_dir(config)  # a file there, or a read-only disk: one line, not setup_logging's traceback
    if config.projects:  # [projects.NAME] (de-identification): one clear line, before any worker starts
        from stowage.engine.deidentify.project import ProjectError, open_project
        try:
            for name in config.projects:  # their keys too (made on first use)
                open_project(config.projects, name, config.data_dir).close()
        except ProjectError as e:
            raise click.ClickException(f"configuration: {e}") from None
    setup_logging(config, "acceptor")
    background = Background(config).start()  # compaction (and the delete-oldest quota) in this process
    try:
        code = run(config, on_drain=background.request_stop)
    except ServeError as e:
        raise click.ClickException(str(e)) from None
    finally:
        background.stop()
    sys.exit(code)
