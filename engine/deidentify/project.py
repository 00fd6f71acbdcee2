"""A research project: `[projects.NAME]` in the configuration (docs/configuration.md).

    [projects.TRIAL1]
    called_ae = "TRIAL1"              # C-STORE to this AE title (and `stowage import --project`) is de-identified
    calling_aes = ["CT1", "MR2"]      # optional: only from these callers
    options = ["retain_longitudinal_modified_dates", "retain_patient_characteristics"]
    key_file = ""                     # optional: the secret; default <data_dir>/projects/TRIAL1/key (made on first use)
    [[projects.TRIAL1.pixel_regions]] # Clean Pixel Data: rectangles per device signature
    manufacturer = "ACME"; model = "SONO 1"; rows = 480; columns = 640; regions = [[0, 0, 640, 40]]
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from stowage.engine.deidentify import encoded, keys, table
from stowage.engine.deidentify.pixels import Signature, blank, burned_in_reason
from stowage.engine.deidentify.profile import Outcome, Profile
from stowage.engine.deidentify.pseudonyms import PseudonymTable

_KEYS = {"called_ae", "calling_aes", "options", "key_file", "pixel_regions"}


class ProjectError(ValueError):
    """A `[projects.NAME]` table that cannot be used; the message names the key."""


class Quarantined(Exception):
    """The instance may carry identity in its pixels and the project cannot clean them."""


class NotRecorded(Exception):
    """The project's pseudonym table or audit log could not be written (a full disk, a table
    locked too long): the de-identified copy must not go anywhere unrecorded, but unlike
    Quarantined this passes; the caller says "try again later" (C-STORE 0xA700, a forwarding
    entry kept pending)."""


@dataclass(frozen=True)
class ProjectConfig:
    name: str
    called_ae: str = ""
    calling_aes: tuple[str, ...] = ()
    options: frozenset[str] = frozenset()
    key_file: str = ""
    pixel_regions: tuple[Signature, ...] = ()

    def applies_to(self, called_ae: str, calling_ae: str) -> bool:
        return bool(self.called_ae) and called_ae.strip() == self.called_ae and \
            (not self.calling_aes or calling_ae.strip() in self.calling_aes)


def _signature(name: str, spec: Any) -> Signature:
    try:
        regions = tuple(tuple(int(v) for v in r) for r in spec["regions"])
        if not regions or any(len(r) != 4 or min(r) < 0 for r in regions):
            raise ValueError
        return Signature(str(spec["manufacturer"]), str(spec["model"]), int(spec["rows"]), int(spec["columns"]),
                         regions)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        raise ProjectError(f"projects.{name}.pixel_regions: each needs manufacturer, model, rows, columns and "
                           "regions = [[x, y, width, height], ...]") from None


def parse(projects: Mapping[str, Any]) -> dict[str, ProjectConfig]:
    """Check every `[projects.NAME]` table; raises ProjectError naming the bad key."""
    out = {}
    for name, spec in projects.items():
        if not isinstance(spec, Mapping):
            raise ProjectError(f"projects.{name}: must be a table")
        unknown = set(spec) - _KEYS
        if unknown:
            raise ProjectError(f"projects.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        try:
            options = table.check_options(set(spec.get("options", [])))
        except table.OptionError as e:
            raise ProjectError(f"projects.{name}.options: {e}") from None
        regions = tuple(_signature(name, s) for s in spec.get("pixel_regions", []))
        if regions and "clean_pixel_data" not in options:
            raise ProjectError(f"projects.{name}: pixel_regions need the clean_pixel_data option")
        calling = spec.get("calling_aes", [])
        out[name] = ProjectConfig(name, str(spec.get("called_ae", "")).strip(),
                                  tuple(str(c).strip() for c in ([calling] if isinstance(calling, str) else calling)),
                                  options, str(spec.get("key_file", "")), regions)
    return out


@dataclass
class Result:
    """One de-identified instance, encoded."""

    parts: list               # the data set (no file meta, no preamble), in pieces: bytes or memoryviews
    transfer_syntax: str
    sop_class_uid: str
    outcome: Outcome

    @property
    def dataset(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 and isinstance(self.parts[0], bytes) else b"".join(self.parts)


@dataclass
class Project:
    """A project ready to de-identify: its options, key, pseudonym table and audit log."""

    config: ProjectConfig
    directory: Path
    profile: Profile
    pseudonyms: PseudonymTable
    _audit_fd: int = -1
    _done_prefix: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, config: ProjectConfig, data_dir: Path) -> "Project":
        directory = data_dir / "projects" / config.name
        key_path = Path(config.key_file) if config.key_file else directory / "key"
        table_path = directory / "pseudonyms.sqlite"
        # A project that has de-identified before and lost its key (a restore that left the
        # owner-only file behind) must not make a new one: every patient and UID would get
        # new pseudonyms, and the research side two of each.
        if not config.key_file and table_path.exists() and not key_path.exists():
            raise ProjectError(f"projects.{config.name}: its key {key_path} is missing, but the project has "
                               f"de-identified before ({table_path}); restore the key (or name it in key_file), "
                               f"or move {directory} away to start the project afresh")
        try:
            key = keys.parse(key_path.read_text(), key_path) if config.key_file else keys.load_or_create(key_path)
        except OSError as e:
            raise ProjectError(f"projects.{config.name}: cannot read key file {key_path}: {e.strerror}") from None
        except keys.KeyFileError as e:
            raise ProjectError(f"projects.{config.name}: {e}") from None
        keyed = keys.Keyed(key)
        table = PseudonymTable(table_path)
        try:
            kept = table.key_digest(keyed.digest("key check", "").hex()[:16])
        except sqlite3.Error as e:
            table.close()
            raise ProjectError(f"projects.{config.name}: cannot read its pseudonym table {table_path}: {e}") from None
        if kept != keyed.digest("key check", "").hex()[:16]:
            table.close()
            raise ProjectError(f"projects.{config.name}: the key {key_path} is not the one its pseudonym table "
                               f"{table_path} was made with (its pseudonyms would not match); use that key, or "
                               f"move {directory} away to start the project afresh")
        return cls(config, directory, Profile(config.options, keyed), table)

    def deidentify_dataset(self, ds) -> Outcome:
        """De-identify a parsed data set in place; raises Quarantined."""
        reason = burned_in_reason(ds)
        if "clean_recognizable_visual_features" in self.config.options and \
                str(ds.get("RecognizableVisualFeatures", "")).upper() == "YES":
            reason = reason or "Recognizable Visual Features (0028,0302) is YES and cannot be cleaned here"
        if reason:
            signature = next((s for s in self.config.pixel_regions if s.matches(ds)), None)
            if signature is None or "Recognizable Visual Features" in reason:
                self.audit({"event": "quarantined", "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
                            "reason": reason})
                raise Quarantined(f"{reason}; no pixel_regions of project {self.config.name} match "
                                  f"({ds.get('Manufacturer', '')!s} / {ds.get('ManufacturerModelName', '')!s}, "
                                  f"{ds.get('Rows', '?')}x{ds.get('Columns', '?')})")
            blank(ds, signature)
        outcome = self.profile.apply(ds)
        self._done(outcome)
        return outcome

    def _done(self, outcome: Outcome) -> None:
        try:
            self.pseudonyms.record(outcome.pseudonym, outcome.patient_id, outcome.patient_name,
                                   outcome.date_offset_days, outcome.study_instance_uid)
        except (sqlite3.Error, OSError) as e:
            raise NotRecorded(f"project {self.config.name}: cannot write its pseudonym table ({e})") from e
        # the line `audit` would write, its fixed start encoded once (one line per instance ingested)
        if self._done_prefix is None:
            self._done_prefix = json.dumps({"project": self.config.name, "event": "deidentified",
                                            "options": sorted(self.config.options)}, separators=(",", ":"))[:-1]
        old, new = outcome.sop_instance_uid
        self._write_audit(f'{self._done_prefix},"original_sop_instance_uid":{json.dumps(old)},'
                          f'"sop_instance_uid":{json.dumps(new)}}}\n'.encode())

    def deidentify_bytes(self, dataset: bytes, transfer_syntax: str, start: int = 0) -> Result:
        """De-identify an encoded data set (no file meta); the result in the same transfer
        syntax, or RLE Lossless when compressed pixels were cleaned. Element by element
        (encoded.py) where it can, through pydicom where it cannot."""
        try:
            parts, outcome, sop_class = encoded.deidentify_parts(self.profile, dataset, transfer_syntax, start)
        except Exception:  # encoded.Fallback, or bytes it cannot walk (a truncated file): pydicom decides
            pass
        else:
            self._done(outcome)
            return Result(parts, transfer_syntax, sop_class, outcome)
        dataset = bytes(memoryview(dataset)[start:])
        deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
        if deflated:
            dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
        little, implicit = _encoding(transfer_syntax)
        ds = read_dataset(DicomBytesIO(dataset), implicit, little)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        outcome = self.deidentify_dataset(ds)
        ts = ds.file_meta.TransferSyntaxUID
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = _encoding(ts)
        write_dataset(buf, ds)
        data = buf.getvalue()
        if ts == DeflatedExplicitVRLittleEndian:
            c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            data = c.compress(data) + c.flush()
        return Result([data], str(ts), str(ds.get("SOPClassUID", "")), outcome)

    def audit(self, fields: dict) -> None:
        """One JSON line per instance in <data_dir>/projects/NAME/audit.jsonl (O_APPEND: lines
        from several processes never interleave). As sensitive as the pseudonym table."""
        self._write_audit((json.dumps({"project": self.config.name, **fields}, separators=(",", ":")) + "\n").encode())

    def _write_audit(self, line: bytes) -> None:
        with self._lock:
            try:
                if self._audit_fd < 0:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self._audit_fd = os.open(self.directory / "audit.jsonl",
                                             os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                if os.write(self._audit_fd, line) != len(line):  # a full disk mid-line
                    raise OSError(errno.ENOSPC, "the audit line was cut short")
            except OSError as e:
                raise NotRecorded(f"project {self.config.name}: cannot write its audit log "
                                  f"({e.strerror or e})") from e

    def close(self) -> None:
        if self._audit_fd >= 0:
            os.fsync(self._audit_fd)
            os.close(self._audit_fd)
            self._audit_fd = -1
        self.pseudonyms.close()


def _encoding(ts: str) -> tuple[bool, bool]:
    """(little endian, implicit VR) of a transfer syntax."""
    if ts == ImplicitVRLittleEndian:
        return True, True
    return ts != ExplicitVRBigEndian, False


def open_project(projects: Mapping[str, Any], name: str, data_dir: Path) -> Project:
    """The project `name` of the configuration, ready to use; ProjectError if there is none."""
    configs = parse(projects)
    if name not in configs:
        known = ", ".join(sorted(configs)) or "none is configured"
        raise ProjectError(f"no [projects.{name}] in the configuration ({known})")
    return Project.open(configs[name], data_dir)
