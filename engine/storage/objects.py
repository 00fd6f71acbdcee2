"""The bucket: where `storage = "s3://bucket/prefix"` points, reached with boto3.

Uploads carry a SHA-256 per part (the server refuses a part whose bytes do not match,
BadDigest) and are verified afterwards by a HEAD that reads back the object's size and
its full-object checksum (for a multipart upload the checksum of the parts' checksums,
"-N"), both compared with what was computed from the local file.
"""
from __future__ import annotations

import base64
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stowage.engine.runtime.config import Config

_READ = 8 << 20  # bytes read from the local file at a time while hashing and uploading


class ObjectStoreError(RuntimeError):
    """The object store refused or failed a request; the message says which and why."""


class SegmentConflict(ObjectStoreError):
    """The bucket holds another object at a segment's key: never overwritten, and no
    reason to hold up the other segments' uploads."""


@dataclass(frozen=True)
class Uploaded:
    """What a verified upload put where: recorded in the manifest."""

    key: str
    size: int
    sha256: str       # hex digest of the whole object
    checksum: str     # the S3 ChecksumSHA256 the server reported (base64, "-N" for N parts)

    def as_record(self, at: float) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "sha256": self.sha256, "checksum": self.checksum, "at": at}


def parse_url(url: str) -> tuple[str, str]:
    """("bucket", "prefix") of "s3://bucket/prefix" (the prefix without slashes at its ends)."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


class Counters:
    """Requests and bytes this process sent to the object store, by kind (for the bench)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, nbytes: int = 0) -> None:
        with self.lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1
            self.bytes[kind] = self.bytes.get(kind, 0) + nbytes


class ObjectStore:
    """One bucket and prefix; thread-safe (boto3 clients are)."""

    def __init__(self, config: Config) -> None:
        import boto3  # only when object storage is configured
        from botocore.config import Config as BotoConfig
        self.bucket, self.prefix = parse_url(config.storage)
        self.node = config.node
        self.part_size = config.s3_part_size
        kwargs: dict[str, Any] = {}
        if config.s3_endpoint:
            kwargs["endpoint_url"] = config.s3_endpoint
        region = config.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kwargs["region_name"] = region or "us-east-1"
        if config.s3_access_key:
            kwargs["aws_access_key_id"] = config.s3_access_key
            kwargs["aws_secret_access_key"] = config.s3_secret_key
        style = {"addressing_style": "path"} if config.s3_path_style else {}
        self.client = boto3.session.Session().client(
            "s3", config=BotoConfig(s3=style, retries={"max_attempts": config.s3_retries, "mode": "standard"},
                                    max_pool_connections=16, connect_timeout=10, read_timeout=60),
            **kwargs)
        self.counters = Counters()

    def key(self, name: str, node: str | None = None) -> str:
        """Where segment `name` of `node` (default: this node) lives: `<prefix>/<node>/segments/<name>`,
        so nodes sharing a bucket and prefix never collide (docs/scale-out.md)."""
        return segment_key(self.prefix, node or self.node, name)

    def head(self, key: str) -> dict | None:
        """The HEAD of `key` (size, checksum), or None when the bucket has no such object."""
        return self._existing(key)

    def still_there(self, entry: dict[str, Any]) -> str:
        """"" when the object of an uploaded segment (a manifest `uploaded` entry) still has
        the size and checksum its verified upload recorded; else what is wrong. One HEAD:
        the scrub checks evicted segments so, not by reading them again (docs/storage.md)."""
        head = self._existing(entry["key"])
        if head is None:
            return f"s3://{self.bucket}/{entry['key']} is missing from the bucket"
        size, checksum = head.get("ContentLength"), head.get("ChecksumSHA256")
        if size != entry["size"] or (entry.get("checksum") and checksum != entry["checksum"]):
            return (f"s3://{self.bucket}/{entry['key']} holds {size} bytes with SHA-256 {checksum}, not the "
                    f"{entry['size']} bytes with {entry.get('checksum')} uploaded")
        return ""

    def list(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under `prefix` (paged LISTs)."""
        out: dict[str, int] = {}
        token: dict[str, str] = {}
        while True:
            r = self._call("LIST", self.client.list_objects_v2, Prefix=prefix, **token)
            self.counters.add("list")
            out.update({o["Key"]: int(o["Size"]) for o in r.get("Contents", [])})
            if not r.get("IsTruncated"):
                return out
            token = {"ContinuationToken": r["NextContinuationToken"]}

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            raise ObjectStoreError(f"{what} s3://{self.bucket}/{kwargs.get('Key', '')}: "
                                   f"{err.get('Code', '?')} {err.get('Message', '')}".rstrip()) from None
        except BotoCoreError as e:
            raise ObjectStoreError(f"{what} s3://{self.bucket}/{kwargs.get('Key', '')}: {e}") from None

    # -- upload ------------------------------------------------------------------------

    def upload(self, path: Path, name: str) -> Uploaded:
        """Upload the local file `path` as segment `name`, then verify it by a read-back of
        size and checksum; raises ObjectStoreError if anything does not match."""
        key = self.key(name)
        size = path.stat().st_size
        held = self._existing(key)
        if held is not None:
            return self._same_or_refuse(path, name, key, size, held)
        whole = hashlib.sha256()
        with open(path, "rb") as f:
            if size <= self.part_size:
                data = f.read()
                whole.update(data)
                expected = _b64(hashlib.sha256(data).digest())
                self._call("PUT", self.client.put_object, Key=key, Body=data, ChecksumSHA256=expected,
                           Metadata={"sha256": whole.hexdigest()})
                self.counters.add("put", len(data))
            else:
                expected = self._multipart(f, key, size, whole)
        head = self._call("HEAD", self.client.head_object, Key=key, ChecksumMode="ENABLED")
        self.counters.add("head")
        got_size, got_sum = head.get("ContentLength"), head.get("ChecksumSHA256")
        if got_size != size or got_sum != expected:
            raise ObjectStoreError(f"upload of {name} to s3://{self.bucket}/{key} did not verify: the store holds "
                                   f"{got_size} bytes with SHA-256 {got_sum}, the local file {size} bytes "
                                   f"with {expected}")
        return Uploaded(key, size, whole.hexdigest(), expected)

    def _existing(self, key: str) -> dict | None:
        """The HEAD of `key`, or None when the bucket has no such object. A bucket out of
        reach (a refused connection, a timeout: botocore's own errors, not ClientError) is an
        ObjectStoreError like any failed request, so that callers (the uploader, the scrub,
        a restore) say so in one line and try again rather than die of it."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ObjectStoreError(f"HEAD s3://{self.bucket}/{key}: {e}") from None
        except BotoCoreError as e:
            raise ObjectStoreError(f"HEAD s3://{self.bucket}/{key}: {e}") from None
        self.counters.add("head")
        return head

    def _same_or_refuse(self, path: Path, name: str, key: str, size: int, held: dict) -> Uploaded:
        """An object of this name is in the bucket already: an upload that landed before a
        crash (the same bytes: nothing to send again), or another segment of the same name
        (a second node on the same prefix, a data directory lost and started afresh), which
        must never be overwritten."""
        whole, digests = hashlib.sha256(), []
        with open(path, "rb") as f:
            while part := _read_part(f, self.part_size):
                whole.update(part)
                digests.append(hashlib.sha256(part).digest())
        # The checksum S3 reports: of the bytes for one PUT, of the parts' digests for a multipart upload.
        expected = (_b64(digests[0] if digests else hashlib.sha256(b"").digest()) if len(digests) <= 1 else
                    _b64(hashlib.sha256(b"".join(digests)).digest()) + f"-{len(digests)}")
        theirs = held.get("ChecksumSHA256")
        if held.get("ContentLength") == size and theirs == expected:
            return Uploaded(key, size, whole.hexdigest(), expected)
        raise SegmentConflict(f"s3://{self.bucket}/{key} already holds a different segment named {name} "
                               f"({held.get('ContentLength')} bytes, checksum {theirs}); not overwritten. Is another "
                               "node, or a data directory started afresh, using the same storage prefix?")

    def _multipart(self, f, key: str, size: int, whole) -> str:
        up = self._call("POST", self.client.create_multipart_upload, Key=key, ChecksumAlgorithm="SHA256")
        self.counters.add("post")
        upload_id, parts, digests = up["UploadId"], [], []
        try:
            number = 0
            while True:
                part = _read_part(f, self.part_size)
                if not part:
                    break
                number += 1
                digest = hashlib.sha256(part).digest()
                whole.update(part)
                r = self._call("PUT part", self.client.upload_part, Key=key, UploadId=upload_id, PartNumber=number,
                               Body=part, ChecksumSHA256=_b64(digest))
                self.counters.add("put", len(part))
                parts.append({"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": _b64(digest)})
                digests.append(digest)
            self._call("POST complete", self.client.complete_multipart_upload, Key=key, UploadId=upload_id,
                       MultipartUpload={"Parts": parts})
            self.counters.add("post")
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # the bucket's lifecycle rule for incomplete uploads cleans up
                pass
            raise
        return _b64(hashlib.sha256(b"".join(digests)).digest()) + f"-{len(digests)}"

    # -- read, delete -------------------------------------------------------------------

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the object: one ranged GET."""
        r = self._call("GET", self.client.get_object, Key=key, Range=f"bytes={start}-{start + length - 1}")
        data = r["Body"].read()
        self.counters.add("get", len(data))
        if len(data) != length:
            raise ObjectStoreError(f"GET s3://{self.bucket}/{key} bytes {start}-{start + length - 1}: "
                                   f"got {len(data)} bytes")
        return data

    def put(self, key: str, data: bytes) -> None:
        """One small object, checksummed (the server refuses other bytes: BadDigest)."""
        self._call("PUT", self.client.put_object, Key=key, Body=data,
                   ChecksumSHA256=_b64(hashlib.sha256(data).digest()))
        self.counters.add("put", len(data))

    def delete_many(self, keys: list[str]) -> None:
        """Delete `keys`, up to 1000 per request."""
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            r = self._call("DELETE", self.client.delete_objects, Delete={"Objects": [{"Key": k} for k in chunk],
                                                                        "Quiet": True})
            self.counters.add("delete")
            if r.get("Errors"):
                e = r["Errors"][0]
                raise ObjectStoreError(f"DELETE s3://{self.bucket}/{e.get('Key')}: {e.get('Code')} {e.get('Message')}")

    def delete(self, key: str) -> None:
        self._call("DELETE", self.client.delete_object, Key=key)
        self.counters.add("delete")


def segment_key(prefix: str, node: str, name: str) -> str:
    """`<prefix>/<node>/segments/<name>` (no leading slash when the prefix is empty).
    Segments uploaded before node names were in keys sit at `<prefix>/segments/<name>`;
    the manifest records each segment's key, so those stay readable where they are."""
    return f"{prefix}/{node}/segments/{name}" if prefix else f"{node}/segments/{name}"


def _read_part(f, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = f.read(min(_READ, left))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


_stores: dict[tuple, ObjectStore] = {}
_stores_lock = threading.Lock()


def store_for(config: Config) -> ObjectStore:
    """This process's ObjectStore for `config` (one client per process and bucket)."""
    ident = (config.storage, config.s3_endpoint, config.s3_region, config.s3_access_key, config.s3_path_style,
             config.node)
    with _stores_lock:
        if ident not in _stores:
            _stores[ident] = ObjectStore(config)
        return _stores[ident]
