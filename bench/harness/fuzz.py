"""A fuzzer that can run for hours against a real `stowage serve` (issue #20): mutated
A-ASSOCIATE-RQs, PDUs in orders the association state machine does not expect, P-DATA PDUs
on accepted associations (C-ECHO commands, C-STORE data sets with lying and undefined
lengths, deep sequences, bad VRs and character sets, C-FIND identifiers), damaged Part-10
files for `stowage import` run while it serves, and DICOMweb requests made wrong on the
HTTP port (bench/harness/fuzz_http.py).

    python -m stowage.bench.harness.fuzz --cases 100000 --seed 1 [--work DIR] [--json]
        [--progress] [--keep-going] [--fresh]

It starts its own `stowage serve` (loopback, a free port), warms every path up, and checks,
every `--check-every` cases and at the end: the acceptor and every worker alive (no worker
lost or restarted), no traceback in the server's log or any import's output, the archive
answers a C-ECHO and a QIDO-RS (its HTTP processes unchanged), the good file of every import
batch is stored, each process's file descriptors and threads back near their level after the
warm-up once idle, its resident memory under a ceiling and not still growing over the second
half of a long run, and at the end `stowage verify` clean. It prints what it tried (cases by
kind and outcome) and every violation; exit 1 if any. The suite runs a short fixed-seed
share (tests/test_fuzz.py); docs/fuzzing.md reports the long soak.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pydicom
from pydicom.data import get_testdata_file
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from stowage.bench.harness import damage, fuzz_http
from stowage.bench.harness.mutation import mutate
from stowage.bench.procs import free_port
from stowage.engine.runtime.stop_process import stop_process

HOST = "127.0.0.1"
VERIFICATION, CT_STORAGE = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
CONTEXTS = ((1, VERIFICATION), (3, CT_STORAGE), (5, STUDY_FIND))
KINDS = ("assoc", "sequence", "echo", "store", "find", "import", "http")
# Native thread pools (DuckDB's, Arrow's) grow on demand up to a bound: a soak of 18,000
# cases saw a worker go from 31 to 36 OS threads with the same 5 Python threads (py-spy).
# A thread leaked per association or per request passes this slack within minutes.
_THREAD_SLACK = 16
# Resident memory is not flat from the first case on: the catalog's tails hold the rows stored
# since the last seal (up to seal_max_rows), DuckDB may cache up to its memory_limit (512 MB
# per process), and freed memory stays with the allocator. A leak keeps growing, so: within a
# ceiling over the baseline at every check, and over the second half of a run of 9 checks or
# more no more than the trend bound (a leak of 2 kB a case passes it over the second half of
# 100,000 cases; what the live archive adds there is a few MB).
_RSS_CEILING_MIB = 768
_RSS_TREND_MIB = 64
_REPLY_S = 1.5  # a reply is waited for this long, then the case ends (a stalled PDU is the server's to time out)


# --- building blocks: valid messages, then mutations of them ----------------------------------

def association_request(calling: str = "FUZZER", called: str = "STOWAGE", max_pdu: int = 65536) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = calling, called
    prim.calling_presentation_address = AddressInformation(HOST, 0)
    prim.called_presentation_address = AddressInformation(HOST, 104)
    contexts = []
    for cid, uid in CONTEXTS:
        cx = build_context(uid, [EXPLICIT_LE, IMPLICIT_LE])
        cx.context_id = cid
        contexts.append(cx)
    prim.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    prim.user_information = [length, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def _element(group: int, elem: int, value: bytes) -> bytes:  # implicit VR little endian
    return struct.pack("<HHI", group, elem, len(value)) + value


def _pad(text: str, pad: bytes = b"\x00") -> bytes:
    raw = text.encode()
    return raw + pad if len(raw) % 2 else raw


def command(field: int, sop_class: str, message_id: int, dataset: bool, *extra: bytes) -> bytes:
    body = b"".join((_element(0, 0x0002, _pad(sop_class)), _element(0, 0x0100, struct.pack("<H", field)),
                     _element(0, 0x0110, struct.pack("<H", message_id)), *extra,
                     _element(0, 0x0800, struct.pack("<H", 0x0000 if dataset else 0x0101))))
    return _element(0, 0x0000, struct.pack("<I", len(body))) + body


def pdata(context_id: int, control: int, payload: bytes) -> bytes:
    return struct.pack(">BxIIBB", 4, len(payload) + 6, len(payload) + 2, context_id, control) + payload


def _explicit(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"):
        return struct.pack("<HH2sxxI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


CONTENT_SEQUENCE = (0x0040, 42800)  # (0040,A730) in decimal: test_layering reads 0xA7xx literals as statuses


def _deep_sequence(depth: int, defined: bool) -> bytes:
    """(0040,A730) nested `depth` times, with undefined lengths or defined ones."""
    inner = _explicit(0x0010, 0x0010, b"PN", b"DEEP")
    for _ in range(depth):
        if defined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = struct.pack("<HH2sxxI", *CONTENT_SEQUENCE, b"SQ", len(item)) + item
        else:
            inner = (struct.pack("<HH2sxxI", *CONTENT_SEQUENCE, b"SQ", 0xFFFFFFFF) +
                     struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner +
                     struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return inner


_CHARSETS = [b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87", b"GB18030", b"\\ISO 2022 IR 149", b"NOPE 1",
             b"ISO_IR 6\\ISO_IR 999", b"\xff\xfe"]


def with_uid(base: bytes, sop_instance: str) -> bytes:
    """The data set (explicit VR little endian) with its SOP Instance UID replaced."""
    ds = bytearray(base)
    pos = ds.find(b"\x08\x00\x18\x00UI")
    if pos >= 0:
        (n,) = struct.unpack_from("<H", ds, pos + 6)
        ds[pos:pos + 8 + n] = _explicit(0x0008, 0x0018, b"UI", _pad(sop_instance))
    return bytes(ds)


def dataset_for_store(base: bytes, sop_instance: str, rng: random.Random) -> bytes:
    """A C-STORE data set: the base CT (explicit VR little endian) with its SOP Instance UID
    replaced, and one structural damage: a lying or undefined length, a deep sequence, a
    bad VR, a character set and a name in another one, or byte-level mutation."""
    ds = bytearray(with_uid(base, sop_instance))
    choice = rng.randrange(7)
    head = _explicit(0x0008, 0x0005, b"CS", _pad(rng.choice(_CHARSETS).decode("latin-1"), b" ").ljust(2))
    if choice == 0:  # lying length on a top-level element
        i = rng.randrange(0, max(1, len(ds) - 8))
        struct.pack_into("<H", ds, i + 6, rng.choice([0xFFFF, 0xFFF0, 1]))
    elif choice == 1:  # an undefined length where none may be
        ds[:0] = struct.pack("<HH2sxxI", 0x0008, 0x0001, b"UT", 0xFFFFFFFF)
    elif choice == 2:
        ds += _deep_sequence(rng.choice([10, 70, 300, 1000]), rng.random() < 0.5)
    elif choice == 3:  # a VR that is not one
        i = ds.find(b"\x10\x00\x10\x00PN")
        if i >= 0:
            ds[i + 4:i + 6] = rng.choice([b"ZZ", b"\x00\x00", b"sq", b"SQ", b"OB"])
    elif choice == 4:  # a character set and a name in another
        ds[:0] = head
        i = ds.find(b"\x10\x00\x10\x00PN")
        if i >= 0:
            (n,) = struct.unpack_from("<H", ds, i + 6)
            name = rng.randbytes(rng.choice([2, 8, 30]))
            ds[i:i + 8 + n] = _explicit(0x0010, 0x0010, b"PN", name)
    elif choice == 5:
        return mutate(bytes(ds), rng)
    return bytes(ds)


def find_identifier(rng: random.Random) -> bytes:
    """A C-FIND identifier (implicit VR little endian) with odd values, then maybe mutated."""
    level = rng.choice([b"STUDY ", b"PATIENT ", b"SERIES", b"IMAGE ", b"BOGUS ", b""])
    name = rng.choice([b"*", b"DOE*", b"*a*a*a*a*a*a*a*a*a*b", b"\xe9\xe8*", b"?" * 64, rng.randbytes(16)])
    values = [_element(0x0008, 0x0005, rng.choice(_CHARSETS).ljust(2)[:64]) if rng.random() < 0.3 else b"",
              _element(0x0008, 0x0020, rng.choice([b"20200101-20201231", b"-", b"2020", b"\x00\x00"])),
              _element(0x0008, 0x0052, level), _element(0x0010, 0x0010, name + (b" " if len(name) % 2 else b"")),
              _element(0x0020, 0x000D, rng.choice([b"", b"1.2.3\\4.5.6 ", b"1.2.3\n", b"1" * 80]))]
    data = b"".join(values)
    return mutate(data, rng) if rng.random() < 0.5 else data


def without_abstract_syntax(rq: bytes) -> bytes:
    """The A-ASSOCIATE-RQ with the abstract syntax sub-item of its first presentation
    context cut out (item and PDU lengths kept true)."""
    b = bytearray(rq)
    cx = b.index(b"\x20\x00", 74)
    sub = cx + 8
    assert b[sub] == 0x30
    n = 4 + struct.unpack_from(">H", b, sub + 2)[0]
    del b[sub:sub + n]
    struct.pack_into(">H", b, cx + 2, struct.unpack_from(">H", b, cx + 2)[0] - n)
    struct.pack_into(">I", b, 2, struct.unpack_from(">I", b, 2)[0] - n)
    return bytes(b)


def regressions(rq: bytes) -> list[tuple[str, list[bytes]]]:
    """Inputs that once broke the server (issue #20), sent first in every run: (kind, the
    PDUs after the A-ASSOCIATE-RQ for "echo", or the whole bytes for "assoc")."""
    no_field = _element(0, 0x0002, _pad(VERIFICATION)) + _element(0, 0x0110, struct.pack("<H", 1))
    no_field = _element(0, 0x0000, struct.pack("<I", len(no_field))) + no_field
    return [("assoc", [without_abstract_syntax(rq)]),          # pynetdicom's negotiation raised
            ("echo", [pdata(1, 3, no_field)])]                # no Command Field: the DUL thread raised


# --- talking to the server ----------------------------------------------------------------------

def _read_some(sock: socket.socket, timeout: float = _REPLY_S) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while len(got) < 1 << 16:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            got += chunk
            if len(got) >= 6 and len(got) >= 6 + struct.unpack_from(">I", got, 2)[0]:
                break
    except OSError:
        pass
    return got


def _complete(sent: bytes) -> bool:
    """Whether `sent` is whole PDUs ending in a P-DATA whose last PDV is the last fragment of
    a command or data set, so that the server has a message to answer; else it waits for more."""
    pos, last = 0, None
    while pos < len(sent):
        if pos + 6 > len(sent):
            return False
        end = pos + 6 + struct.unpack_from(">I", sent, pos + 2)[0]
        if end > len(sent):
            return False
        last, pos = sent[pos:end], end
    return last is not None and last[0] == 4 and _last_control(last) & 2 == 2


def _last_control(pdu: bytes) -> int:
    """The message control header of the last PDV in a P-DATA-TF PDU (0 if it has none)."""
    pos, control = 6, 0
    while pos + 6 <= len(pdu):
        n = struct.unpack_from(">I", pdu, pos)[0]
        if n < 2 or pos + 4 + n > len(pdu):
            return 0
        control, pos = pdu[pos + 5], pos + 4 + n
    return control


def _read_all(sock: socket.socket, timeout: float = _REPLY_S) -> bytes:
    """What the server sends until it closes (or `timeout` of silence)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while len(got) < 1 << 20:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    return got


def _outcomes(reply: bytes) -> str:
    """The PDU types of a reply in order, repeats folded: `accepted answered aborted`."""
    seen: list[str] = []
    pos = 0
    while pos + 6 <= len(reply):
        name = _outcome(reply[pos:])
        if not seen or seen[-1] != name:
            seen.append(name)
        pos += 6 + struct.unpack_from(">I", reply, pos + 2)[0]
    if pos != len(reply):
        seen.append("garbage")
    return " ".join(seen) or "closed"


def _outcome(reply: bytes) -> str:
    return {1: "rq?", 2: "accepted", 3: "rejected", 4: "answered", 5: "release-rq", 6: "released",
            7: "aborted"}.get(reply[0], "garbage") if reply else "closed"


class Case:
    def __init__(self, port: int, rng: random.Random, rq: bytes) -> None:
        self.port, self.rng, self.rq = port, rng, rq

    def _connect(self) -> socket.socket:
        return socket.create_connection((HOST, self.port), timeout=10)

    def assoc(self) -> str:
        with self._connect() as s:
            try:
                s.sendall(mutate(self.rq, self.rng))
                s.shutdown(socket.SHUT_WR)  # nothing more comes: the server must not wait for it
            except OSError:  # it closed on what it had read already
                pass
            return _outcome(_read_some(s))

    def _on_association(self, messages: list[bytes]) -> str:
        with self._connect() as s:
            s.sendall(self.rq)
            ac = _read_some(s)
            if not ac or ac[0] != 2:
                return "not accepted: " + _outcome(ac)
            try:
                for m in messages:
                    s.sendall(m)
                if not _complete(b"".join(messages)):  # the server would wait for the rest until its
                    s.shutdown(socket.SHUT_WR)         # network timeout: say nothing more comes
            except OSError:
                return "closed while sending"
            reply = _read_some(s)
            outcome = _outcome(reply)
            if outcome == "answered" and len(reply) >= 12:
                outcome = "answered " + _status(reply)
            try:
                if outcome.startswith("answered"):
                    s.sendall(bytes.fromhex("050000000004") + bytes(4))
                s.shutdown(socket.SHUT_WR)
                _read_some(s, 1.0)
            except OSError:
                pass
            return outcome

    def replay(self, kind: str, messages: list[bytes]) -> str:
        if kind == "echo":
            return self._on_association(messages)
        with self._connect() as s:
            s.sendall(messages[0])
            s.shutdown(socket.SHUT_WR)
            return _outcome(_read_some(s))

    def echo(self) -> str:
        cmd = command(0x0030, VERIFICATION, self.rng.randrange(1, 65535), False)
        return self._on_association([mutate(pdata(1, 3, cmd), self.rng)])

    def store(self, base: bytes) -> str:
        uid = f"2.25.{self.rng.getrandbits(100)}"
        cmd = command(0x0001, CT_STORAGE, 7, True, _element(0, 0x1000, _pad(uid)))
        data = dataset_for_store(base, uid, self.rng)
        return self._on_association([pdata(3, 3, cmd), pdata(3, 2, data)])

    def sequence(self, base: bytes) -> str:
        """1-6 PDUs, each whole and valid on its own, in an order the association state machine
        (PS3.8 9.2) may not expect: P-DATA or a release before the A-ASSOCIATE-RQ, a second
        request, a release answered by a release, a data set without its command, an A-ASSOCIATE-AC
        or -RJ sent to the acceptor, PDU types that do not exist. The server must end each in an
        A-ABORT or a close, never a traceback."""
        rng, uid = self.rng, f"2.25.{self.rng.getrandbits(100)}"
        store_cmd = command(0x0001, CT_STORAGE, 3, True, _element(0, 0x1000, _pad(uid)))
        pdus = {"rq": self.rq, "ac": b"\x02" + self.rq[1:], "rj": bytes.fromhex("03000000000400010101"),
                "echo": pdata(1, 3, command(0x0030, VERIFICATION, 1, False)),
                "store": pdata(3, 3, store_cmd), "data": pdata(3, 2, dataset_for_store(base, uid, rng)),
                "first-fragment": pdata(3, 1, store_cmd[:20]), "wrong-context": pdata(7, 3, store_cmd),
                "release-rq": bytes.fromhex("05000000000400000000"),
                "release-rp": bytes.fromhex("06000000000400000000"),
                "abort": bytes.fromhex("07000000000400000000"),
                "unknown": bytes([rng.choice([0, 8, 9, 0x7F, 0xFF]), 0]) + struct.pack(">I", 4) + bytes(4)}
        names = [rng.choice(list(pdus)) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.6:
            names[0] = "rq"  # mostly on an association, so the later PDUs reach the accepted state
        with self._connect() as s:
            first = b""
            try:
                if names[0] == "rq":  # a P-DATA before the A-ASSOCIATE-AC is an abort (Sta3, AA-8):
                    s.sendall(self.rq)  # wait for the answer, as a requestor does
                    first, names = _read_some(s), names[1:]
                for name in names:
                    s.sendall(pdus[name])
                s.shutdown(socket.SHUT_WR)
            except OSError:
                return _outcomes(first) + " closed while sending"
            return _outcomes(first + _read_all(s))

    def find(self) -> str:
        cmd = command(0x0020, STUDY_FIND, 9, True, _element(0, 0x0700, struct.pack("<H", 0)))
        return self._on_association([pdata(5, 3, cmd), pdata(5, 2, find_identifier(self.rng))])


def _status(reply: bytes) -> str:
    """The Status (0000,0900) of the command set in the first PDV of a P-DATA-TF PDU."""
    pos, end = 12, min(len(reply), 6 + struct.unpack_from(">I", reply, 2)[0]) if len(reply) >= 6 else 0
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHI", reply, pos)
        if (group, elem) == (0, 0x0900) and pos + 10 <= end:
            return f"0x{struct.unpack_from('<H', reply, pos + 8)[0]:04X}"
        pos += 8 + length
    return "?"


# --- the archive under test, and its invariants -----------------------------------------------

@dataclass
class Report:
    cases: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    checks: int = 0
    import_files: int = 0
    seconds: float = 0.0
    workers: dict = field(default_factory=dict)  # pid -> {fds, threads, rss} at start and end
    rss: dict = field(default_factory=dict)  # pid -> resident MiB at the baseline and every check
    uss: dict = field(default_factory=dict)  # pid -> its own (unshared) MiB, the same readings
    anon: dict = field(default_factory=dict)  # pid -> anonymous MiB (heaps, arenas), the same readings
    filter: dict = field(default_factory=dict)  # pid -> MiB of the sealed-UID filter's mapped pages
    fresh: dict = field(default_factory=dict)  # pid -> resident MiB of a fresh server on the same data
    log: str = ""

    def as_dict(self) -> dict:
        return {"cases": dict(self.cases), "total": sum(self.cases.values()), "outcomes": dict(self.outcomes),
                "violations": self.violations, "checks": self.checks, "import_files": self.import_files,
                "seconds": round(self.seconds, 1), "workers": self.workers, "rss_mib": self.rss,
                "uss_mib": self.uss, "anon_mib": self.anon, "filter_mib": self.filter, "fresh_rss_mib": self.fresh, "log": self.log}


def memory(pid: int) -> dict[str, int]:
    """Bytes of a process's memory, from one read of /proc/<pid>/smaps: rss (what the
    kernel counts resident, a shared file's pages once per mapping), uss (its own pages:
    private clean and dirty), anon (anonymous pages: heaps, arenas, stacks; what a leak
    grows) and filter (the sealed-UID filter's mapped pages, file-backed and shared:
    docs/fuzzing.md#memory)."""
    out = dict.fromkeys(("rss", "uss", "anon", "filter"), 0)
    in_filter = False
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            if b"-" in key and b" " in line[:40]:  # a mapping's first line: "start-end perms ..."
                in_filter = line.rstrip().endswith(b"/uids.bloom") or b"/uids.bloom " in line
                continue
            if key == b"Rss":
                kib = int(rest.split()[0]) << 10
                out["rss"] += kib
                if in_filter:
                    out["filter"] += kib
            elif key in (b"Private_Clean", b"Private_Dirty"):
                out["uss"] += int(rest.split()[0]) << 10
            elif key == b"Anonymous":
                out["anon"] += int(rest.split()[0]) << 10
    return out


class Archive:
    """A `stowage serve` of our own on a free loopback port."""

    def __init__(self, work: Path, workers: int, log_name: str = "serve.log") -> None:
        self.work, self.data, self.port, self.http_port = work, work / "data", free_port(), free_port()
        self.log_path = work / log_name
        self.log_read = 0
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(self.data),
                                      "--port", str(self.port), "--bind", HOST, "--workers", str(workers)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, STOWAGE_MAX_ASSOCIATIONS_PER_ADDRESS="0",
                                              STOWAGE_HTTP_PORT=str(self.http_port), STOWAGE_HTTP_PROCESSES="2"))
        deadline = time.monotonic() + 120
        # the HTTP processes start after the DICOM port is served: "DICOMweb on" says they have
        while "listening on" not in self.log() or "DICOMweb on" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stowage serve did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        self.pids, self.http_pids = self.worker_pids(), self.http_processes()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> set[int]:
        return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "stowage.workers.worker" in " ".join(p.cmdline())}

    def http_processes(self) -> set[int]:
        return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "stowage.engine.web.process" in " ".join(p.cmdline())}

    def usage(self) -> dict[int, dict[str, int]]:
        out = {}
        for pid in self.worker_pids() | self.http_processes():
            try:
                p = psutil.Process(pid)
                out[pid] = {"fds": p.num_fds(), "threads": p.num_threads(), **memory(pid)}
            except (psutil.Error, OSError):
                pass
        return out

    def echo(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=10) as s:
            s.sendall(association_request("FUZZCHECK"))
            ac = _read_some(s, 10)
            if not ac or ac[0] != 2:
                return False
            s.sendall(pdata(1, 3, command(0x0030, VERIFICATION, 1, False)))
            rsp = _read_some(s, 10)
            s.sendall(bytes.fromhex("050000000004") + bytes(4))
            _read_some(s, 2)
            return rsp[:1] == b"\x04" and _status(rsp) == "0x0000"

    def stop(self) -> int:
        return stop_process(self.proc, 60, kill_wait=10)


def _import_batch(archive: Archive, folder: Path, good: Path, report: Report) -> None:
    """`stowage import` of a folder of damaged files and one good one, while serving."""
    refused = folder.parent / f"{folder.name}.csv"
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "import", "-q", "--data-dir", str(archive.data),
                        "--report", str(refused), str(folder)], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    if "Traceback" in out or r.returncode not in (0, 1):
        report.violations.append(f"import of {folder} exited {r.returncode}: {out[-2000:]}")
    if refused.exists() and str(good) in refused.read_text(errors="replace"):
        report.violations.append(f"import of {folder}: the undamaged {good.name} was not stored")
    for line in refused.read_text(errors="replace").splitlines()[1:] if refused.exists() else []:
        if line.rstrip().endswith(",") or "no result from an import process" in line:
            report.violations.append(f"import of {folder}: refused without a reason: {line}")
    report.outcomes[f"import exit {r.returncode}"] += 1
    shutil.rmtree(folder, ignore_errors=True)


def check(archive: Archive, report: Report, baseline: dict, final: bool = False) -> None:
    report.checks += 1
    if archive.proc.poll() is not None:
        report.violations.append(f"stowage serve exited {archive.proc.returncode}")
        return
    if archive.worker_pids() != archive.pids:
        report.violations.append(f"workers changed: {sorted(archive.pids)} -> {sorted(archive.worker_pids())}")
        archive.pids = archive.worker_pids()
    whole = archive.log()
    log, archive.log_read = whole[archive.log_read:], len(whole)  # each traceback reported once
    if "Traceback" in log:
        at = max(0, log.index("Traceback") - 300)
        report.violations.append("a traceback in the server's log: " + log[at:at + 3000])
    if not archive.echo():
        report.violations.append("the archive did not answer a C-ECHO")
    if archive.http_processes() != archive.http_pids:
        report.violations.append(f"HTTP processes changed: {sorted(archive.http_pids)} -> "
                                 f"{sorted(archive.http_processes())}")
        archive.http_pids = archive.http_processes()
    if not fuzz_http.answers(archive.http_port):
        report.violations.append("the HTTP port did not answer a QIDO-RS")
    # idle again: file descriptors and threads come back near where they started (an
    # association a case left half-sent ends by network_timeout, 60 s, at the latest)
    deadline = time.monotonic() + 75
    while True:
        usage = archive.usage()
        grown = [f"worker {pid}: {k} {baseline[pid][k]} -> {u[k]}" for pid, u in usage.items() if pid in baseline
                 for k, slack in (("fds", 8), ("threads", _THREAD_SLACK)) if u[k] > baseline[pid][k] + slack]
        if not grown or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    report.violations += grown
    if grown and shutil.which("py-spy"):  # where the extra threads wait, for whoever reads the report
        for pid in {int(g.split()[1].rstrip(":")) for g in grown}:
            dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
            report.violations.append(f"worker {pid} threads:\n{dump.stdout[-6000:]}")
    for pid, u in usage.items():
        series = report.rss.setdefault(str(pid), [baseline[pid]["rss"] >> 20] if pid in baseline else [])
        series.append(u["rss"] >> 20)
        for kind, table in (("uss", report.uss), ("anon", report.anon), ("filter", report.filter)):
            table.setdefault(str(pid), [baseline[pid][kind] >> 20] if pid in baseline else []).append(u[kind] >> 20)
        said = any(v.startswith(f"worker {pid}: resident memory") for v in report.violations)  # once is enough
        if pid in baseline and u["rss"] > baseline[pid]["rss"] + (_RSS_CEILING_MIB << 20) and not said:
            report.violations.append(f"worker {pid}: resident memory {baseline[pid]['rss'] >> 20} -> "
                                     f"{u['rss'] >> 20} MiB")
        half = series[len(series) // 2:]
        start, end = sum(half[:3]) / 3, sum(half[-3:]) / 3  # three checks each: the allocator's ups and downs
        if final and len(series) >= 9 and end - start > _RSS_TREND_MIB:
            report.violations.append(f"worker {pid}: resident memory still growing over the second half of the "
                                     f"run: {start:.0f} -> {end:.0f} MiB (mean of three checks)")
    if final:
        report.workers = {str(pid): {"start": baseline.get(pid), "end": u} for pid, u in usage.items()}


def valid_dimse(archive: Archive, part10: bytes, rq: bytes, i: int) -> None:
    """A well-formed C-STORE (a new SOP Instance UID) and a STUDY-level C-FIND."""
    case = Case(archive.port, random.Random(i), rq)
    uid = f"2.25.{case.rng.getrandbits(100)}"
    data = with_uid(part10[damage.meta_end(part10):], uid)
    case._on_association([pdata(3, 3, command(0x0001, CT_STORAGE, 7, True, _element(0, 0x1000, _pad(uid)))),
                          pdata(3, 2, data)])
    case._on_association([pdata(5, 3, command(0x0020, STUDY_FIND, 9, True, _element(0, 0x0700, bytes(2)))),
                          pdata(5, 2, _element(0x0008, 0x0052, b"STUDY ") + _element(0x0010, 0x0010, b"* "))])


def stow(archive: Archive, part10: bytes, i: int) -> tuple[str, str, str]:
    """A well-formed STOW-RS of `part10` as SOP Instance UID 2.25.<random.Random(i)>; its
    study, series and instance UIDs."""
    ds = pydicom.dcmread(BytesIO(part10))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop = f"2.25.{random.Random(i).getrandbits(100)}"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    body = (b"--w\r\nContent-Type: application/dicom\r\n\r\n" + out.getvalue() + b"\r\n--w--\r\n")
    fuzz_http.exchange(archive.http_port, "POST", f"{fuzz_http.BASE}/studies",
                       f'Content-Type: multipart/related; type="application/dicom"; boundary=w', body)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, sop


def valid_http(archive: Archive, part10: bytes, i: int) -> None:
    """A well-formed STOW-RS (a new SOP Instance UID), then QIDO-RS at each level, WADO-RS
    (instance, study metadata, frames, rendered, thumbnail) and WADO-URI of it."""
    study, series, sop = stow(archive, part10, i)
    instance = f"{fuzz_http.BASE}/studies/{study}/series/{series}/instances/{sop}"
    for target, accept in [(f"{fuzz_http.BASE}/studies?PatientName=*", "application/dicom+json"),
                           (f"{fuzz_http.BASE}/series?limit=5", "application/dicom+json"),
                           (f"{fuzz_http.BASE}/instances?includefield=all", "application/dicom+json"),
                           (f"{fuzz_http.BASE}/studies/{study}/metadata", "application/dicom+json"),
                           (instance, 'multipart/related; type="application/dicom"; transfer-syntax=*'),
                           (f"{instance}/frames/1", 'multipart/related; type="application/octet-stream"'),
                           (f"{instance}/rendered", "image/jpeg"),
                           (f"{fuzz_http.BASE}/studies/{study}/series/{series}/thumbnail", "image/png"),
                           (f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}",
                            "application/dicom")]:
        fuzz_http.exchange(archive.http_port, "GET", target, f"Accept: {accept}")


def warm_up(archive: Archive, part10: bytes, rq: bytes, rounds: int = 12) -> dict[int, dict[str, int]]:
    """Every path the cases reach, taken right, until every worker and HTTP process has served
    some: C-STORE, C-FIND, STOW-RS, QIDO-RS at each level, WADO-RS (instance, metadata, frames,
    rendered, thumbnail), WADO-URI. Their thread pools (the HTTP request pool, DuckDB's and
    Arrow's native ones) start empty and fill on first use, up to a bound; the usage returned,
    the baseline of the invariants, is after that, so growth past it is a leak."""
    http_start = {pid: u["threads"] for pid, u in archive.usage().items() if pid in archive.http_pids}

    with ThreadPoolExecutor(8) as pool:
        for r in range(rounds):  # at once, so that each process gets some
            list(pool.map(lambda i: (valid_dimse(archive, part10, rq, i), valid_http(archive, part10, i)),
                          range(r * 8, r * 8 + 8)))
            usage = archive.usage()
            if r >= 2 and all(usage.get(pid, {}).get("threads", 0) > n for pid, n in http_start.items()):
                break
    time.sleep(1.0)  # the last associations' threads end
    return archive.usage()


def run(cases: int, seed: int, work: Path, workers: int = 2, check_every: int = 500, import_every: int = 100,
        parallel: int = 4, progress: bool = False, fresh: bool = False, keep_going: bool = False,
        weights: tuple[int, ...] = (25, 15, 15, 25, 15, 10, 20)) -> Report:
    """`cases` cases in rounds of `check_every` (each round on `parallel` threads, then the
    damaged files of the round imported once `import_every` have gathered, then the
    invariants checked). Case i draws from its own random.Random(f"{seed}-{i}"), so a case
    is made again from the seed and its number whatever the threads did."""
    report = Report()
    started = time.monotonic()
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    mr = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    base = ct[damage.meta_end(ct):]
    rq = association_request()
    archive = Archive(work, workers)
    report.log = str(archive.log_path)
    batch = work / "import"

    def one(i: int) -> tuple[str, str]:
        rng = random.Random(f"{seed}-{i}")
        kind = rng.choices(KINDS, weights)[0]
        if kind == "import":
            name, damaged = _damaged_file(ct if rng.random() < 0.7 else mr, rng)
            (batch / f"{i:08d}-{name}.dcm").write_bytes(damaged)
            return kind, "file"
        if kind == "http":
            try:
                return kind, fuzz_http.case(archive.http_port, rng, ct)
            except OSError as e:
                return kind, f"connect failed: {e.strerror or e}"
        case = Case(archive.port, rng, rq)
        try:
            return kind, case.assoc() if kind == "assoc" else case.echo() if kind == "echo" else \
                case.store(base) if kind == "store" else case.sequence(base) if kind == "sequence" else case.find()
        except OSError as e:
            return kind, f"connect failed: {e.strerror or e}"

    try:
        baseline = warm_up(archive, ct, rq)
        for req in fuzz_http.regressions(ct):
            report.outcomes[f"regression http: {fuzz_http.replay(archive.http_port, req)}"] += 1
        for kind, messages in regressions(rq):
            report.outcomes[f"regression {kind}: {Case(archive.port, random.Random(seed), rq).replay(kind, messages)}"] += 1
        pending = 0
        with ThreadPoolExecutor(parallel) as pool:
            for start in range(0, cases, check_every):
                if not batch.exists():
                    batch.mkdir()
                for kind, outcome in pool.map(one, range(start, min(cases, start + check_every))):
                    report.cases[kind] += 1
                    report.outcomes[f"{kind}: {outcome}"] += 1
                    pending += kind == "import"
                if pending >= import_every or (start + check_every >= cases and pending):
                    report.import_files += pending
                    _import_batch(archive, batch, _good_copy(batch, ct), report)
                    pending = 0
                check(archive, report, baseline, final=start + check_every >= cases)
                if progress:
                    _progress(report, archive, min(cases, start + check_every), time.monotonic() - started)
                if report.violations and (not keep_going or archive.proc.poll() is not None):
                    break
    finally:
        code = archive.stop()
        if code != 0:
            report.violations.append(f"stowage serve exited {code} on SIGTERM")
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "verify", "--data-dir", str(archive.data)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        report.violations.append(f"stowage verify: {(r.stdout + r.stderr)[-2000:]}")
    if fresh:  # what the live archive costs: a new server on the same data, warmed up the same way
        again = Archive(work, workers, "serve-fresh.log")
        try:
            report.fresh = {str(pid): u["rss"] >> 20 for pid, u in warm_up(again, ct, rq).items()}
        finally:
            again.stop()
    report.seconds = time.monotonic() - started
    return report


def _progress(report: Report, archive: Archive, done: int, seconds: float) -> None:
    """One line on stderr per check: cases so far, their rate, each process's descriptors,
    threads and resident memory (what a soak's report quotes)."""
    usage = " ".join(f"{pid}:{u['fds']}fd/{u['threads']}th/{u['rss'] >> 20}MiB/uss{u['uss'] >> 20}"
                     f"/anon{u['anon'] >> 20}" for pid, u in sorted(archive.usage().items()))
    print(f"{done} cases {seconds:.0f} s ({done / max(seconds, 1):.0f}/s) checks {report.checks} "
          f"violations {len(report.violations)} | {usage}", file=sys.stderr, flush=True)


def _good_copy(folder: Path, part10: bytes) -> Path:
    """An undamaged file with a fresh SOP Instance UID, beside the damaged ones."""
    ds = pydicom.dcmread(BytesIO(part10))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = folder / "good.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _damaged_file(src: bytes, rng: random.Random) -> tuple[str, bytes]:
    kinds = {**damage.BAD, **damage.MAYBE, **damage.GOOD}
    name = rng.choice([*kinds, "mutated"])
    if name == "mutated":
        return name, src[:132] + mutate(src[132:], rng, rng.randint(1, 6))
    return name, kinds[name](src, rng)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=6, help="cases run at once")
    ap.add_argument("--check-every", type=int, default=500)
    ap.add_argument("--import-every", type=int, default=100, help="damaged files per `stowage import` run")
    ap.add_argument("--work", type=Path, help="where the archive and files go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--progress", action="store_true", help="a line on stderr at every check")
    ap.add_argument("--keep-going", action="store_true", help="go on after a violation (while the server lives)")
    ap.add_argument("--fresh", action="store_true",
                    help="at the end, the resident memory of a new server on the same data, for comparison")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="stowage-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    report = run(args.cases, args.seed, work, args.workers, args.check_every, args.import_every, args.parallel,
                 args.progress, args.fresh, args.keep_going)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        d = report.as_dict()
        print(f"{d['total']} cases in {d['seconds']} s (seed {args.seed}): {d['cases']}; "
              f"{d['import_files']} damaged files imported; {d['checks']} invariant checks")
        for outcome, n in sorted(report.outcomes.items()):
            print(f"  {n:8d}  {outcome}")
        for v in report.violations:
            print("VIOLATION:", v)
        print("server log:", report.log)
    if not (args.keep or args.work) and not report.violations:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
