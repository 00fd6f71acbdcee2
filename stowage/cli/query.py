"""The `stowage query` command: one read-only SQL statement over the catalog, printed as
an aligned table, CSV, JSON or JSON lines."""
from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import json
import sys
from typing import Any, TextIO

import click

from stowage.cli.options import common, load
from stowage.engine.runtime.config import Config

FORMATS = ("table", "csv", "json", "jsonl")
_MAX_CELL = 80  # table cells past this are cut (CSV and JSON carry whole values)


class QueryCommandError(Exception):
    """A query that did not run; the message says why."""


def run_query(config: Config, sql: str, fmt: str = "table", out: TextIO | None = None) -> int:
    """Run `sql`; returns the number of rows printed (to `out`, or sys.stdout as it is at the
    call: a default bound at import would keep whatever stdout was then)."""
    from stowage.catalog.analytics import QueryRefused, ReadOnlyCatalog  # duckdb: only when a query runs
    catalog_dir = config.data_dir / "catalog"
    if not catalog_dir.is_dir():
        raise QueryCommandError(f"{config.data_dir} holds no archive (no catalog/ in it)")
    catalog = ReadOnlyCatalog(catalog_dir, config.duplicates)
    try:
        columns, rows = catalog.query(sql)
    except QueryRefused as e:
        raise QueryCommandError(f"refused: {e}") from None
    except Exception as e:  # DuckDB's errors say what is wrong with the SQL
        raise QueryCommandError(str(e).strip()) from None
    finally:
        catalog.close()
    {"table": _table, "csv": _csv, "json": _json, "jsonl": _jsonl}[fmt](columns, rows, out or sys.stdout)
    return len(rows)


def print_schema(out: TextIO | None = None) -> None:
    from stowage.catalog.analytics import schema_text
    (out or sys.stdout).write(schema_text() + "\n")


def _plain(value: Any) -> Any:
    """A value as JSON has it: bytes as base64, times as ISO 8601, lists and maps kept."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return str(value)


def _table(columns: list[str], rows: list[tuple], out: TextIO) -> None:
    cells = [[_cut(_text(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _cut(text: str) -> str:
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= _MAX_CELL else text[:_MAX_CELL - 1] + "…"


def _csv(columns: list[str], rows: list[tuple], out: TextIO) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow(["" if v is None else (json.dumps(_plain(v), ensure_ascii=False)
                                          if isinstance(v, (list, dict)) else _plain(v)) for v in row])


def _json(columns: list[str], rows: list[tuple], out: TextIO) -> None:
    json.dump([dict(zip(columns, map(_plain, row))) for row in rows], out, ensure_ascii=False, indent=1)
    out.write("\n")


def _jsonl(columns: list[str], rows: list[tuple], out: TextIO) -> None:
    for row in rows:
        out.write(json.dumps(dict(zip(columns, map(_plain, row))), ensure_ascii=False) + "\n")


@click.command()
@click.argument("sql", required=False)
@common
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "jsonl"]), default="table",
              show_default=True, help="Output format.")
@click.option("--schema", is_flag=True, help="List the tables and columns instead of running a query.")
def query(sql, config_file, data_dir, fmt, schema) -> None:
    """Run one read-only SQL query (DuckDB) over the catalog, e.g.
    stowage query "SELECT modality, count(*) FROM instances GROUP BY 1"."""
    if schema:
        print_schema()
        return
    if not sql:
        raise click.UsageError("give a SQL query (or --schema to see the tables)")
    config = load(config_file, data_dir=data_dir)
    try:
        run_query(config, sql, fmt)
    except QueryCommandError as e:
        raise click.ClickException(str(e)) from None
