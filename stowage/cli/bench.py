"""`stowage bench`: the load generator against any Storage SCP (bench/)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click


# The runs print their lines as they end; the table, --json and --chart come after the last.
_NO_RESULTS = "bench stopped: no results table{json}; the lines above are the runs that finished"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The Storage SCP's host.")
@click.option("--port", type=click.IntRange(1, 65535), default=11112, show_default=True, help="The Storage SCP's port.")
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
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True, help="Seconds to wait for the peer.")
@click.option("--max-pdu", type=int, default=1 << 20, show_default=True, help="Maximum PDU we receive.")
@click.option("--fresh", is_flag=True, help="Each run sends new instances (seed + run number), not the "
                                          "first run's again (generated corpora only).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--dicomweb", "dicomweb_url", help="Benchmark DICOMweb instead: STOW-RS to this base URL, e.g. "
                                                  "http://127.0.0.1:8080/dicom-web (-k: concurrent HTTP clients).")
@click.option("--batch", type=int, default=10, show_default=True, help="DICOMweb: instances per STOW-RS request.")
@click.option("--wado", is_flag=True, help="DICOMweb: then retrieve every series (WADO-RS, as stored) and its metadata.")
@click.option("--token", envvar="STOWAGE_BENCH_TOKEN", help="DICOMweb: a bearer token [$STOWAGE_BENCH_TOKEN].")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="DICOMweb: CA file for an https URL.")
def bench(host, port, aet, calling_aet, associations, repeat, corpus_dir, kind, syntax, count, patients,
          studies_per_patient, series_per_study, frames, seed, pid, json_path, chart_path, timeout, max_pdu,
          fresh, quiet, dicomweb_url, batch, wado, token, ca) -> None:
    """Load-test a Storage SCP: K sender processes, one association each, C-STORE a generated
    (or given) corpus; report instances/s, MB/s, latency percentiles and failures by status.
    Exit status 1 if any store was not successful."""
    from stowage.bench.command import BenchError, CorpusSpec, run_bench, split_list
    from stowage.bench.loadgen import Target
    from stowage.cli.checks import check_ae_title, writable_file
    from stowage.cli.interrupt import Interrupted
    check_ae_title(aet, "--aet")
    check_ae_title(calling_aet, "--calling-aet")
    writable_file(json_path, "--json")  # written after the runs: found out now, not after them
    writable_file(chart_path, "--chart")
    if dicomweb_url and not re.match(r"^https?://[^/\s]+", dicomweb_url):
        raise click.UsageError(f"--dicomweb {dicomweb_url!r}: give the base URL, e.g. http://127.0.0.1:8080/dicom-web")
    try:
        ks = [int(k) for k in split_list(associations)]
    except ValueError:
        raise click.UsageError("--associations takes whole numbers, e.g. -k 1,4") from None
    if not ks or min(ks) < 1 or repeat < 1:
        raise click.UsageError("--associations and --repeat must be >= 1")
    spec = CorpusSpec(split_list(kind), split_list(syntax), count, patients, studies_per_patient,
                      series_per_study, frames, seed)
    if dicomweb_url:
        from stowage.bench.dicomweb import WebTarget, run_web_bench
        if batch < 1:
            raise click.UsageError("--batch must be >= 1")
        try:
            results = run_web_bench(WebTarget(dicomweb_url.rstrip("/"), token, ca), ks, repeat, corpus_dir=corpus_dir,
                                    spec=spec, pid=pid, json_path=json_path, batch=batch, wado=wado)
        except BenchError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise Interrupted(_NO_RESULTS.format(json=f", nothing written to {json_path}" if json_path else "")) \
                from None
        sys.exit(1 if any(r.failed for r in results) else 0)
    try:
        results = run_bench(Target(host, port, aet, calling_aet), ks, repeat, corpus_dir=corpus_dir, spec=spec,
                            pid=pid, json_path=json_path, chart_path=chart_path, progress=not quiet,
                            timeout=timeout, max_pdu=max_pdu, fresh=fresh)
    except BenchError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:  # the sender processes got it too; the generated corpus is removed
        raise Interrupted(_NO_RESULTS.format(json=f", nothing written to {json_path}" if json_path else "")) \
            from None
    if any(r.failed or r.warning for r in results):
        sys.exit(1)
