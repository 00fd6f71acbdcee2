"""Byte mutations for the fuzzer (bench/harness/fuzz.py and fuzz_http.py)."""
from __future__ import annotations

import random
import struct


def mutate(data: bytes, rng: random.Random, rounds: int = 0) -> bytes:
    """A few random edits of the kinds that break parsers: flipped bits, random bytes, a
    length field set to an extreme, a cut, garbage appended, a slice repeated or dropped."""
    b = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        if not b:
            b += rng.randbytes(rng.randint(1, 64))
            continue
        op, i = rng.randrange(8), rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2 and i + 4 <= len(b):
            extreme = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, len(b), len(b) - i, rng.randrange(1 << 32)])
            struct.pack_into(rng.choice([">I", "<I"]), b, i, extreme & 0xFFFFFFFF)
        elif op == 3 and i + 2 <= len(b):
            struct.pack_into(rng.choice([">H", "<H"]), b, i, rng.choice([0, 0xFFFF, rng.randrange(1 << 16)]))
        elif op == 4:
            del b[i:]
        elif op == 5:
            b += rng.randbytes(rng.randint(1, 256))
        elif op == 6:
            j = min(len(b), i + rng.randint(1, 64))
            b[i:i] = b[i:j] * rng.randint(1, 8)
        else:
            del b[i:min(len(b), i + rng.randint(1, 64))]
    return bytes(b)
