"""A research project's secret and what is derived from it: UIDs, patient pseudonyms and
date offsets. Every value is an HMAC-SHA256 of the original under the project's key, so
the same input gives the same output in any process on any day, two projects give
unrelated outputs, and nobody without the key can recompute one from the original."""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32
# Modified Dates: each patient's dates move back by 1 to this many days (about 10 years).
MAX_DATE_OFFSET_DAYS = 3652


class KeyFileError(ValueError):
    """A key file that cannot be read or holds no usable key."""


def load_or_create(path: Path) -> bytes:
    """The key in `path` (hex), creating it (0600, fsynced, atomically) on first use."""
    try:
        return _parse(path.read_text(), path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # the first process to get here wins; the others read its key
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return _parse(path.read_text(), path)


def _parse(text: str, where: object) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise KeyFileError(f"{where}: a project key is {KEY_BYTES * 2} hex digits") from None
    if len(key) < 16:
        raise KeyFileError(f"{where}: a project key needs at least 16 bytes (32 hex digits), this has {len(key)}")
    return key


def parse(text: str, where: object = "key") -> bytes:
    return _parse(text, where)


class Keyed:
    """The derivations of one project's key. Purpose strings keep them independent.

    Results are remembered (bounded, least recently used first out): one series' instances
    share their study, series and frame of reference UIDs and their patient, and an HMAC
    per UID per instance was a third of the de-identification's CPU. The cache holds
    original values in memory only, as the instance being de-identified does."""

    CACHED = 16384  # entries per derivation: a few MB at most

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self.uid = functools.lru_cache(self.CACHED)(self._uid)            # type: ignore[method-assign]
        self.token = functools.lru_cache(self.CACHED)(self._token)        # type: ignore[method-assign]
        self.date_offset_days = functools.lru_cache(self.CACHED)(self._date_offset_days)  # type: ignore[method-assign]

    def digest(self, purpose: str, value: str) -> bytes:
        mac = self._mac.copy()
        mac.update(f"{purpose}\0{value}".encode())
        return mac.digest()

    def _uid(self, original: str) -> str:
        """A `2.25.` UID (PS3.5 B.2) from a name-based UUID: 128 bits of the HMAC with the
        version (8, custom) and variant bits set as RFC 9562 asks."""
        n = int.from_bytes(self.digest("uid", original)[:16], "big")
        n = (n & ~(0xF << 76)) | (0x8 << 76)
        n = (n & ~(0x3 << 62)) | (0x2 << 62)
        return f"2.25.{n}"

    def _token(self, purpose: str, value: str, length: int = 12) -> str:
        """A short upper-case base32 token (digits and letters), e.g. for a Patient ID."""
        return base64.b32encode(self.digest(purpose, value)).decode()[:length]

    def _date_offset_days(self, patient: str) -> int:
        """How many days this patient's dates move back (1..MAX_DATE_OFFSET_DAYS)."""
        return 1 + int.from_bytes(self.digest("dates", patient)[:8], "big") % MAX_DATE_OFFSET_DAYS
