"""Reporting for ``stowage bench``: a text table, a JSON file, a PNG chart.

matplotlib is an optional dependency (the ``bench`` extra) and is imported only when a
chart is asked for.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Iterable, Sequence

from stowage.bench.loadgen import RunResult


def machine() -> dict[str, str | int | None]:
    """CPU model, cores, kernel, memory and the disk behind ``path`` (for the record)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "memory_gib": mem,
            "python": platform.python_version()}


def disk(path: str | Path) -> str:
    """The device and filesystem that hold ``path``, and whether it is rotational."""
    import psutil
    path = os.path.realpath(path)
    best = None
    for part in psutil.disk_partitions(all=True):
        if path.startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    if best is None:
        return "unknown"
    rot = ""
    dev = os.path.basename(best.device)
    base = dev.rstrip("0123456789") if not dev.startswith("nvme") else dev.split("p")[0]
    try:
        rot = {"0": ", non-rotational", "1": ", rotational"}[Path(f"/sys/block/{base}/queue/rotational").read_text().strip()]
    except (OSError, KeyError):
        pass
    return f"{best.device} ({best.fstype}{rot}) at {best.mountpoint}"


def group(results: Iterable[RunResult]) -> dict[int, list[RunResult]]:
    """Runs by association count, in order of first appearance."""
    out: dict[int, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.associations, []).append(r)
    return out


def summary(results: Sequence[RunResult]) -> list[dict]:
    """Per association count: medians over repeats, failures summed."""
    rows = []
    for k, runs in group(results).items():
        med = lambda f: statistics.median(f(r) for r in runs)
        lat = [r for r in runs if r.latency_ms]
        row = {"associations": k, "repeats": len(runs), "inst_per_s": med(lambda r: r.inst_per_s),
               "mb_per_s": med(lambda r: r.mb_per_s), "wall_s": med(lambda r: r.wall_s),
               "failed": sum(r.failed for r in runs), "warning": sum(r.warning for r in runs),
               "sender_cpu_s": med(lambda r: r.sender_cpu_s)}
        for p in ("p50", "p95", "p99"):
            row[f"{p}_ms"] = statistics.median(r.latency_ms[p] for r in lat) if lat else None
        if all(r.target_cpu_s is not None for r in runs):
            row["target_cpu_s"] = med(lambda r: r.target_cpu_s)
            row["target_peak_rss_mb"] = max(r.target_peak_rss_mb for r in runs)
        rows.append(row)
    return rows


def table(results: Sequence[RunResult]) -> str:
    """The human-readable table of medians, then failures by status and errors."""
    rows = summary(results)
    head = ["assoc", "runs", "inst/s", "MB/s", "p50 ms", "p95 ms", "p99 ms", "failed"]
    has_target = any("target_cpu_s" in r for r in rows)
    if has_target:
        head += ["target cpu s", "target peak RSS MB"]
    cells = []
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for r in rows:
        line = [str(r["associations"]), str(r["repeats"]), fmt(r["inst_per_s"], ".1f"), fmt(r["mb_per_s"], ".1f"),
                fmt(r["p50_ms"], ".2f"), fmt(r["p95_ms"], ".2f"), fmt(r["p99_ms"], ".2f"), str(r["failed"])]
        if has_target:
            line += [fmt(r.get("target_cpu_s"), ".2f"), fmt(r.get("target_peak_rss_mb"), ".1f")]
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    failures: dict[str, int] = {}
    comments: dict[str, str] = {}
    errors: list[str] = []
    for r in results:
        for s, n in r.statuses.items():
            if s != "0x0000":
                failures[s] = failures.get(s, 0) + n
        for s, c in r.comments.items():
            comments.setdefault(s, c)
        errors += [e for e in r.errors if e not in errors]
    if failures:
        out.append("")
        out.append("not successful, by status (all runs):")
        for s, n in sorted(failures.items()):
            note = f"  ({comments[s]})" if s in comments else ""
            out.append(f"  {s}: {n}{note}")
    if errors:
        out.append("")
        out.append(f"association errors ({len(errors)} distinct):")
        out += [f"  {e}" for e in errors[:10]]
    return "\n".join(out)


def timed_medians(results: dict[str, list[float]], count: int, mb: float, reference: str | None) -> list[str]:
    """One line per sender of a timed transfer: median seconds, inst/s, MB/s, the runs, and
    the ratio of `reference`'s median to it (above 1: faster than the reference)."""
    ref = statistics.median(results[reference]) if reference in results else None
    width = max(map(len, results), default=0)
    lines = []
    for name, times in results.items():
        s = statistics.median(times)
        ratio = f"  ({ref / s:.2f}x {reference})" if ref else ""
        lines.append(f"  {name:{width}s} {s:6.2f} s  {count / s:7.0f} inst/s  {mb / s:6.1f} MB/s"
                     f"  runs: {', '.join(f'{t:.2f}' for t in times)}{ratio}")
    return lines


def write_json(path: Path, results: Sequence[RunResult], meta: dict) -> None:
    path.write_text(json.dumps({**meta, "machine": machine(), "summary": summary(results),
                                "runs": [r.to_dict() for r in results]}, indent=2))


def write_chart(path: Path, results: Sequence[RunResult], title: str) -> None:
    """Throughput (inst/s, MB/s) and latency percentiles per association count, one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("a chart needs matplotlib: pip install 'stowage[bench]'") from None
    rows = summary(results)
    labels = [f"{r['associations']} assoc" for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = ax1.bar(x, [r["inst_per_s"] for r in rows], color="#3b6ea5")
    for i, (k, runs) in enumerate(group(results).items()):
        ax1.scatter([i] * len(runs), [r.inst_per_s for r in runs], color="black", s=10, zorder=3)
    for b, r in zip(bars, rows):
        ax1.annotate(f"{r['mb_per_s']:.1f} MB/s", (b.get_x() + b.get_width() / 2, b.get_height()),
                     ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("instances/s (median; dots: runs)")
    ax1.set_title("throughput")
    width = 0.25
    for j, (p, color) in enumerate((("p50", "#6a9f58"), ("p95", "#e1a03a"), ("p99", "#c4463a"))):
        ax2.bar([i + (j - 1) * width for i in x], [r[f"{p}_ms"] or 0 for r in rows], width, label=p, color=color)
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("C-STORE latency, ms")
    ax2.set_title("latency per C-STORE")
    ax2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
