"""engine/web/multipart.py's RelatedParser, the STOW-RS body reader: the same parts however
the body is chunked, and a clear error for every way a body can be broken."""
from __future__ import annotations

import random

import pytest

from stowage.engine.web.multipart import MultipartError, RelatedParser

pytestmark = pytest.mark.unit
B = "2f9c-boundary"


def body(parts: list[bytes], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble + b"".join(f"--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
                              for p in parts)
    return out + f"--{B}--\r\n".encode() + epilogue


def parse(data: bytes, sizes) -> list[tuple[dict, bytes]]:
    p, parts, pos = RelatedParser(B), [], 0
    while pos < len(data):
        n = next(sizes)
        for ev in p.feed(data[pos:pos + n]):
            if ev[0] == "start":
                parts.append([ev[1], b""])
            elif ev[0] == "data":
                parts[-1][1] += ev[1]
        pos += n
    p.finish()
    return [(h, d) for h, d in parts]


def test_same_parts_whatever_the_chunking():
    rng = random.Random(7)
    payloads = [bytes(rng.randrange(256) for _ in range(n)) for n in (0, 1, 5000, 20000)]
    payloads.append(f"\r\n-{B} --{B[:-1]} almost delimiters".encode())
    data = body(payloads, preamble=b"ignored preamble\r\n", epilogue=b"ignored epilogue")
    for sizes in ((lambda: iter(lambda: 1, None)), (lambda: iter(lambda: 7, None)),
                  (lambda: iter(lambda: rng.randrange(1, 9000), None)), (lambda: iter(lambda: 1 << 20, None))):
        got = parse(data, sizes())
        assert [d for _h, d in got] == payloads
        assert all(h["content-type"] == "application/dicom" for h, _d in got)


def test_broken_bodies_say_what_is_wrong():
    whole = body([b"abc", b"defg"])
    for data, words in ((whole[:-8], "before its closing boundary (in part 2)"), (b"no boundary here", "first part"),
                        (f"--{B}junk\r\n".encode(), "junk after the boundary"),
                        (f"--{B}\r\nno colon\r\n\r\nx".encode(), "has no name")):
        p = RelatedParser(B)
        with pytest.raises(MultipartError, match=words.replace("(", r"\(").replace(")", r"\)")):
            p.feed(data)
            p.finish()
    with pytest.raises(MultipartError, match="1 to 200"):
        RelatedParser("x" * 201)
    p = RelatedParser(B)
    with pytest.raises(MultipartError, match="16 KB"):
        p.feed(f"--{B}\r\nX-Long: ".encode() + b"a" * (20 << 10))


def test_a_delimiter_cut_anywhere_between_chunks():
    """Parts are handed out as views of the chunks fed: a delimiter (or something that
    starts like one) split across two chunks at every offset still ends its part exactly."""
    payloads = [b"a" * 300 + f"\r\n--{B[:-2]}".encode(), f"\r\n-{B}".encode() * 20, b"\r\n" + b"z" * 999]
    data = body(payloads, preamble=b"pre\r\n")
    for cut in range(1, 400):
        for sizes in (iter(lambda: cut, None), iter([cut, 1, len(data)])):
            assert [d for _h, d in parse(data, sizes)] == payloads, cut
