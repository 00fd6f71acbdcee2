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
import time
from collections import Counter

from stowage.bench.dicomweb import WebTarget, _run

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_BUFFER = 1 << 20


class BadAnswer(Exception):
    """The answer is not the multipart body a retrieve should give; the message says how."""


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


def _share(target: WebTarget, series: list[tuple[str, str, int]], go, results) -> None:
    conn = target.connection()
    buf = bytearray(_BUFFER)
    statuses: Counter = Counter()
    latencies, received, errors = [], 0, []
    go.wait()
    cpu0, start = time.process_time(), time.monotonic()
    for study, uid, n in series:
        t = time.monotonic()
        try:
            conn.request("GET", target.path(f"/studies/{study}/series/{uid}"), headers=target.headers(Accept=ACCEPT))
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                statuses[f"HTTP {resp.status}"] += n
                continue
            nbytes, delimiters = read_parts(resp, buf)
            if delimiters != n + 1:
                raise BadAnswer(f"{delimiters - 1} parts for the {n} instances of series {uid}")
        except (OSError, http.client.HTTPException, BadAnswer) as e:
            errors.append(f"{type(e).__name__}: {e}")
            statuses["not received: " + type(e).__name__] += n
            conn.close()
            conn = target.connection()
            continue
        latencies.append(time.monotonic() - t)
        statuses["0x0000"] += n
        received += nbytes
    results.put({"start": start, "end": time.monotonic(), "statuses": dict(statuses), "errors": errors,
                 "latencies": latencies, "bytes": received, "cpu": time.process_time() - cpu0})


def run_lean(target: WebTarget, series: list[tuple[str, str, int]], clients: int, nbytes: int,
             pid: int | None = None):
    """Every series retrieved as stored by each of `clients` processes at once."""
    instances = sum(n for _s, _u, n in series)
    return _run(target, "retrieve (lean)", [series] * clients, _share, instances * clients, nbytes * clients, pid)
