"""De-identification, measured (issue #22). Not a test: the figures depend on the machine.

1. A folder, three tools on the same files in one run, each in one process with the same
   loop (read the file, de-identify, write the result), after one untimed call each:
   stowage (engine/deidentify: basic profile + Modified Dates + Retain Patient
   Characteristics), dicognito (Anonymizer().anonymize), deid (replace_identifiers with
   its default recipe, which is pydicom's deid.dicom); then `stowage deidentify` with one
   process per core.
2. Ingest through C-STORE (DCMTK storescu, one association) into `stowage serve`: to the
   plain AE title and to a project's AE title (de-identified on the way in), alternately,
   `--rounds` times each, fresh data directories, same corpus, each server measured from
   when its processes have settled; then the medians.

Each row: instances/s and CPU ms per instance (the whole process tree for ingest).

    python -m stowage.bench.harness.deidentify_bench --kind small,ct --count 2000 [--work DIR]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stowage.bench.harness.import_bench import Row, make_corpus
from stowage.bench.procs import TreeMonitor, find_dcmtk, free_port, serve_stowage, stop_tree

OPTIONS = ["retain_longitudinal_modified_dates", "retain_patient_characteristics"]


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed(name: str, files: list[Path], nbytes: int, one) -> Row:
    one(files[0])  # each tool's first call (its imports, caches, tables) is not the files' cost
    cpu0, t0 = _cpu(), time.perf_counter()
    for f in files:
        one(f)
    return Row(name, len(files), nbytes, time.perf_counter() - t0, _cpu() - cpu0)


def folder_rows(files: list[Path], nbytes: int, work: Path) -> list[Row]:
    import pydicom

    from stowage.engine.deidentify.folder import one_file
    from stowage.engine.deidentify.project import Project, ProjectConfig
    rows = []
    out = work / "out-stowage"
    out.mkdir()
    project = Project.open(ProjectConfig("BENCH", options=frozenset(OPTIONS)), work / "data")

    def stowage_one(f: Path) -> None:
        kind, why = one_file(project, f, out)
        if kind != "written":
            raise RuntimeError(f"{f}: {kind} {why}")
    rows.append(_timed("stowage (1 process)", files, nbytes, stowage_one))
    project.close()

    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        print("dicognito is not installed (pip install dicognito==0.19.0): skipped", file=sys.stderr)
    else:
        anonymizer, out_d = Anonymizer(), work / "out-dicognito"
        out_d.mkdir()

        def dicognito_one(f: Path) -> None:
            ds = pydicom.dcmread(f)
            anonymizer.anonymize(ds)
            ds.save_as(out_d / f.name)
        rows.append(_timed("dicognito 0.19.0 (1 process)", files, nbytes, dicognito_one))

    try:
        from deid.dicom import replace_identifiers
    except ImportError:
        print("deid is not installed (pip install deid==0.4.13): skipped", file=sys.stderr)
    else:
        import logging
        logging.getLogger("deid").setLevel(logging.ERROR)
        from deid.logger import bot
        bot.level = 0
        out_i = work / "out-deid"
        out_i.mkdir()

        def deid_one(f: Path) -> None:
            replace_identifiers([str(f)], save=True, output_folder=str(out_i), overwrite=True, remove_private=True)
        rows.append(_timed("deid 0.4.13 (1 process)", files, nbytes, deid_one))

    config = work / "bench.toml"
    config.write_text(f'data_dir = "{work / "data-cli"}"\n[projects.BENCH]\noptions = {OPTIONS!r}\n'.replace("'", '"'))
    folder = files[0].parent.parent
    cpu0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "deidentify", "--config", str(config), "--project",
                        "BENCH", str(folder), str(work / "out-cli")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"stowage deidentify failed: {r.stderr[-2000:]}")
    rows.append(Row(f"stowage deidentify ({os.cpu_count()} processes)", len(files), nbytes,
                    time.perf_counter() - t0, _children_cpu() - cpu0, r.stdout.strip()))
    return rows


def ingest_row(folder: Path, files: int, nbytes: int, work: Path, project: bool) -> Row:
    storescu, echoscu = find_dcmtk("storescu"), find_dcmtk("echoscu")
    work.mkdir(parents=True, exist_ok=True)
    data = work / ("data-ingest-project" if project else "data-ingest-plain")
    config = work / "ingest.toml"
    config.write_text(f'[projects.TRIAL]\ncalled_ae = "TRIAL"\noptions = {OPTIONS!r}\n'.replace("'", '"'))
    port = free_port()
    server = serve_stowage(data, port, echoscu, "--config", str(config))
    monitor = TreeMonitor(server.pid).start()
    try:
        monitor.settle()  # done starting (every process imported, the scrub's first plan made)
        base = monitor.sample()
        t0 = time.perf_counter()
        r = subprocess.run([storescu, "+sd", "+r", "-aec", "TRIAL" if project else "STOWAGE", "-aet", "SCANNER",
                            "127.0.0.1", str(port), str(folder)], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        cpu = monitor.sample() - base
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed ({r.returncode}): {r.stderr[-2000:]}")
    finally:
        monitor.stop()
        stop_tree(server, None)
    return Row("storescu -> stowage, " + ("project TRIAL (de-identified)" if project else "plain"), files, nbytes,
               seconds, cpu)


def _median(rows: list[Row], name: str) -> Row:
    """A row with the median rate and the median CPU per instance of `rows`."""
    by_rate = sorted(rows, key=lambda r: r.rate)
    by_cpu = sorted(rows, key=lambda r: r.cpu_ms)
    mid = by_rate[len(rows) // 2]
    cpu = by_cpu[len(rows) // 2].cpu_ms * mid.files / 1000
    return Row(f"median of {len(rows)}: {name}", mid.files, mid.nbytes, mid.seconds, cpu)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="small,ct")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="ingest runs of each kind, alternating [3]")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="deid-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for kind in a.kind.split(","):
        folder, n, nbytes = make_corpus(work, kind, a.count)
        files = sorted(folder.rglob("*.dcm"))
        run = work / f"run-{kind}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        rows = folder_rows(files, nbytes, run)
        if not a.skip_ingest:  # alternately, `--rounds` times each: the rates here are noisy
            ingest = [ingest_row(folder, n, nbytes, run / f"r{i}", project)
                      for i in range(a.rounds) for project in (False, True)]
            rows += ingest
            if a.rounds > 1:
                rows += [_median(ingest[0::2], "plain"), _median(ingest[1::2], "project TRIAL (de-identified)")]
        print(f"\n{kind}: {n} files, {nbytes / 1e6:.1f} MB, {os.cpu_count()} cores")
        print(f"{'path':48} {'inst/s':>8} {'CPU ms/inst':>12}")
        for row in rows:
            print(f"{row.name:48} {row.rate:8.1f} {row.cpu_ms:12.2f}")
        others = [r for r in rows if r.name.startswith(("dicognito", "deid"))]
        if others:
            best = max(others, key=lambda r: r.rate)
            print(f"stowage (1 process) / {best.name.split()[0]}: {rows[0].rate / best.rate:.1f}x the rate, "
                  f"{best.cpu_ms / rows[0].cpu_ms:.1f}x less CPU per instance")
        medians = [r for r in rows if r.name.startswith("median")]
        if len(medians) == 2:
            print(f"de-identified ingest / plain ingest (medians): {medians[1].rate / medians[0].rate:.2f}x the rate, "
                  f"{medians[1].cpu_ms / medians[0].cpu_ms:.2f}x the CPU per instance")
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
