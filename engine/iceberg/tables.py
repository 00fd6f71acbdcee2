"""Reaching the Iceberg catalog and its two tables: which kind of catalog the
configuration names (a SQL catalog on SQLite or PostgreSQL, or a REST catalog), where the
warehouse is, and the tables' schemas, created on first use and widened when stowage's
catalog schema grows."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from stowage.catalog import tombstones
from stowage.catalog.schema import SCHEMA as INSTANCE_SCHEMA
from stowage.engine.runtime.config import Config

if TYPE_CHECKING:  # pyiceberg is imported by the publisher's process only
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

CATALOG_NAME = "stowage"   # also the name in PYICEBERG_CATALOG__STOWAGE__<KEY> variables
INSTANCES, DELETIONS = "instances", "deletions"
# The deletions table: a tombstone (catalog/tombstones.py) and the node that wrote it.
DELETION_SCHEMA = tombstones.SCHEMA.append(pa.field("node", pa.string()))
SCHEMAS = {INSTANCES: INSTANCE_SCHEMA, DELETIONS: DELETION_SCHEMA}
_SQL = re.compile(r"^(sqlite|postgresql)(\+\w+)?://")


class IcebergConfigError(ValueError):
    """The Iceberg settings cannot be used; the message names the key."""


def warehouse(config: Config) -> str:
    """Where data and metadata files go: iceberg_warehouse, else a folder of the data directory."""
    if config.iceberg_warehouse:
        return config.iceberg_warehouse
    return (Path(config.data_dir).resolve() / "iceberg" / "warehouse").as_uri()


def _s3_properties(config: Config) -> dict[str, str]:
    """pyiceberg's S3 settings from the segment store's keys (s3_endpoint, s3_region,
    s3_access_key, s3_secret_key), else the usual AWS environment variables."""
    env = os.environ
    pick = {"s3.endpoint": getattr(config, "s3_endpoint", "") or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL", ""),
            "s3.region": getattr(config, "s3_region", "") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION", ""),
            "s3.access-key-id": getattr(config, "s3_access_key", "") or env.get("AWS_ACCESS_KEY_ID", ""),
            "s3.secret-access-key": getattr(config, "s3_secret_key", "") or env.get("AWS_SECRET_ACCESS_KEY", "")}
    return {k: v for k, v in pick.items() if v}


def catalog_properties(config: Config) -> dict[str, Any]:
    uri = config.iceberg_catalog
    if uri.startswith(("http://", "https://")):
        # a credential (PYICEBERG_CATALOG__STOWAGE__CREDENTIAL) is exchanged for a token at the catalog's own
        # OAuth2 endpoint unless told otherwise
        props: dict[str, Any] = {"type": "rest", "uri": uri, "oauth2-server-uri": uri.rstrip("/") + "/v1/oauth/tokens"}
        if config.iceberg_warehouse:
            props["warehouse"] = config.iceberg_warehouse
    elif _SQL.match(uri):
        props = {"type": "sql", "uri": uri, "warehouse": warehouse(config)}
    else:
        raise IcebergConfigError(f"iceberg_catalog: {uri!r} is neither a REST catalog (http:// or https://) nor "
                                 "a SQL catalog (sqlite:///path or postgresql://user@host/db)")
    return {**props, **_s3_properties(config)}


def open_catalog(config: Config) -> "Catalog":
    """The configured catalog; PYICEBERG_CATALOG__STOWAGE__* variables add to it (tokens,
    credentials: pyiceberg's own configuration)."""
    from pyiceberg.catalog import load_catalog
    if config.iceberg_catalog.startswith("sqlite"):  # the folder of a SQLite catalog must exist
        path = config.iceberg_catalog.split("://", 1)[1].lstrip("/")
        if path and path != ":memory:":
            Path("/" + path).parent.mkdir(parents=True, exist_ok=True)
    if warehouse(config).startswith("file://"):
        Path(warehouse(config)[len("file://"):]).mkdir(parents=True, exist_ok=True)
    props = catalog_properties(config)
    for attempt in range(3):
        try:
            return load_catalog(CATALOG_NAME, **props)
        except Exception:  # a SQL catalog creating its own tables as another node does: once more
            if attempt == 2 or props["type"] != "sql":
                raise
            time.sleep(0.2 + attempt)
    raise AssertionError("unreachable")


def ensure_tables(catalog: "Catalog", namespace: str) -> dict[str, "Table"]:
    """The instances and deletions tables, created if missing (by us or by another node at
    the same moment) and given any column stowage's schema gained since."""
    from pyiceberg.exceptions import CommitFailedException
    try:
        catalog.create_namespace_if_not_exists(namespace)
    except Exception:  # another node made it between the look and the create (a SQL catalog says so its own way)
        if not catalog.namespace_exists(namespace):
            raise
    tables = {}
    for name, schema in SCHEMAS.items():
        ident = f"{namespace}.{name}"
        try:
            table = catalog.create_table_if_not_exists(ident, schema=schema)
        except Exception:  # likewise
            if not catalog.table_exists(ident):
                raise
            table = catalog.load_table(ident)
        missing = [f for f in schema.names if f not in {c.name for c in table.schema().fields}]
        if missing:
            try:
                with table.update_schema() as update:
                    update.union_by_name(schema)
            except CommitFailedException:  # another node widened it first
                table = catalog.load_table(ident)
        tables[name] = table
    return tables
