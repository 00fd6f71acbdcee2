"""The HTTP surface for the fuzzer (bench/harness/fuzz.py, issue #20): DICOMweb requests
(QIDO-RS, WADO-RS, STOW-RS, DELETE, WADO-URI) made wrong on purpose, written as raw bytes
on a socket so that nothing between us and the server tidies them: mutated query keys and
values, UIDs that are not UIDs and paths that climb out (`..`, `%2e%2e`, `//`), STOW-RS
bodies with broken boundaries and parts, lying Content-Lengths, bodies that stop, request
lines and headers that are not HTTP. A case's outcome is the status line's code, or how
the connection ended."""
from __future__ import annotations

import random
import socket

from stowage.bench.harness.mutation import mutate

HOST = "127.0.0.1"
BASE = "/dicom-web"
_REPLY_S = 1.5

_UIDS = ("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "..", "%2e%2e", "1.2.ab", "1" * 200, "", "1.2.3%00", "1.2..3",
         "../../etc/passwd", "%2F..%2F..%2Fetc", "*", "1.2.3;rm")
_KEYS = ("PatientName", "PatientID", "StudyDate", "00100010", "0020000D", "ModalitiesInStudy", "includefield",
         "limit", "offset", "fuzzymatching", "NoSuchKey", "0010,0010", "", "SequenceKey.Sub", "00081030.00100010")
_VALUES = ("DOE*", "*", "?", "20200101-", "-", "20201301", "all", "-1", "999999999999", "abc", "true", "\\\\",
           "%ZZ", "a" * 5000, "=", "1.2.3,1.2.4", "\u00e9", "%00")
_ACCEPTS = ("application/dicom+json", 'multipart/related; type="application/dicom"; transfer-syntax=*',
            'multipart/related; type="application/octet-stream"', "image/jpeg", "image/png", "text/html",
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50', "*/*", "")


def _path(rng: random.Random) -> str:
    uid = lambda: rng.choice(_UIDS)  # noqa: E731 - a fresh choice each time
    return rng.choice([
        f"{BASE}/studies", f"{BASE}/series", f"{BASE}/instances", f"{BASE}/studies/{uid()}",
        f"{BASE}/studies/{uid()}/series", f"{BASE}/studies/{uid()}/series/{uid()}/instances",
        f"{BASE}/studies/{uid()}/metadata", f"{BASE}/studies/{uid()}/series/{uid()}/metadata",
        f"{BASE}/studies/{uid()}/series/{uid()}/instances/{uid()}",
        f"{BASE}/studies/{uid()}/series/{uid()}/instances/{uid()}/frames/{rng.choice(['1', '0', '1,2', 'x', '-1'])}",
        f"{BASE}/studies/{uid()}/series/{uid()}/instances/{uid()}/rendered",
        f"{BASE}/studies/{uid()}/series/{uid()}/thumbnail", f"{BASE}/studies/{uid()}/bulkdata/{uid()}",
        f"/wado?requestType=WADO&studyUID={uid()}&seriesUID={uid()}&objectUID={uid()}",
        "/", "/dashboard/panels", "/viewer", f"/{uid()}", "//" + uid(), f"{BASE}/../../{uid()}",
    ])


def _query(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return ""
    pairs = [f"{rng.choice(_KEYS)}={rng.choice(_VALUES)}" for _ in range(rng.randint(1, 5))]
    return "?" + "&".join(pairs)


def _stow_body(rng: random.Random, part10: bytes) -> tuple[bytes, str]:
    boundary = rng.choice(["fuzz", "x" * 71, "", "a b", "--", "0123456789"])
    part = part10 if rng.random() < 0.5 else mutate(part10, rng, rng.randint(1, 4))
    body = (b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part
            + b"\r\n--" + boundary.encode() + b"--\r\n")
    if rng.random() < 0.5:
        body = mutate(body[:4096], rng, rng.randint(1, 6)) + body[4096:]
    content_type = rng.choice([f'multipart/related; type="application/dicom"; boundary={boundary}',
                               f"multipart/related; boundary={boundary}", "application/dicom", "multipart/related",
                               'multipart/related; type="application/dicom+xml"; boundary=b', "text/plain"])
    return body, content_type


def request(rng: random.Random, part10: bytes) -> bytes:
    """One HTTP request, wrong in one or several ways (or, now and then, right)."""
    if rng.random() < 0.08:  # not HTTP at all
        return mutate(b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n\r\n", rng, rng.randint(1, 8))
    method = rng.choice(["GET"] * 6 + ["POST", "POST", "DELETE", "PUT", "OPTIONS", "HEAD", "BREW"])
    target = _path(rng) + _query(rng)
    host = HOST if rng.random() < 0.9 else rng.choice(["", "x" * 300, "[::1", "a b", "\udcfb", "h\u00e9", "1:2:3"])
    headers = [f"Host: {host}", f"Accept: {rng.choice(_ACCEPTS)}"]
    body = b""
    if method == "POST":
        target = rng.choice([f"{BASE}/studies", f"{BASE}/studies/{rng.choice(_UIDS)}", f"{BASE}/studies/1.2.3/series"])
        body, content_type = _stow_body(rng, part10)
        headers.append(f"Content-Type: {content_type}")
    length = len(body)
    if body and rng.random() < 0.3:  # a Content-Length that lies, or none, or a body cut short
        length = rng.choice([length + rng.randint(1, 1 << 20), max(0, length - rng.randint(1, 100)), 1 << 40])
        if rng.random() < 0.5:
            body = body[:rng.randint(0, len(body))]
    if method == "POST" or rng.random() < 0.1:
        headers.append(f"Content-Length: {length}")
    if rng.random() < 0.2:
        headers.append(rng.choice(["Authorization: Bearer " + "x" * rng.randint(0, 300), "Authorization: Basic Og==",
                                   "Transfer-Encoding: chunked", "Range: bytes=0-10", "Expect: 100-continue",
                                   "X-" + "a" * 9000 + ": b", "Content-Type: " + "\u00ff" * 10]))
    head = f"{method} {target} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\nConnection: close\r\n\r\n"
    return head.encode("utf-8", "surrogateescape") + body


def regressions(part10: bytes) -> list[bytes]:
    """Requests that once broke the server (issue #20), sent first in every run, after the
    warm-up has stored studies for them to find."""
    nul_charset = part10.replace(b"ISO_IR 100", b"IS\x00\x00\x0e* 100", 1)  # codecs.lookup raised ValueError
    body = b"--r\r\nContent-Type: application/dicom\r\n\r\n" + nul_charset + b"\r\n--r--\r\n"
    return [b"GET /dicom-web/studies?limit=2 HTTP/1.1\r\nHost: x\xfb\r\nAccept: application/dicom+json\r\n"
            b"Connection: close\r\n\r\n",  # a Host byte aiohttp keeps as a surrogate: the Retrieve URLs raised
            f"POST {BASE}/studies HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: multipart/related; "
            f'type="application/dicom"; boundary=r\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n'
            .encode() + body]


def replay(port: int, req: bytes) -> str:
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(req)
        return _status(_read_some(s, 10))


def _status(reply: bytes) -> str:
    if reply.startswith(b"HTTP/1.") and len(reply) >= 12:
        return f"status {reply[9:12].decode('ascii', 'replace')}"
    return "closed without an answer" if not reply else "answered, not HTTP"


def case(port: int, rng: random.Random, part10: bytes) -> str:
    """Send one fuzzed request; the outcome as `status NNN`, or how the connection ended."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        req = request(rng, part10)
        try:  # no half-close: aiohttp takes it for a client gone and answers nothing...
            s.sendall(req)
            if _waits_for_more(req):  # ...which is all it could do here, after waiting for bytes that never come
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reply = _read_some(s)
    return _status(reply)


def _waits_for_more(req: bytes) -> bool:
    """Whether a server would wait for more of `req`: a Content-Length beyond the body sent,
    or a chunked body (which the fuzzer never ends properly). A head without its end may be
    answered 400 on what it has, so that one is waited for."""
    head, sep, body = req.partition(b"\r\n\r\n")
    if not sep:
        return False
    lines = head.lower().split(b"\r\n")
    if b"transfer-encoding: chunked" in lines:
        return True
    for line in lines:
        if line.startswith(b"content-length:"):
            value = line.split(b":", 1)[1].strip()
            return value.isdigit() and int(value) > len(body)
    return False


def exchange(port: int, method: str, target: str, header: str, body: bytes = b"") -> bytes:
    """One well-formed request (`header` one extra header line); the start of the answer."""
    head = (f"{method} {target} HTTP/1.1\r\nHost: {HOST}\r\n{header}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(head.encode() + body)
        return _read_some(s, 10)


def answers(port: int) -> bool:
    """Whether a plain QIDO-RS is answered (200, or 204 on an empty archive)."""
    try:
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.sendall(f"GET {BASE}/studies?limit=1 HTTP/1.1\r\nHost: {HOST}\r\nAccept: application/dicom+json\r\n"
                      "Connection: close\r\n\r\n".encode())
            reply = _read_some(s, 10)
    except OSError:
        return False
    return reply[:12] in (b"HTTP/1.1 200", b"HTTP/1.1 204")


def _read_some(sock: socket.socket, timeout: float = _REPLY_S) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while len(got) < 1 << 16:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    return got
