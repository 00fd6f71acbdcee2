"""Configuration: embedded defaults, then a TOML file, then STOWAGE_* variables, then flags.

Every key of `Config` can be set in all four places under the same name (dashes in
flags, upper case in the environment: `--max-pdu`, `STOWAGE_MAX_PDU`).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from stowage.engine.runtime.forward_rules import ForwardRule, RuleError, parse_rules  # noqa: F401 - RuleError for callers

DURABILITY_MODES = ("fsync", "os-buffer", "object-store")  # object-store: fsync, then PUT (engine/storage/wal.py)
DUPLICATE_POLICIES = ("keep-newest", "keep-first", "reject")
QUOTA_POLICIES = ("refuse", "delete-oldest")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")  # logging's names, any case
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5: no backslash, no controls
# The services a peer may be allowed (docs/access.md): C-ECHO, C-STORE, C-FIND, C-MOVE,
# C-GET, storage commitment (N-ACTION).
_NODE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SERVICES = ("echo", "store", "find", "move", "get", "commitment")


def valid_ae_title(title: str) -> bool:
    """PS3.5 AE title: 1-16 printable ASCII characters, no backslash, not all spaces."""
    return bool(_AE_TITLE.match(title)) and bool(title.strip())


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Remote:
    """A remote AE: C-MOVE destination, commitment callback, `send` target."""

    ae_title: str
    host: str
    port: int
    # Storage commitment: send the N-EVENT-REPORT on the requester's own association when
    # it is still open there (PS3.4 J.3.3); false: always on a new association to host:port.
    commitment_same_association: bool = True
    # C-MOVE sub-operations and `send` to it run on this many associations at once
    # (PS3.4 C.4.2.3.1 leaves the number to us); 1 suits a peer that serves one at a time.
    associations: int = 1
    # Associations we open to it use TLS (PS3.15 B.1): its certificate is verified against
    # tls_ca (PEM; the system's CAs when empty), and its host name too unless
    # tls_check_hostname is false; tls_cert/tls_key (PEM) are ours, for peers that ask.
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_check_hostname: bool = True
    # Access control (engine/receive/access.py): the services this AE may ask of us; only
    # from an address `host` resolves to (check_host); only over the TLS port with a client
    # certificate naming it (its AE title or host in the CN or a subjectAltName).
    services: tuple[str, ...] = SERVICES
    check_host: bool = False
    require_certificate: bool = False


@dataclass(frozen=True)
class Token:
    """An HTTP bearer token and what it may do: "read" (QIDO, WADO), "write" (STOW, DELETE)."""

    name: str
    token: str
    scopes: tuple[str, ...] = ("read",)


TOKEN_SCOPES = ("read", "write")


@dataclass(frozen=True)
class Config:
    aet: str = "STOWAGE"
    bind: str = "0.0.0.0"
    port: int = 11112
    tls_port: int = 0                      # a second port speaking DICOM over TLS (0: none; 2762 is usual)
    tls_cert: str = ""                     # our certificate for tls_port (PEM), and its key
    tls_key: str = ""
    tls_ca: str = ""                       # set: tls_port clients must present a certificate it signed
    metrics_port: int = 0                  # Prometheus /metrics on this port (0: none)
    data_dir: Path = Path("stowage-data")
    workers: int = 0                       # 0: one per core
    max_associations: int = 64             # global cap, enforced by the acceptor
    max_pdu: int = 262144                  # advertised maximum PDU length we receive
    network_timeout: float = 60.0          # a peer silent this long mid-association is dropped
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    pending_interval: float = 0.1          # C-MOVE/C-GET: at most one pending response per this long (0: each sub-operation)
    drain_timeout: float = 30.0            # SIGTERM: how long in-flight associations may finish
    durability: str = "fsync"              # "os-buffer" skips fsync: never the default
    zstd_level: int = 1
    segment_size: int = 1 << 30            # roll the active segment past this many bytes
    seal_interval: float = 1.0             # seconds between looks at the tail: a quiet worker seals at the next one
    seal_max_rows: int = 20000             # a busy worker seals once this many rows are unsealed...
    seal_max_age: float = 30.0             # ...or the oldest has waited this many seconds
    compact_min_files: int = 8             # merge when this many small Parquet files exist
    min_free_bytes: int = 256 << 20        # below this much free disk, stores get 0xA700
    spill_threshold: int = 16 << 20        # datasets larger than this are received to a spool file
    # Limits on what a peer or a file can make stowage spend (docs/configuration.md, Limits);
    # each refusal is counted in stowage_limit_refusals{limit=...}.
    max_inflated_bytes: int = 256 << 20    # a Deflated data set is never inflated past this many bytes
    max_command_bytes: int = 64 << 10      # a DIMSE command set longer than this aborts the association
    max_nesting_depth: int = 64            # sequences nested deeper than this: the data set is refused
    association_request_timeout: float = 10.0  # the whole A-ASSOCIATE-RQ must arrive within this many seconds
    max_associations_per_address: int = 32     # open associations from one IP address (0: only max_associations)
    # TCP load balancers (addresses or networks) whose connections begin with a PROXY protocol
    # v2 header naming the client (HAProxy send-proxy-v2; protocol/proxy_header.py, ops/haproxy/)
    proxy_protocol_from: tuple[str, ...] = ()
    max_commitment_references: int = 50000     # SOP instances one storage commitment request may reference
    max_pending_commitments: int = 16      # commitment requests of one AE not yet reported, at once
    max_spool_bytes: int = 4 << 30         # bytes all spool files of a worker may hold at once
    # serve: keep the segments it writes in the page cache once durable (false: drop them,
    # as import and migrate always do, e.g. while a C-MOVE migration pours in: docs/storage.md)
    cache_writes: bool = True
    duplicates: str = "keep-newest"
    # An instance a rejection note rejected (docs/lifecycle.md), sent again: false refuses it
    # (0xA771, as dcm4chee does), true stores it again (visible again).
    rejected_reaccept: bool = False
    compact_live_ratio: float = 0.5        # compaction rewrites sealed segments whose live bytes are below this fraction
    compact_rate: float = 50.0             # background compaction: MB/s copied at most (0: unlimited)
    compact_interval: float = 300.0        # background compaction: seconds between checks (0: off)
    compact_grace: float = 3600.0          # seconds a compacted-away segment stays for readers that looked it up
    max_storage_bytes: int = 0             # quota on the segment files' bytes (0: none); Orthanc's MaximumStorageSize
    quota_policy: str = "refuse"           # past the quota: "refuse" (0xA700) or "delete-oldest" studies
    protected_patients: tuple[str, ...] = ()  # Patient IDs the quota never deletes
    pn_case_insensitive: bool = False      # C-FIND: match person names ignoring case and accents
    log_format: str = "text"               # or "json"
    log_level: str = "info"
    # Background scrub (engine/lifecycle/scrub.py): "week" or "day" (one full pass per period), a
    # number of MB/s, or 0 / "off".
    scrub_rate: str = "week"
    # DICOMweb and the web pages (engine/web, docs/dicomweb.md): an HTTP port of its own,
    # served by http_processes processes sharing it (0: one per core); 0 turns it off.
    http_port: int = 8080
    http_processes: int = 0
    http_tls: bool = False                 # HTTPS with tls_cert/tls_key (and client certificates if tls_ca)
    http_cors_origins: tuple[str, ...] = ()  # browser origins allowed to call it ("*": any)
    http_delete: bool = False              # DELETE of studies, series, instances over DICOMweb
    qido_max_limit: int = 1000             # QIDO-RS answers at most this many matches per request
    # A series' WADO-RS metadata is made ahead of any request once the series has received
    # nothing for this many seconds and the machine has a core to spare (engine/web/stable_series.py);
    # 0: only when first asked for.
    metadata_stable_seconds: float = 10.0
    # Bearer tokens: name -> {token, scopes = ["read", "write"]}; none: loopback clients only.
    http_tokens: Mapping[str, Token] = field(default_factory=dict)
    viewer_dir: str = ""                   # the OHIF viewer `stowage viewer install` puts there ("": <data_dir>/viewer)
    # Access control for calling AE titles that are not [remotes] (docs/access.md): what they
    # may ask from another host, and from this machine (a loopback address).
    unknown_ae_services: tuple[str, ...] = ("echo", "store", "commitment")
    unknown_ae_loopback_services: tuple[str, ...] = SERVICES
    remotes: Mapping[str, Remote] = field(default_factory=dict)
    # [projects.NAME] tables, checked by engine/deidentify/project.py (docs/deidentification.md)
    projects: Mapping[str, Any] = field(default_factory=dict)
    # [[forward]] rules (engine/runtime/forward_rules.py, docs/forwarding.md) and their retries:
    # the first after forward_retry_initial seconds, doubling up to forward_retry_max.
    forward: tuple[ForwardRule, ...] = ()
    forward_retry_initial: float = 5.0
    forward_retry_max: float = 600.0
    # A destination's sending process (~120 MB) stops once nothing has been due for it this
    # long, and starts again with the next entry (0: kept running while serve runs).
    forward_sender_idle: float = 300.0
    # This node's name in a multi-node archive ("": the host name): Iceberg data files are
    # named under it, so two nodes never write the same path (docs/scale-out.md).
    node_name: str = ""
    # The catalog as Iceberg tables (engine/iceberg, docs/scale-out.md): the Iceberg catalog
    # ("": none; sqlite:///path, postgresql://user@host/db, or a REST catalog's http(s):// URL),
    # the warehouse ("": <data_dir>/iceberg/warehouse; or s3://bucket/prefix), the namespace
    # of the instances and deletions tables, and the seconds between publication passes.
    iceberg_catalog: str = ""
    iceberg_warehouse: str = ""
    iceberg_namespace: str = "stowage"
    iceberg_interval: float = 10.0
    iceberg_batch_files: int = 64          # sealed catalog files per Iceberg commit at most
    # Seconds between refreshes of this node's view of the other nodes' instances and
    # deletions from the Iceberg tables (engine/iceberg/view.py; 0: no view). With the other
    # nodes' iceberg_interval, it bounds how stale a C-FIND answer can be (docs/scale-out.md).
    cluster_refresh: float = 5.0
    # Sealed segments on S3-compatible object storage (engine/storage, docs/scale-out.md):
    # "" keeps them on local disk only; "s3://bucket/prefix" uploads each sealed segment there.
    storage: str = ""
    s3_endpoint: str = ""                  # e.g. http://127.0.0.1:8333 ("": AWS_ENDPOINT_URL, else AWS itself)
    s3_region: str = ""                    # "": AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    s3_access_key: str = ""                # "": the usual AWS chain (AWS_ACCESS_KEY_ID..., ~/.aws, instance role)
    s3_secret_key: str = ""
    s3_path_style: bool = False            # path-style addressing (most S3-compatible servers); false: virtual-hosted
    s3_part_size: int = 64 << 20           # multipart upload part size (5 MiB to 5 GiB)
    s3_read_block: int = 1 << 20           # ranged GETs read, and the read cache keeps, this many bytes at a time
    s3_retries: int = 5                    # a failed S3 request is tried again this many times (backoff up to 20 s)
    local_cache_bytes: int = 10 << 30      # local copies of uploaded segments plus the read cache: at most this
    upload_interval: float = 2.0           # seconds between the uploader's looks for sealed segments
    # With storage set, a worker's active segment holding records is rolled (sealed) once it is
    # this many seconds old, so what a quiet node stored reaches the bucket, and every other
    # node's C-MOVE/C-GET, within about this plus upload_interval (0: roll by size only).
    segment_max_age: float = 60.0

    @property
    def http_process_count(self) -> int:
        return self.http_processes or (os.cpu_count() or 1)

    @property
    def node(self) -> str:
        """node_name, or this host's name."""
        return self.node_name or re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "node"

    @property
    def cluster_view(self) -> bool:
        """Whether this node keeps a view of the other nodes (queries and retrieval answer
        for the whole archive)."""
        return bool(self.iceberg_catalog and self.cluster_refresh)

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)

    def validate(self) -> "Config":
        if not _AE_TITLE.match(self.aet) or not self.aet.strip():
            raise ConfigError(f"aet: {self.aet!r} is not a valid AE title (1-16 printable ASCII, no backslash)")
        if not 0 <= self.port < 65536 or (self.port == 0 and not self.tls_port):
            raise ConfigError(f"port: {self.port} is outside 1-65535 (0, no plain port, needs tls_port)")
        if self.tls_port and (not 0 < self.tls_port < 65536 or self.tls_port == self.port):
            raise ConfigError(f"tls_port: {self.tls_port} is outside 1-65535 or is the plain port")
        if self.metrics_port and (not 0 < self.metrics_port < 65536 or self.metrics_port in (self.port, self.tls_port)):
            raise ConfigError(f"metrics_port: {self.metrics_port} is outside 1-65535 or is a DICOM port")
        if self.tls_port and not (self.tls_cert and self.tls_key):
            raise ConfigError("tls_port is set: tls_cert and tls_key (PEM files) are needed as well")
        if self.durability not in DURABILITY_MODES:
            raise ConfigError(f"durability: {self.durability!r} is not one of {', '.join(DURABILITY_MODES)}")
        if self.duplicates not in DUPLICATE_POLICIES:
            raise ConfigError(f"duplicates: {self.duplicates!r} is not one of {', '.join(DUPLICATE_POLICIES)}")
        if not 4096 <= self.max_pdu <= (1 << 26):
            raise ConfigError(f"max_pdu: {self.max_pdu} is outside 4096-67108864 (0, unlimited, is refused)")
        if not -7 <= self.zstd_level <= 22:  # negative: zstd's fast levels (docs/storage.md, Compression)
            raise ConfigError(f"zstd_level: {self.zstd_level} is outside -7 to 22")
        if not 0 <= self.pending_interval <= 3600:
            raise ConfigError(f"pending_interval: {self.pending_interval} is outside 0-3600 seconds")
        if (self.max_inflated_bytes < 1 << 20 or self.max_command_bytes < 1 << 10
                or not 8 <= self.max_nesting_depth <= 256 or self.max_spool_bytes < self.spill_threshold):
            raise ConfigError("max_inflated_bytes must be >= 1 MiB, max_command_bytes >= 1 KiB, max_nesting_depth "
                              "8-256 (the readers' stack holds that), and max_spool_bytes >= spill_threshold")
        if (not 0 < self.association_request_timeout <= 3600 or self.max_associations_per_address < 0
                or self.max_commitment_references < 1 or self.max_pending_commitments < 1):
            raise ConfigError("association_request_timeout must be in (0, 3600]; max_associations_per_address >= 0; "
                              "max_commitment_references and max_pending_commitments >= 1")
        if not 0 < self.seal_interval <= 3600 or self.seal_max_rows < 1 or not 0 < self.seal_max_age <= 86400:
            raise ConfigError("seal_interval must be in (0, 3600] seconds, seal_max_rows >= 1, seal_max_age in "
                              "(0, 86400] seconds")
        if self.workers < 0 or self.max_associations < 1:
            raise ConfigError("workers must be >= 0 and max_associations >= 1")
        if not 0 < self.compact_live_ratio <= 1 or self.compact_rate < 0 or self.compact_grace < 0:
            raise ConfigError("compact_live_ratio must be in (0, 1]; compact_rate and compact_grace >= 0")
        if self.quota_policy not in QUOTA_POLICIES or self.max_storage_bytes < 0:
            raise ConfigError(f"quota_policy: {self.quota_policy!r} is not one of {', '.join(QUOTA_POLICIES)} "
                              "(or max_storage_bytes < 0)")
        scrub_setting(self.scrub_rate)  # raises ConfigError for a value it cannot use
        if self.http_port and (not 0 < self.http_port < 65536
                               or self.http_port in (self.port, self.tls_port, self.metrics_port)):
            raise ConfigError(f"http_port: {self.http_port} is outside 1-65535 or is another port of ours")
        if self.http_tls and not (self.tls_cert and self.tls_key):
            raise ConfigError("http_tls is set: tls_cert and tls_key (PEM files) are needed as well")
        if self.http_processes < 0 or not 1 <= self.qido_max_limit <= 100000:
            raise ConfigError("http_processes must be >= 0 and qido_max_limit 1-100000")
        if not 0 <= self.metadata_stable_seconds <= 86400:
            raise ConfigError("metadata_stable_seconds must be in [0, 86400] (0: off)")
        for key in ("unknown_ae_services", "unknown_ae_loopback_services"):
            _check_services(key, getattr(self, key))
        for network in self.proxy_protocol_from:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"proxy_protocol_from: {network!r} is not an IP address or network") from None
        if not 0 < self.forward_retry_initial <= self.forward_retry_max <= 86400:
            raise ConfigError("forward_retry_initial must be > 0 and <= forward_retry_max <= 86400 seconds")
        if self.forward_sender_idle < 0:
            raise ConfigError("forward_sender_idle must be >= 0 seconds (0: never stopped)")
        if self.node_name and not _NODE_NAME.match(self.node_name):
            raise ConfigError(f"node_name: {self.node_name!r} must be 1-64 of A-Z a-z 0-9 . _ - (it names files)")
        if (not _NODE_NAME.match(self.iceberg_namespace) or not 0 < self.iceberg_interval <= 86400
                or not 1 <= self.iceberg_batch_files <= 10000):
            raise ConfigError("iceberg_namespace must be 1-64 of A-Z a-z 0-9 . _ -, iceberg_interval in (0, 86400] "
                              "seconds and iceberg_batch_files 1-10000")
        if not 0 <= self.cluster_refresh <= 86400:
            raise ConfigError(f"cluster_refresh: {self.cluster_refresh!r} must be 0 (no view of other nodes) to 86400 "
                              "seconds")
        if self.iceberg_catalog and not re.match(r"^(https?://|sqlite:///|postgresql(\+\w+)?://)", self.iceberg_catalog):
            raise ConfigError(f"iceberg_catalog: {self.iceberg_catalog!r} is neither a REST catalog (http:// or "
                              "https://) nor a SQL catalog (sqlite:///path or postgresql://user@host/db)")
        if self.iceberg_warehouse and not re.match(r"^(s3|file)://", self.iceberg_warehouse):
            raise ConfigError(f"iceberg_warehouse: {self.iceberg_warehouse!r} is not an s3:// or file:// URL")
        if self.durability == "object-store" and not self.storage:
            raise ConfigError('durability = "object-store" needs storage = "s3://bucket/prefix"')
        if self.storage and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", self.storage):
            raise ConfigError(f"storage: {self.storage!r} is not \"\" (local disk) or s3://bucket/prefix")
        if not (5 << 20) <= self.s3_part_size <= (5 << 30) or not 4096 <= self.s3_read_block <= (1 << 30):
            raise ConfigError("s3_part_size must be 5 MiB-5 GiB and s3_read_block 4 KiB-1 GiB")
        if not 0 <= self.s3_retries <= 20:
            raise ConfigError(f"s3_retries: {self.s3_retries} is outside 0-20 (retries of a failed S3 request)")
        if self.segment_max_age < 0:
            raise ConfigError("segment_max_age must be >= 0 seconds (0: roll by segment_size only)")
        if self.local_cache_bytes < 0 or not 0 < self.upload_interval <= 3600:
            raise ConfigError("local_cache_bytes must be >= 0 and upload_interval in (0, 3600] seconds")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: {self.log_format!r} is not text or json")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        self._validate_network_and_sizes()
        return self

    def _validate_network_and_sizes(self) -> None:
        """Timeouts and sizes nothing else checks: a value out of range here would only fail
        later, and elsewhere (every association refused by a worker for a negative
        network_timeout, a segment rolled per record for a negative segment_size)."""
        for key in ("network_timeout", "acse_timeout", "dimse_timeout"):
            if not 0 < getattr(self, key) <= 86400:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is outside (0, 86400] seconds")
        if not 0 <= self.drain_timeout <= 86400 or not 0 <= self.compact_interval <= 86400 * 366:
            raise ConfigError("drain_timeout must be in [0, 86400] seconds and compact_interval >= 0 (0: off)")
        if self.segment_size < 1 or self.compact_min_files < 1:
            raise ConfigError(f"segment_size ({self.segment_size}) and compact_min_files ({self.compact_min_files}) "
                              "must be >= 1")
        if self.spill_threshold < 0:  # (a negative min_free_bytes turns the free-space checks off)
            raise ConfigError(f"spill_threshold ({self.spill_threshold}) must be >= 0 bytes")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, for handing the configuration to a worker process."""
        d = dataclasses.asdict(self)
        d["data_dir"] = str(self.data_dir)
        for key in ("protected_patients", "unknown_ae_services", "unknown_ae_loopback_services",
                    "proxy_protocol_from"):
            d[key] = list(d[key])
        d["remotes"] = {k: dataclasses.asdict(v) for k, v in self.remotes.items()}
        d["http_cors_origins"] = list(self.http_cors_origins)
        d["forward"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(r).items()}
                        for r in self.forward]
        d["http_tokens"] = {k: {"token": v.token, "scopes": list(v.scopes)} for k, v in self.http_tokens.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return _build(dict(d))


SCRUB_PERIODS = {"week": 7 * 24 * 3600.0, "day": 24 * 3600.0}


def scrub_setting(value: str) -> tuple[float, float]:
    """`scrub_rate` as (bytes/s, 0) for a rate in MB/s, (0, seconds) for one pass per
    period, (0, 0) for no scrub."""
    text = str(value).strip().lower()
    if text in SCRUB_PERIODS:
        return 0.0, SCRUB_PERIODS[text]
    if text in ("off", "no", "false", ""):
        return 0.0, 0.0
    try:
        rate = float(text)
    except ValueError:
        raise ConfigError(f"scrub_rate: {value!r} is not \"week\", \"day\", a number of MB/s, or 0 (off)") from None
    if not 0 <= rate < 1e6:
        raise ConfigError(f"scrub_rate: {value!r} MB/s is outside 0-1000000")
    return rate * 1e6, 0.0


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", tuple: "a list"}


def _coerce(key: str, value: Any) -> Any:
    """A value from the file (TOML types), a variable or a flag (strings) as the key's type.
    What TOML gives of another type is refused, not converted: `port = true` is not port 1,
    `workers = 2.5` not 2 workers, `cache_writes = "maybe"` not false."""
    default = _FIELDS[key].default
    try:
        if key == "data_dir":
            if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
                raise ValueError(value)
            return Path(value)
        if key in ("protected_patients", "http_cors_origins", "proxy_protocol_from"):  # a TOML list, or comma-separated
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if isinstance(default, tuple):  # a TOML list, or comma-separated in a flag or variable
            return _list(value)
        if isinstance(default, bool):
            return value if isinstance(value, bool) else _truth(value)
        if isinstance(value, bool) or isinstance(value, (Mapping, list, tuple)):
            raise ValueError(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        kind = "a path" if key == "data_dir" else _KINDS.get(type(default), type(default).__name__)
        raise ConfigError(f"{key}: {value!r} is not {kind}") from None


def _truth(value: Any) -> bool:
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text is None or text not in _TRUE + _FALSE:
        raise ValueError(value)
    return text in _TRUE


_REMOTE_KEYS = {"ae_title", "host", "port", "commitment_same_association", "associations", "tls", "tls_ca",
                "tls_cert", "tls_key", "tls_check_hostname", "services", "check_host", "require_certificate"}


def _list(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in items if str(v).strip())


def _check_services(key: str, services: tuple[str, ...]) -> tuple[str, ...]:
    """Service names as configured; "all" stands for every one, "none" (or nothing) for none."""
    if set(services) == {"all"}:
        return SERVICES
    if set(services) <= {"none"}:
        return ()
    unknown = sorted(set(services) - set(SERVICES))
    if unknown:
        raise ConfigError(f"{key}: {', '.join(map(repr, unknown))} is not a service; use {', '.join(SERVICES)}, "
                          "all or none")
    return services


def _flag(title: str, spec: Mapping[str, Any], key: str, default: bool) -> bool:
    value = spec.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"remotes.{title}.{key}: must be true or false")
    return value


def _tls_files(title: str, spec: Mapping[str, Any]) -> tuple[str, str, str]:
    files = tuple(str(spec.get(k, "") or "") for k in ("tls_ca", "tls_cert", "tls_key"))
    for key, path in zip(("tls_ca", "tls_cert", "tls_key"), files):
        if path and not Path(path).is_file():
            raise ConfigError(f"remotes.{title}.{key}: no such file: {path}")
    if bool(files[1]) != bool(files[2]):
        raise ConfigError(f"remotes.{title}: tls_cert and tls_key go together")
    return files  # type: ignore[return-value]


def _remotes(table: Mapping[str, Any]) -> dict[str, Remote]:
    remotes = {}
    for title, spec in table.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"remotes.{title}: must be a table with host and port")
        unknown = set(spec) - _REMOTE_KEYS
        if unknown:
            raise ConfigError(f"remotes.{title}: unknown key(s) {', '.join(sorted(unknown))}")
        same = _flag(title, spec, "commitment_same_association", True)
        associations = spec.get("associations", 1)
        if type(associations) is not int or not 1 <= associations <= 16:
            raise ConfigError(f"remotes.{title}.associations: must be a whole number from 1 to 16")
        tls = _flag(title, spec, "tls", False)
        ca, cert, key = _tls_files(title, spec)
        services = _check_services(f"remotes.{title}.services", _list(spec.get("services", SERVICES)))
        flags = [_flag(title, spec, k, d) for k, d in
                 (("tls_check_hostname", True), ("check_host", False), ("require_certificate", False))]
        host, port = spec.get("host"), spec.get("port")
        if not isinstance(host, str) or not host.strip() or type(port) is not int or not 0 < port < 65536:
            raise ConfigError(f"remotes.{title}: needs host (a name or address) and port (1-65535); "
                              f"got host {host!r}, port {port!r}")
        remotes[title] = Remote(title, host.strip(), port, same, associations, tls, ca, cert, key, flags[0],
                                services, *flags[1:])
        if not _AE_TITLE.match(title):
            raise ConfigError(f"remotes.{title}: not a valid AE title")
    return remotes


def _tokens(table: Mapping[str, Any]) -> dict[str, Token]:
    tokens, seen = {}, set()
    for name, spec in table.items():
        if isinstance(spec, Token):
            tokens[name] = spec
            continue
        if not isinstance(spec, Mapping) or set(spec) - {"token", "scopes"}:
            raise ConfigError(f"http_tokens.{name}: must be a table with token and scopes only")
        token, scopes = spec.get("token"), spec.get("scopes", ["read"])
        if not isinstance(token, str) or len(token) < 16 or not token.isprintable() or " " in token:
            raise ConfigError(f"http_tokens.{name}.token: a string of at least 16 printable characters, no spaces")
        if isinstance(scopes, str):
            scopes = [scopes]
        if not scopes or not all(s in TOKEN_SCOPES for s in scopes):
            raise ConfigError(f"http_tokens.{name}.scopes: a list of {', '.join(TOKEN_SCOPES)}")
        if token in seen:
            raise ConfigError(f"http_tokens.{name}: the same token as another entry")
        seen.add(token)
        tokens[name] = Token(name, token, tuple(scopes))
    return tokens


def _build(values: dict[str, Any]) -> Config:
    unknown = set(values) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(sorted(unknown))}")
    remotes = values.pop("remotes", None) or {}
    if not isinstance(remotes, Mapping):
        raise ConfigError("remotes: must be [remotes.AE_TITLE] tables with host and port")
    tokens = values.pop("http_tokens", None) or {}
    if not isinstance(tokens, Mapping):
        raise ConfigError("http_tokens: must be a table of name = {token, scopes}")
    projects = values.pop("projects", None) or {}
    if not isinstance(projects, Mapping):
        raise ConfigError("projects: must be a table of [projects.NAME] tables")
    forward = values.pop("forward", None) or []
    kwargs = {k: _coerce(k, v) for k, v in values.items()}
    kwargs["http_tokens"] = _tokens(tokens)
    for key in ("unknown_ae_services", "unknown_ae_loopback_services"):
        if key in kwargs:
            kwargs[key] = _check_services(key, kwargs[key])
    if not all(isinstance(v, Remote) for v in remotes.values()):
        remotes = _remotes(remotes)
    try:
        kwargs["forward"] = parse_rules(forward, remotes, projects)
    except RuleError as e:
        raise ConfigError(str(e)) from None
    return Config(**kwargs, remotes=remotes, projects=dict(projects)).validate()


def load(path: Path | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < TOML file < STOWAGE_* environment < explicit overrides (flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values.update({k.replace("-", "_"): v for k, v in tomllib.load(f).items()})
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except UnicodeDecodeError as e:  # TOML is UTF-8; tomllib decodes before it parses
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    env = os.environ if env is None else env
    for key in _FIELDS:
        name = f"STOWAGE_{key.upper()}"
        if key not in ("remotes", "http_tokens", "projects", "forward") and name in env:
            try:  # a stray variable is looked for in the file, unless the error names it
                values[key] = _coerce(key, env[name])
            except ConfigError as e:
                raise ConfigError(f"{e} (from the environment variable {name})") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(values)
