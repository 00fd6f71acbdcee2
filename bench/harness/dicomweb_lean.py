"""A lean WADO-RS retrieval client, so that a benchmark measures the server and not its
client: the body is read into one reused buffer (http.client's `readinto`, which takes
both Content-Length and chunked bodies) instead of being gathered into one 263 MB bytes
object as `resp.read()` does (its page faults and copies cost the client about as much
CPU per MB as the server spends). What it checks is what a user's client relies on: status
200, the multipart type, every part delimited (`--boundary` counted, `n + 1` of them with
the closing one), the body ending with the close delimiter and as long as it said.

`run_lean(target, series, clients, pid)` runs `clients` processes, each retrieving every
series of `series` once (so `clients > 1` asks for the same series concurrently: the
server's processes and threads, not one client, are what is measured), and returns the
usual RunResult with the clients' own CPU in `sender_cpu_s`.
"""
from __future__ import annotations

import http.client
from functools import partial

from stowage.bench.dicomweb import RETRIEVE_ACCEPT as ACCEPT, BadAnswer, WebTarget, _run, get_share
_BUFFER = 1 << 20


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip('"').encode()
    raise BadAnswer(f"no boundary in Content-Type {content_type!r}")


def read_parts(resp: http.client.HTTPResponse, buf: bytearray) -> tuple[int, int]:
    """(bytes, delimiters seen) of a multipart body read into `buf` chunk by chunk; a
    delimiter split across two chunks is found in the seam kept from the previous one."""
    ctype = resp.getheader("Content-Type") or ""
    if not ctype.lower().startswith("multipart/related"):
        raise BadAnswer(f"Content-Type {ctype!r}, not multipart/related")
    delim = b"--" + _boundary(ctype)
    view, seam = memoryview(buf), b""
    total = found = 0
    last = b""
    while True:
        n = resp.readinto(view)
        if not n:
            break
        total += n
        head = seam + bytes(view[:min(n, len(delim) - 1)])  # a delimiter across the seam
        found += head.count(delim)
        at = buf.find(delim, 0, n)
        while at >= 0:
            found += 1
            at = buf.find(delim, at + len(delim), n)
        seam = (seam + bytes(view[max(0, n - len(delim) + 1):n]))[-(len(delim) - 1):]
        last = (last + bytes(view[max(0, n - len(delim) - 4):n]))[-(len(delim) + 4):]
    if not last.rstrip(b"\r\n").endswith(delim + b"--"):
        raise BadAnswer("the body does not end with the close delimiter")
    return total, found


class PartsReader:
    """The lean client's fetch (bench/dicomweb.py get_share): the body read into one buffer
    allocated once per client process, its parts counted against the series' instances."""

    def __init__(self) -> None:
        self.buf = bytearray(_BUFFER)

    def __call__(self, resp: http.client.HTTPResponse, series: str, instances: int) -> int:
        nbytes, delimiters = read_parts(resp, self.buf)
        if delimiters != instances + 1:
            raise BadAnswer(f"{delimiters - 1} parts for the {instances} instances of series {series}")
        return nbytes


def run_lean(target: WebTarget, series: list[tuple[str, str, int]], clients: int, nbytes: int,
             pid: int | None = None):
    """Every series retrieved as stored by each of `clients` processes at once."""
    instances = sum(n for _s, _u, n in series)
    return _run(target, "retrieve (lean)", [series] * clients, partial(get_share, accept=ACCEPT, reader=PartsReader),
                instances * clients, nbytes * clients, pid)
