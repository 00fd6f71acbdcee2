"""Sealed segments on S3-compatible object storage (docs/scale-out.md).

The active segment and the group commit stay on local disk. Once sealed (no longer the
last segment of its slot, catalogued to its end), a segment is uploaded by the uploader
process (uploader.py), verified by a read-back of its size and SHA-256, and recorded in
the manifest (`uploaded`); only then may its local copy be evicted under the local-disk
budget (`local_cache_bytes`). A reader that finds a segment file missing reads the
uploaded copy by ranged GETs through a block cache on local disk (remote.py), wherever
it reads records: retrieval, export, verify, compaction.

    objects.py   the bucket: one boto3 client, checksummed uploads, ranged GETs
    remote.py    a segment in the bucket as a read-only file, and the read cache
    uploader.py  the serve helper process that uploads, records and evicts
"""
