"""engine/store/payload_into.py: a record's payload read into a caller's buffer (WADO-RS)
comes back exactly as segment.read_payload gives it, with the same checks."""
from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard

from stowage.engine.store.payload_into import SCRATCH_MAX, payload_length, read_payload_into
from stowage.engine.store.segment import (FLAG_SHUFFLE, FLAG_ZSTD, SHUFFLE_BLOCK, CorruptRecord, OversizedRecord,
                                          encode_record, iter_records, read_payload, shuffle)
from stowage.engine.web.part_buffers import PartBuffers

SIZES = [0, 1, 7, 4096, SHUFFLE_BLOCK - 1, SHUFFLE_BLOCK + 3, 2 * SHUFFLE_BLOCK + 101, SCRATCH_MAX + 5]


def _payload(n: int) -> bytes:
    return bytes(i % 7 for i in range(n // 2)) + os.urandom(n - n // 2)


def _stored(p: bytes, flags: int, declare: bool = True) -> bytes:
    data = bytes(shuffle(p)) if flags & FLAG_SHUFFLE else p
    if flags & FLAG_ZSTD:
        cctx = zstandard.ZstdCompressor(level=1, write_content_size=declare)
        if declare:
            return cctx.compress(data)
        streaming = cctx.compressobj()
        data = streaming.compress(data) + streaming.flush()
    return data


@pytest.mark.parametrize("flags", [0, FLAG_ZSTD, FLAG_SHUFFLE, FLAG_ZSTD | FLAG_SHUFFLE])
def test_every_kind_of_record_comes_back_exactly_after_its_lead(tmp_path, flags):
    seg = tmp_path / "s.seg"
    payloads = [_payload(n) for n in SIZES]
    with open(seg, "wb") as f:
        for n, p in enumerate(payloads):
            header = {"meta_length": 0, "dataset_length": len(p)} if n % 2 else {}
            f.write(encode_record(header, _stored(p, flags), flags))
    pool = PartBuffers(keep=2)
    for rec, p in zip(iter_records(seg), payloads):
        assert payload_length(seg, rec.offset) == len(p)
        for _ in range(2):  # the second time through reused buffers
            out = read_payload_into(seg, rec.offset, 11, pool.take)
            assert len(out) == 11 + len(p) and out[11:].tobytes() == p == bytes(read_payload(seg, rec.offset))
            pool.give(out)


def test_a_frame_without_its_size_and_a_header_that_disagrees_go_the_checked_way(tmp_path):
    """A frame that does not declare its size is read by read_payload (bounded by the
    header); a frame that declares more than its header says is refused as oversized, as
    read_payload refuses it (for frames past a chunk, where it reads the header)."""
    seg = tmp_path / "s.seg"
    p = _payload(50_000)
    undeclared = encode_record({"meta_length": 0, "dataset_length": len(p)}, _stored(p, FLAG_ZSTD, declare=False),
                               FLAG_ZSTD)
    lying = encode_record({"meta_length": 0, "dataset_length": 100}, _stored(bytes(2 << 20), FLAG_ZSTD), FLAG_ZSTD)
    seg.write_bytes(undeclared + lying)
    assert read_payload_into(seg, 0, 3, lambda n: np.empty(n, np.uint8))[3:].tobytes() == p
    assert payload_length(seg, len(undeclared)) is None
    with pytest.raises(OversizedRecord):
        read_payload_into(seg, len(undeclared), 3, lambda n: np.empty(n, np.uint8))


@pytest.mark.parametrize("flags", [0, FLAG_ZSTD | FLAG_SHUFFLE])
def test_a_flipped_byte_or_a_torn_record_is_refused(tmp_path, flags):
    seg = tmp_path / "s.seg"
    record = encode_record({}, _stored(_payload(70_000), flags), flags)
    for damaged, problem in ((record[:2000] + bytes([record[2000] ^ 1]) + record[2001:], "checksum"),
                             (record[:-10], "ends early")):
        seg.write_bytes(damaged)
        with pytest.raises(CorruptRecord, match=problem):
            read_payload_into(seg, 0, 0, lambda n: np.empty(n, np.uint8))
