"""The segment store on its own: record format, verification, rolling, group commit."""
from __future__ import annotations

import random
import threading
import time

import pytest

from stowage.engine.store.segment import PREFIX_SIZE, CorruptRecord, encode_record, iter_records, read_payload, valid_end
from stowage.engine.store.writer import SegmentWriter
from page_cache import file_system, resident_pages


def test_records_round_trip_and_verify(tmp_path):
    seg = tmp_path / "000-00000001.seg"
    payloads = [bytes([i]) * (100 + i) for i in range(5)]
    with open(seg, "wb") as f:
        for i, p in enumerate(payloads):
            f.write(encode_record({"sop_instance_uid": f"1.2.{i}"}, p, 0))
    recs = list(iter_records(seg))
    assert [r.header["sop_instance_uid"] for r in recs] == [f"1.2.{i}" for i in range(5)]
    assert [read_payload(seg, r.offset) for r in recs] == payloads
    assert valid_end(seg) == seg.stat().st_size


def test_a_flipped_byte_is_detected(tmp_path):
    seg = tmp_path / "s.seg"
    seg.write_bytes(encode_record({"a": 1}, b"x" * 1000, 0) + encode_record({"a": 2}, b"y" * 1000, 0))
    data = bytearray(seg.read_bytes())
    data[500] ^= 0x01
    seg.write_bytes(bytes(data))
    assert list(iter_records(seg)) == []
    with pytest.raises(CorruptRecord):
        read_payload(seg, 0)


def test_read_payload_checks_the_header_and_takes_a_long_one(tmp_path):
    """read_payload does not decode the header, but a flipped header byte still fails its
    checksum; a header longer than its first read comes back whole; a torn record fails."""
    seg = tmp_path / "s.seg"
    long_header = {"note": "h" * 5000}
    record = encode_record({"sop_instance_uid": "1.2.3"}, b"p" * 300, 0)
    seg.write_bytes(record + encode_record(long_header, b"q" * 300, 0))
    assert read_payload(seg, len(record)) == b"q" * 300
    data = bytearray(seg.read_bytes())
    data[PREFIX_SIZE + 3] ^= 0x01  # inside the first record's header
    seg.write_bytes(bytes(data[: len(record)]) + bytes(data[len(record): -10]))
    with pytest.raises(CorruptRecord, match="checksum"):
        read_payload(seg, 0)
    with pytest.raises(CorruptRecord, match="ends early"):
        read_payload(seg, len(record))


def test_writer_rolls_segments_and_shares_fsyncs(tmp_path):
    committed: list[dict] = []
    w = SegmentWriter(tmp_path, 3, segment_size=50_000, fsync=True, on_commit=committed.extend)
    def store(i: int) -> None:
        w.append(encode_record({"i": i}, b"z" * 4000, 0), {"i": i})
    threads = [threading.Thread(target=store, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    w.close()
    segs = sorted(tmp_path.glob("003-*.seg"))
    assert len(segs) > 1, "the writer did not roll past segment_size"
    seen = sorted(r.header["i"] for s in segs for r in iter_records(s))
    assert seen == list(range(100))
    assert sorted(r["i"] for r in committed) == list(range(100))
    assert all({"segment", "offset", "record_length"} <= set(r) for r in committed)
    assert w.batches < 100, "concurrent stores did not share any fsync"


def test_an_aged_segment_rolls_only_once_it_holds_records(tmp_path):
    """segment_max_age (storage in a bucket): only sealed segments are uploaded, so the
    active one is rolled by age; an empty one never is (no stream of empty segments)."""
    w = SegmentWriter(tmp_path, 6, segment_size=1 << 30, fsync=True, on_commit=lambda rows: None)
    first = w.active_segment
    assert not w.roll_if_older(0.0), "an empty segment was rolled"
    w.append(encode_record({"i": 0}, b"a" * 100, 0), {"i": 0})
    assert not w.roll_if_older(3600.0), "a young segment was rolled"
    assert w.roll_if_older(0.0)
    assert w.active_segment != first
    w.append(encode_record({"i": 1}, b"b" * 100, 0), {"i": 1})
    w.close()
    assert [r.header["i"] for r in iter_records(tmp_path / first)] == [0]
    assert [r.header["i"] for r in iter_records(tmp_path / w.active_segment)] == [1]


def test_group_commit_answers_every_store_after_its_batch_and_hands_on_the_lead(tmp_path):
    """Each store returns only once its row is committed, or raises when its batch was
    refused; a refused batch does not stall the stores queued behind it (the lead passes
    on), and close waits for the commits under way."""
    from stowage.engine.store.writer import OutOfResources
    committed: list[dict] = []
    calls = [0]

    def on_commit(rows: list[dict]) -> None:
        calls[0] += 1
        if calls[0] % 3 == 2:  # every third batch cannot reach the catalog tail
            raise OSError(28, "no space left (planted)")
        committed.extend(rows)

    w = SegmentWriter(tmp_path, 4, segment_size=1 << 30, fsync=True, on_commit=on_commit)
    outcome: dict[int, str] = {}

    def store(i: int) -> None:
        try:
            w.append(encode_record({"i": i}, b"q" * 2000, 0), {"i": i})
        except OutOfResources:
            outcome[i] = "refused"
            return
        outcome[i] = "stored" if any(r["i"] == i for r in committed) else "answered before its commit"

    threads = [threading.Thread(target=store, args=(i,), daemon=True) for i in range(200)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a store waits forever"
    w.close()
    assert sorted(outcome) == list(range(200))
    assert set(outcome.values()) == {"stored", "refused"}
    stored = sorted(i for i, o in outcome.items() if o == "stored")
    seg, = tmp_path.glob("004-*.seg")
    assert sorted(r.header["i"] for r in iter_records(seg)) == stored  # refused batches were cut out


def test_shuffled_payloads_stream_back_exactly(tmp_path):
    """Byte-shuffled, compressed payloads of every size around the block boundary come
    back byte-exact through the streaming reader."""
    import os
    import zstandard
    from stowage.engine.store.segment import FLAG_SHUFFLE, FLAG_ZSTD, SHUFFLE_BLOCK, shuffle
    seg = tmp_path / "s.seg"
    sizes = [0, 1, 7, SHUFFLE_BLOCK - 1, SHUFFLE_BLOCK, SHUFFLE_BLOCK + 3, 3 * SHUFFLE_BLOCK + 101]
    payloads = [bytes(i % 7 for i in range(n // 2)) + os.urandom(n - n // 2) for n in sizes]
    with open(seg, "wb") as f:
        for p in payloads:
            f.write(encode_record({}, zstandard.ZstdCompressor(level=1).compress(shuffle(p)),
                                  FLAG_ZSTD | FLAG_SHUFFLE))
    assert [read_payload(seg, r.offset) for r in iter_records(seg)] == payloads


def test_shuffle_layout_is_fixed_and_inverts():
    """Records on disk depend on this exact layout: per 256 KiB block (and for the final
    partial block), the low bytes of each 16-bit lane, then the high bytes; an odd last
    byte stays where it is."""
    from stowage.engine.store.segment import SHUFFLE_BLOCK, shuffle, unshuffle
    assert bytes(shuffle(b"\x01\x02\x03\x04\x05")) == b"\x01\x03\x02\x04\x05"
    rng = random.Random(7)
    data = bytes(rng.getrandbits(8) for _ in range(2 * SHUFFLE_BLOCK + 11))

    def reference(block: bytes) -> bytes:
        even = len(block) // 2 * 2
        return block[0:even:2] + block[1:even:2] + block[even:]
    blocks = [data[i:i + SHUFFLE_BLOCK] for i in range(0, len(data), SHUFFLE_BLOCK)]
    assert bytes(shuffle(data)) == b"".join(reference(b) for b in blocks)
    assert bytes(unshuffle(shuffle(data))) == data


@pytest.mark.parametrize("head_length", [0, 2, 198, 3, 1 << 18, (1 << 18) - 2])
def test_shuffle_of_a_meta_and_its_data_set_is_that_of_their_join(head_length):
    """The store path shuffles a record's file meta and data set without joining them
    first: the bytes must be exactly those of shuffling the join, for data sets of every
    length around the block boundary (odd meta lengths and long metas take the plain path)."""
    from stowage.engine.store.segment import SHUFFLE_BLOCK, shuffle, shuffle_joined
    rng = random.Random(head_length)
    head = rng.randbytes(head_length)
    for length in [0, 1, 2, 7, 16 << 10, (16 << 10) + 3, SHUFFLE_BLOCK - head_length - 1,
                   SHUFFLE_BLOCK - head_length, SHUFFLE_BLOCK - head_length + 1, SHUFFLE_BLOCK - head_length + 2,
                   2 * SHUFFLE_BLOCK + 5, 525_001]:
        if length < 0:
            continue
        body = rng.randbytes(length)
        assert bytes(shuffle_joined(head, body)) == bytes(shuffle(head + body)), (head_length, length)


def test_record_checksum_is_zlibs_crc32():
    """Records written with the fast CRC-32 read back with zlib's, and the other way
    round: the checksum is part of the format."""
    import zlib
    from stowage.engine.store.segment import crc32
    data = bytes(random.Random(3).getrandbits(8) for _ in range(300_000))
    for piece in (data, memoryview(data)[17:250_001], bytearray(data[:5])):
        assert crc32(piece) == zlib.crc32(piece)
        assert crc32(piece, 0xDEADBEEF) == zlib.crc32(piece, 0xDEADBEEF)


@pytest.mark.parametrize("keep_cache", [True, False])
def test_a_bulk_writer_leaves_the_page_cache_once_durable(tmp_path, keep_cache):
    """A bulk loader's segments (import, migrate) do not stay in the page cache once
    fsynced; serve's do. Either way every record reads back whole."""
    if file_system(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("the page cache is the storage on tmpfs")
    w = SegmentWriter(tmp_path, 5, segment_size=1 << 30, fsync=True, on_commit=lambda rows: None,
                      keep_cache=keep_cache)
    payload = random.Random(7).randbytes(40_000)
    for i in range(50):
        w.append(encode_record({"i": i}, payload, 0), {"i": i})
    w.close()
    (seg,) = tmp_path.glob("005-*.seg")
    resident, pages = resident_pages(seg)
    assert pages > 400
    if keep_cache:  # the writer drops none; the kernel may reclaim a few meanwhile (seen: 2 of 489 in a full run)
        assert resident >= pages * 0.95, f"only {resident} of {pages} pages still cached"
    else:
        assert resident <= 1, f"{resident} of {pages} pages still cached"
    assert [r.header["i"] for r in iter_records(seg)] == list(range(50))
