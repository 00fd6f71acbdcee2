"""``stowage bench``: build (or read) a corpus, run the load generator at each association
count, repeat, print a table, write JSON and a chart. The click wiring is in stowage/cli/bench.py."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stowage.bench import report
from stowage.bench.corpus import KINDS, SYNTAXES, generate, syntax_uid
from stowage.bench.loadgen import RunResult, Target, load_corpus, run


@dataclass
class CorpusSpec:
    """What to generate: ``count`` instances of each kind × syntax, in the given shape."""

    kinds: list[str] = field(default_factory=lambda: ["small"])
    syntaxes: list[str] = field(default_factory=lambda: ["explicit"])
    count: int = 1000
    patients: int = 10
    studies_per_patient: int = 2
    series_per_study: int = 2
    frames: int | None = None
    seed: int = 0

    def generate(self, out: Path, say=print) -> list[Path]:
        paths: list[Path] = []
        for kind in self.kinds:
            for syntax in self.syntaxes:
                if KINDS[kind].size == 0 and syntax_uid(syntax).is_compressed:
                    say(f"skipping {kind} in {syntax}: it has no pixel data to compress")
                    continue
                t = time.perf_counter()
                got = generate(out / f"{kind}-{syntax}", kind, self.count, patients=self.patients,
                               studies_per_patient=self.studies_per_patient, series_per_study=self.series_per_study,
                               seed=self.seed, transfer_syntax=syntax, frames=self.frames if KINDS[kind].frames else None)
                say(f"generated {len(got)} {kind} instances in {syntax} "
                    f"({sum(p.stat().st_size for p in got) / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
                paths += got
        return paths


class BenchError(RuntimeError):
    """The benchmark cannot run; the message says why."""


def split_list(values) -> list[str]:
    return [v for value in values for v in str(value).replace(",", " ").split()]


def run_bench(target: Target, associations: list[int], repeat: int, *, corpus_dir: Path | None,
              spec: CorpusSpec, pid: int | None, json_path: Path | None, chart_path: Path | None,
              progress: bool, timeout: float, max_pdu: int, tmp: Path | None = None,
              fresh: bool = False) -> list[RunResult]:
    """Run every association count ``repeat`` times; print and save the results.

    With ``fresh`` (generated corpora only), run n sends a corpus of its own (seed + n,
    generated before its clock starts), so a running archive sees new instances every
    run instead of duplicates of the first."""
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    for kind in spec.kinds:
        if kind not in KINDS:
            raise BenchError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if fresh and corpus_dir is not None:
        raise BenchError("--fresh applies to generated corpora, not to --corpus")
    made = None
    try:
        if corpus_dir is not None:
            paths = sorted(p for p in corpus_dir.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ""))
            if not paths:
                raise BenchError(f"no files in {corpus_dir}")
        else:
            made = Path(tempfile.mkdtemp(prefix="stowage-bench-corpus-", dir=tmp))
            try:
                paths = spec.generate(made, say)
            except (ValueError, RuntimeError) as e:
                raise BenchError(f"corpus: {e}") from None
        try:
            items = load_corpus(paths)
        except ValueError as e:
            raise BenchError(str(e)) from None
        if not items:
            raise BenchError("the corpus is empty")
        total = sum(it.length for it in items)
        say(f"corpus: {len(items)} instances, {total / 1e6:.1f} MB of datasets; target {target}")
        results: list[RunResult] = []
        n = 0
        for k in associations:
            for rep in range(repeat):
                if fresh and n:
                    shutil.rmtree(made / f"run{n - 1}", ignore_errors=True)
                    quiet = lambda msg: None
                    spec_n = CorpusSpec(**{**vars(spec), "seed": spec.seed + n})
                    items = load_corpus(spec_n.generate(made / f"run{n}", quiet))
                n += 1
                try:
                    r = run(target, items, k, pid=pid, progress=progress,
                            label=f"{k} assoc, run {rep + 1}/{repeat}", timeout=timeout, max_pdu=max_pdu)
                except (RuntimeError, ValueError) as e:
                    raise BenchError(str(e)) from None
                results.append(r)
                lat = r.latency_ms
                say(f"  {k} assoc run {rep + 1}: {r.inst_per_s:.1f} inst/s, {r.mb_per_s:.1f} MB/s, "
                    f"p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms, "
                    f"{r.completed} ok, {r.warning} warning, {r.failed} failed")
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    print(f"{target}: {len(items)} instances, {total / 1e6:.1f} MB per run, medians of {repeat} run(s)")
    print(report.table(results))
    meta = {"target": str(target), "corpus": {"instances": len(items), "bytes": total,
                                              "dir": str(corpus_dir) if corpus_dir else None,
                                              "spec": None if corpus_dir else vars(spec)},
            "associations": associations, "repeat": repeat}
    if json_path is not None:
        report.write_json(json_path, results, meta)
        say(f"results written to {json_path}")
    if chart_path is not None:
        report.write_chart(chart_path, results, f"{target}: {len(items)} instances, {total / 1e6:.1f} MB")
        say(f"chart written to {chart_path}")
    return results


__all__ = ["CorpusSpec", "BenchError", "run_bench", "split_list", "SYNTAXES"]
