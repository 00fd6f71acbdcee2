"""What the archive does with bad input: datasets that do not identify themselves as the
request says, malformed or oversized PDUs, stalled peers, a full disk, the association
cap, and a worker killed mid-service. Every check is one an operator would make: the
status and Error Comment a sender sees, what `stowage export` returns afterwards, that
the server still answers, and that no worker process died or bloated."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       MaximumLengthNotification)
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from conftest import HOST, catalog_sealed, dataset_bytes, dcmtk, echo_ok, export_all, wait_for

CT = Path(get_testdata_file("CT_small.dcm"))
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
A_ABORT, A_ASSOCIATE_RJ = 0x07, 0x03


# -- helpers ---------------------------------------------------------------------------

def part10(path: Path, *, meta_class: str | None = None, meta_instance: str | None = None,
           drop: tuple[str, ...] = (), pixels: bytes | None = None) -> Path:
    """A copy of CT_small with fresh UIDs, written as a Part-10 file whose file meta may
    deliberately disagree with its dataset (the C-STORE request is built from the meta)."""
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    if pixels is not None:
        ds.Rows = ds.Columns = int((len(pixels) // 2) ** 0.5)
        ds.PixelData = pixels
    for keyword in drop:
        delattr(ds, keyword)
    ds.file_meta.MediaStorageSOPClassUID = meta_class or ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = meta_instance or ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)  # True would "fix" the meta from the dataset
    back = pydicom.dcmread(path, stop_before_pixels=True)
    assert back.file_meta.MediaStorageSOPClassUID == ds.file_meta.MediaStorageSOPClassUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    return path


def request_uid(path: Path) -> str:
    """The SOP Instance UID a C-STORE of this file announces (from its file meta)."""
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID


def scu(aet: str = "BADINPUT", timeout: float = 10.0) -> AE:
    ae = AE(aet)
    ae.add_requested_context(CT_STORAGE, [EXPLICIT_LE])
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    return ae


def store_file(ae: AE, port: int, path: Path):
    """One association, one C-STORE of the file's raw bytes, release; the response."""
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established, "association refused"
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def exported(data_dir: Path, out: Path) -> dict[str, Path]:
    r = export_all(data_dir, out)
    assert r.returncode == 0, r.stderr
    return {p.stem: p for p in out.glob("*.dcm")}


def associate_rq(port: int, called: str = "STOWAGE", max_pdu: int = 16384,
                 abstract: str = CT_STORAGE) -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU (Verification and CT Image Storage, or `abstract`), as bytes."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "RAWSCU"
    prim.called_ae_title = called
    prim.calling_presentation_address = AddressInformation(HOST, 0)
    prim.called_presentation_address = AddressInformation(HOST, port)
    contexts = []
    for i, uid in enumerate((VERIFICATION, abstract)):
        cx = build_context(uid, ["1.2.840.10008.1.2", EXPLICIT_LE])
        cx.context_id = 2 * i + 1
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


def raw_connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=5)


def _received(sock: socket.socket, timeout: float, still_waiting: Callable[[], str]) -> Iterator[bytes]:
    """What the server sends, chunk by chunk, ending with b"" when it closes the connection
    (a reset raises ConnectionResetError); TimeoutError, saying `still_waiting()`, if it
    has not closed within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(still_waiting())
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        yield chunk
        if not chunk:
            return


def read_pdu_or_close(sock: socket.socket, timeout: float) -> bytes:
    """The first whole PDU the server sends, or b"" if it closes (or resets) first.
    Raises TimeoutError if it does neither within `timeout` seconds."""
    buf = b""
    try:
        for chunk in _received(sock, timeout, lambda: f"no PDU and no close within {timeout}s (got {buf[:16].hex()})"):
            if not chunk:
                return b"" if len(buf) < 6 else buf
            buf += chunk
            if len(buf) >= 6 and len(buf) >= 6 + int.from_bytes(buf[2:6], "big"):
                return buf[: 6 + int.from_bytes(buf[2:6], "big")]
    except ConnectionResetError:
        return b""


def wait_closed(sock: socket.socket, timeout: float) -> None:
    """Until the server closes the connection (whatever it sends first is read and
    dropped); raises TimeoutError if it is still open after `timeout` (a bound)."""
    try:
        for _chunk in _received(sock, timeout, lambda: f"connection still open after {timeout}s"):
            pass
    except ConnectionResetError:
        pass


def logged_about(server, local_port: int, *words: str) -> str:
    """The server's log line about our connection from `local_port` that holds `words`
    (waited for, bounded: a worker logs a moment after it closes)."""
    def line():
        return next((x for x in server.log().splitlines()
                     if f"{HOST}:{local_port}" in x and all(w in x for w in words)), None)
    return wait_for(line, 10, lambda: f"a log line about {HOST}:{local_port} saying {words}:\n{server.log()[-3000:]}")


def assert_abort_or_close(reply: bytes) -> None:
    assert reply == b"" or reply[0] == A_ABORT, f"expected A-ABORT or close, got {reply[:16].hex()}"
    if reply:
        assert len(reply) == 10 and reply[2:6] == b"\x00\x00\x00\x04", reply.hex()


def assert_slots_come_back(ae: AE, port: int, n: int, timeout: float, address: str = HOST) -> None:
    """`n` associations at once from `address` fit (bounded retries): every slot a bad
    connection took came back."""
    deadline = time.monotonic() + timeout
    while True:
        more = [ae.associate(HOST, port, ae_title="STOWAGE", bind_address=(address, 0)) for _ in range(n)]
        established = sum(a.is_established for a in more)
        for a in more:
            if a.is_established:
                a.release()
        if established == n:
            return
        assert time.monotonic() < deadline, f"only {established} of {n} slots of {address} came back"
        time.sleep(0.5)


def worker_pids(server) -> set[int]:
    return {p.pid for p in server.workers()}


def workers_rss(server) -> int:
    return sum(p.memory_info().rss for p in server.workers())


# -- 1. datasets that do not identify themselves as the request says --------------------

def test_mismatched_or_unidentified_datasets_are_refused(server, tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes, meta's UIDs
    d = tmp_path / "in"
    wrong_class = d / "wrong-class.dcm"
    part10(wrong_class, meta_class=CT_STORAGE)
    ds = pydicom.dcmread(wrong_class)
    ds.SOPClassUID = MR_STORAGE  # the dataset says MR; its file meta (the request) says CT
    ds.save_as(wrong_class, enforce_file_format=False)
    assert pydicom.dcmread(wrong_class).file_meta.MediaStorageSOPClassUID == CT_STORAGE
    cases = [  # (file, expected status, words the Error Comment must contain)
        (wrong_class, 0xA900, ("SOP Class",)),
        (part10(d / "wrong-instance.dcm", meta_instance=pydicom.uid.generate_uid()), 0xC000, ("SOP Instance",)),
        (part10(d / "no-study.dcm", drop=("StudyInstanceUID",)), 0xC000, ("Study Instance UID",)),
        (part10(d / "no-series.dcm", drop=("SeriesInstanceUID",)), 0xC000, ("Series Instance UID",)),
    ]
    good = part10(d / "good.dcm")
    ae = scu()
    for path, expected, words in cases:
        status = store_file(ae, server.port, path)
        assert "Status" in status, f"{path.name}: no C-STORE response"
        assert status.Status == expected, f"{path.name}: 0x{status.Status:04X} {status.get('ErrorComment')}"
        comment = str(status.get("ErrorComment") or "")
        assert comment.strip(), f"{path.name}: refused without an Error Comment"
        for w in words:
            assert w in comment, f"{path.name}: Error Comment {comment!r} does not mention {w!r}"
    status = store_file(ae, server.port, good)  # a control: the same path does store
    assert status.Status == 0x0000

    got = exported(server.data_dir, tmp_path / "out")
    refused_uids = {request_uid(p) for p, *_ in cases} | {pydicom.dcmread(p).SOPInstanceUID for p, *_ in cases}
    assert not refused_uids & set(got), "a refused dataset was exported"
    assert set(got) == {request_uid(good)}
    assert dataset_bytes(got[request_uid(good)]) == dataset_bytes(good)


# -- 2. malformed PDUs -----------------------------------------------------------------

BAD_FIRST_PDUS = {
    "unknown PDU type 0x0A": bytes([0x0A, 0, 0, 0, 0, 32]) + os.urandom(32),
    "unknown PDU type 0xFF, short body": bytes([0xFF, 0, 0, 0, 0, 4]) + b"junk",
    "A-ASSOCIATE-RQ with a garbage body": bytes([0x01, 0, 0, 0, 0, 200]) + os.urandom(200),
    "A-ASSOCIATE-RQ shorter than its fixed fields": bytes([0x01, 0, 0, 0, 0, 8]) + b"\x00\x01" + b"\xff" * 6,
    "P-DATA-TF before any association": bytes([0x04, 0, 0, 0, 0, 6]) + b"\x00\x00\x00\x02\x01\x03",
}


def test_malformed_pdus_are_aborted_and_harm_nobody(make_server, tmp_path):
    # Cap 8 = the association held below + 7: every slot a bad connection took must come
    # back promptly (well within the 30 s ACSE timeout a lingering association would wait).
    server = make_server("--workers", "2", STOWAGE_MAX_ASSOCIATIONS="8")
    before = worker_pids(server)
    assert len(before) == 2
    files = [part10(tmp_path / "in" / f"ct-{i}.dcm") for i in range(4)]
    ae = scu(timeout=120)  # the held association idles while the bad peers are served
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")  # opened before the bad peers
    assert assoc.is_established
    try:
        assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
        for name, pdu in BAD_FIRST_PDUS.items():
            with raw_connect(server.port) as s:
                s.sendall(pdu)
                try:
                    assert_abort_or_close(read_pdu_or_close(s, timeout=15))
                    wait_closed(s, timeout=15)
                except (TimeoutError, AssertionError) as e:
                    pytest.fail(f"{name}: {e}")
        with raw_connect(server.port) as s:  # an unknown PDU type inside an association
            s.sendall(associate_rq(server.port))
            ac = read_pdu_or_close(s, timeout=10)
            assert ac and ac[0] == 0x02, f"expected A-ASSOCIATE-AC, got {ac[:16].hex()}"
            s.sendall(bytes([0x0B, 0, 0, 0, 0, 3]) + b"abc")
            assert_abort_or_close(read_pdu_or_close(s, timeout=15))
            wait_closed(s, timeout=15)
        for f in files[1:]:  # the association opened earlier still stores
            status = assoc.send_c_store(pydicom.dcmread(f))
            assert status and status.Status == 0, f"{f.name}: {status}"
        assert_slots_come_back(ae, server.port, 7, timeout=10)  # 7 fit beside the held one
    finally:
        assoc.release()
    assert worker_pids(server) == before, "a worker died on a malformed PDU"
    assert echo_ok(server.port)
    got = exported(server.data_dir, tmp_path / "out")
    assert set(got) == {request_uid(f) for f in files}


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # served on the pynetdicom path, not the lean one
FOLLOW_UPS = [bytes([0x0B, 0, 0, 0, 0, 3]) + b"abc", bytes([0x07, 0, 0, 0, 0, 4]) + bytes(4),
              bytes([0x05, 0, 0, 0, 0, 4]) + bytes(4), bytes([0x06, 0, 0, 0, 0, 4]) + bytes(4),
              bytes([0x04, 0, 0, 0, 0, 6]) + b"\x00\x00\x00\x02\x01\x03"]


def test_pdus_racing_the_association_answer_leave_no_traceback(make_server):
    """A-ASSOCIATE-RQ followed at once by junk, an A-ABORT, a second RQ or a release: the
    bad PDU moves the association to Sta13 before our accept goes out. pynetdicom then
    raised InvalidEventError ('Evt7' in 'Sta13') in the DUL thread, a traceback in the log."""
    import random
    server = make_server("--workers", "2", STOWAGE_MAX_ASSOCIATIONS="8")
    before = worker_pids(server)
    rq = associate_rq(server.port, abstract=STUDY_ROOT_FIND)
    rng = random.Random(2)
    for _ in range(150):
        data = rq + b"".join(rng.choice(FOLLOW_UPS) for _ in range(rng.randint(1, 3)))
        with raw_connect(server.port) as s:
            s.sendall(data)
            read_pdu_or_close(s, timeout=5)
    assert "Traceback" not in server.log(), server.log()[-3000:]
    assert worker_pids(server) == before
    assert_slots_come_back(scu(timeout=10), server.port, 8, timeout=20)  # the whole cap


# -- 3. a peer that stalls mid-PDU ------------------------------------------------------

def test_peer_stalled_mid_pdu_is_dropped(make_server):
    """A peer that stops sending mid-PDU is dropped for the network timeout (2 s here),
    before and once associated, and the log says so; a peer that only pauses mid-PDU for
    less than that is served."""
    server = make_server("--workers", "2", STOWAGE_NETWORK_TIMEOUT="2")
    before = worker_pids(server)
    rq = associate_rq(server.port)
    release_rq = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
    # A PDU that arrives in pieces, a quarter of the timeout apart, is read whole: the pauses
    # are the behaviour under test (a slow peer), not waits for anything.
    with raw_connect(server.port) as s:
        s.sendall(rq[:10])
        time.sleep(0.5)
        s.sendall(rq[10:])
        ac = read_pdu_or_close(s, timeout=10)
        assert ac and ac[0] == 0x02, f"a slow A-ASSOCIATE-RQ: expected A-ASSOCIATE-AC, got {ac[:16].hex()}"
        s.sendall(release_rq[:4])
        time.sleep(0.5)
        s.sendall(release_rq[4:])
        rp = read_pdu_or_close(s, timeout=10)
        assert rp and rp[0] == 0x06, f"a slow A-RELEASE-RQ: expected A-RELEASE-RP, got {rp[:16].hex()}"
    with raw_connect(server.port) as s:
        port = s.getsockname()[1]
        s.sendall(rq[:10])  # declares the whole A-ASSOCIATE-RQ, sends 10 bytes of it
        wait_closed(s, timeout=15)
    logged_about(server, port, "closed before association", "timed out")
    # Same once associated: a P-DATA-TF header declaring 64 KiB, then 4 bytes, then nothing.
    with raw_connect(server.port) as s:
        port = s.getsockname()[1]
        s.sendall(rq)
        ac = read_pdu_or_close(s, timeout=10)
        assert ac and ac[0] == 0x02, f"expected A-ASSOCIATE-AC, got {ac[:16].hex()}"
        s.sendall(bytes([0x04, 0, 0, 1, 0, 0]) + b"\x00\x00\xff\xfc")
        wait_closed(s, timeout=15)
    logged_about(server, port, "aborted: network timeout")
    assert worker_pids(server) == before
    assert echo_ok(server.port)


# -- 4. a declared PDU length far above the advertised maximum --------------------------

@pytest.mark.parametrize("when", ["first PDU", "after A-ASSOCIATE-AC"])
def test_huge_declared_pdu_length_is_aborted_without_buffering(make_server, when):
    server = make_server("--workers", "2")
    before_pids = worker_pids(server)
    rss_before = workers_rss(server)
    for _ in range(3):
        with raw_connect(server.port) as s:
            port = s.getsockname()[1]
            if when == "first PDU":
                s.sendall(bytes([0x01, 0]) + (0xF0000000).to_bytes(4, "big") + b"\x00\x01\x00\x00")
            else:
                s.sendall(associate_rq(server.port))
                ac = read_pdu_or_close(s, timeout=10)
                assert ac and ac[0] == 0x02, f"expected A-ASSOCIATE-AC, got {ac[:16].hex()}"
                s.sendall(bytes([0x04, 0]) + (0xF0000000).to_bytes(4, "big") + os.urandom(4096))
            # An A-ABORT at once, on the header alone: the 4 GB body never comes, so a
            # server that waited for it would not answer within the bound.
            reply = read_pdu_or_close(s, timeout=10)
            assert reply[:1] == bytes([A_ABORT]), f"expected A-ABORT, got {reply[:16].hex()}"
            assert_abort_or_close(reply)
            # and it does not keep reading: the connection ends
            wait_closed(s, timeout=10)
        logged_about(server, port, "declared PDU length 4026531840 exceeds the limit", "aborting")
    growth = workers_rss(server) - rss_before
    assert growth < 50 << 20, f"workers grew by {growth >> 20} MiB"
    assert worker_pids(server) == before_pids
    assert echo_ok(server.port)


# -- 5. disk full -----------------------------------------------------------------------

def test_min_free_bytes_refuses_with_out_of_resources(make_server, tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    server = make_server("--workers", "2", STOWAGE_MIN_FREE_BYTES=str(10**18))
    files = [part10(tmp_path / "in" / f"ct-{i}.dcm") for i in range(2)]
    ae = scu()
    for f in files:
        status = store_file(ae, server.port, f)
        assert status.Status == 0xA700, f"0x{status.Status:04X}"
        assert str(status.get("ErrorComment") or "").strip()
    assert echo_ok(server.port)
    assert exported(server.data_dir, tmp_path / "out") == {}


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {(r.stderr or r.stdout).strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(where, size): small tmpfs file systems, lazily unmounted (innermost first)."""
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        mount_tmpfs(where, size)
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def incompressible_ct(path: Path) -> Path:
    """~520 KB: CT_small with 512x512 16-bit random pixels, which zstd cannot shrink."""
    return part10(path, pixels=os.urandom(512 * 512 * 2))


def fill_until_refused(server, tmp_path: Path, max_sends: int = 100) -> tuple[list[Path], list[Path], list[str]]:
    """Distinct instances, one association each, until three are refused; (stored, refused,
    refusal comments). Every answer must be success or 0xA700 with an Error Comment."""
    ae = scu()
    stored, refused, comments = [], [], []
    for i in range(max_sends):
        f = incompressible_ct(tmp_path / "in" / f"ct-{i:03d}.dcm")
        status = store_file(ae, server.port, f)
        assert "Status" in status, f"{f.name}: no C-STORE response\n{server.log()[-3000:]}"
        if status.Status == 0x0000:
            stored.append(f)
            continue
        assert status.Status == 0xA700, f"{f.name}: 0x{status.Status:04X} {status.get('ErrorComment')}"
        comment = str(status.get("ErrorComment") or "")
        assert comment.strip(), f"{f.name}: 0xA700 without an Error Comment"
        refused.append(f)
        comments.append(comment)
        if len(refused) >= 3:
            break
    return stored, refused, comments


def assert_exports_exactly(data_dir: Path, out: Path, stored: list[Path], refused: list[Path]) -> None:
    got = exported(data_dir, out)
    missing = [f.name for f in stored if request_uid(f) not in got]
    assert not missing, f"acknowledged but not exported: {missing}"
    for f in stored:
        assert dataset_bytes(got[request_uid(f)]) == dataset_bytes(f), f"{f.name}: exported bytes differ"
    assert not {request_uid(f) for f in refused} & set(got), "a refused instance was exported"
    assert len(got) == len(stored)


def full_disk_after_a_clean_stop(server, make_server, data_dir: Path, tmp_path: Path, min_free: str,
                                 stored: list[Path], refused: list[Path]) -> None:
    """Everything sealed on the full disk: the stop is clean, and a restart on the still
    full disk serves what it holds and refuses stores with 0xA700."""
    # Nothing is left to seal: stopping on the full disk is a clean stop.
    assert server.stop() == 0, server.log()[-4000:]
    assert "could not seal the catalog tail" not in server.log(), server.log()[-4000:]
    assert "Traceback" not in server.log(), server.log()[-4000:]
    assert "exited with" not in server.log(), "a worker died on the full disk:\n" + server.log()[-4000:]
    # A restart while the disk is still full serves what it holds (ops/RUNBOOK.md: on a full
    # disk queries, retrieves and echo go on working) and refuses stores with 0xA700.
    again = make_server("--workers", "2", data_dir=data_dir, port=server.port, STOWAGE_MIN_FREE_BYTES=min_free)
    assert echo_ok(again.port)
    assert_exports_exactly(data_dir, tmp_path / "out-restarted", stored, refused)
    late = incompressible_ct(tmp_path / "in" / "ct-late.dcm")
    status = store_file(scu(), again.port, late)
    assert status.Status == 0xA700 and str(status.get("ErrorComment") or "").strip(), \
        f"a store on the restarted full disk: 0x{status.Status:04X} {status.get('ErrorComment')}"
    refused.append(late)
    assert again.stop() == 0, again.log()[-4000:]
    assert "Traceback" not in again.log(), again.log()[-4000:]


def full_disk_after_an_unsealed_stop(server, make_server, data_dir: Path, min_free: str) -> None:
    """The tail could not be sealed onto the full disk: stop says so in one line and exits
    1 (ops/RUNBOOK.md); a restart on the still full disk refuses to start in one line
    rather than serve without rows it acknowledged (test_catalog_disk_full)."""
    assert server.stop() == 1, server.log()[-4000:]
    assert server.log().count("could not seal the catalog tail on stop") == 1, server.log()[-4000:]
    assert "Traceback" not in server.log() and "exited with" not in server.log(), server.log()[-4000:]
    again = make_server("--workers", "2", data_dir=data_dir, port=server.port, STOWAGE_MIN_FREE_BYTES=min_free,
                        start=False)
    again.start(wait=False)
    with pytest.raises(RuntimeError) as refused_start:
        again.wait_ready(timeout=60)
    said = str(refused_start.value)
    assert said.startswith("stowage serve exited 1:") and "No space left on device" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]


@pytest.mark.parametrize("min_free", [
    "0",                # the reserve check alone: it refuses once free space < the dataset
    str(-(1 << 30)),    # the reserve check disabled: the segment write itself meets ENOSPC
], ids=["reserve-check", "enospc"])
def test_full_filesystem(make_server, tmpfs, tmp_path, monkeypatch, min_free):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    data_dir = tmpfs(tmp_path / "disk", "12m") / "data"
    server = make_server("--workers", "2", data_dir=data_dir, STOWAGE_MIN_FREE_BYTES=min_free)
    stored, refused, comments = fill_until_refused(server, tmp_path)
    assert refused, f"the 12 MB file system never filled after {len(stored)} stores"
    assert len(stored) >= 10, f"only {len(stored)} stores before the disk was full"
    if min_free != "0":
        assert all("No space left on device" in c for c in comments), comments
    assert echo_ok(server.port)
    if min_free == "0":
        # The store path keeps CATALOG_RESERVE free whatever min_free_bytes says: the sealers
        # catalogue the last records on the full disk.
        wait_for(lambda: catalog_sealed(data_dir), 60,
                 lambda: "the sealers to catalogue the last records on the full disk\n" + server.log()[-3000:])
    else:
        # Every check off: the refused write met ENOSPC and was truncated away, leaving what
        # the last accepted record left, which may or may not hold a Parquet file. The sealers
        # either catalogue on it or say they cannot; what follows is asserted for each.
        wait_for(lambda: catalog_sealed(data_dir) or "sealing the catalog tail failed" in server.log(), 60,
                 lambda: "the sealers to catalogue or to report the full disk\n" + server.log()[-3000:])
    sealed = catalog_sealed(data_dir)
    assert_exports_exactly(data_dir, tmp_path / "out-serving", stored, refused)  # read-your-writes either way
    if sealed:
        full_disk_after_a_clean_stop(server, make_server, data_dir, tmp_path, min_free, stored, refused)
    else:
        full_disk_after_an_unsealed_stop(server, make_server, data_dir, min_free)
    # With room again, everything acknowledged is there.
    roomy = tmp_path / "roomy"
    shutil.copytree(data_dir, roomy, symlinks=True)
    moved = make_server("--workers", "2", data_dir=roomy)
    assert echo_ok(moved.port)
    assert moved.stop() == 0
    assert_exports_exactly(roomy, tmp_path / "out-roomy", stored, refused)


def test_catalog_disk_full(make_server, tmpfs, tmp_path, monkeypatch):
    """ENOSPC where only the catalog lives (its own 16 KB file system; segments have room):
    stores are acknowledged once their segment record is durable, so every acknowledged
    instance must come back, at the latest after a restart where there is space."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    data_dir = tmpfs(tmp_path / "disk", "12m") / "data"
    tmpfs(data_dir / "catalog", "16k")
    server = make_server("--workers", "1", data_dir=data_dir, STOWAGE_MIN_FREE_BYTES="0")
    ae = scu()
    stored, refused = [], []
    for i in range(10):
        f = incompressible_ct(tmp_path / "in" / f"ct-{i:03d}.dcm")
        status = store_file(ae, server.port, f)
        assert status.Status in (0x0000, 0xA700), f"{f.name}: 0x{status.Status:04X}"
        (stored if status.Status == 0 else refused).append(f)
    assert echo_ok(server.port)
    # the sealer tries to write Parquet onto the full catalog, and cannot
    wait_for(lambda: "sealing the catalog tail failed" in server.log(), 60,
             lambda: "the sealer to try the full catalog\n" + server.log()[-3000:])
    live = exported(data_dir, tmp_path / "out-serving")
    assert not {request_uid(f) for f in refused} & set(live), "a refused instance was exported"
    invisible = [f.name for f in stored if request_uid(f) not in live]
    assert not invisible, f"acknowledged but not visible while serving (read-your-writes): {invisible}"
    # Stopping cannot seal the tail onto the full catalog: it says so in one line and exits
    # 1 (ops/RUNBOOK.md); the segments hold every record.
    assert server.stop() == 1, server.log()[-4000:]
    assert server.log().count("could not seal the catalog tail on stop") == 1, server.log()[-4000:]
    assert "Traceback" not in server.log()
    # Restarting on the still-full catalog cannot index the records the catalog lacks. Serving
    # without them would deny instances it acknowledged (C-FIND, C-MOVE, and storage
    # commitment would fail them as 0x0112, no such object instance), so it refuses to start,
    # in one line that says why, exit status 1.
    again = make_server("--workers", "1", data_dir=data_dir, STOWAGE_MIN_FREE_BYTES="0", start=False)
    again.start(wait=False)
    with pytest.raises(RuntimeError) as refused_start:
        again.wait_ready(timeout=60)
    said = str(refused_start.value)
    assert said.startswith("stowage serve exited 1:"), said[-3000:]
    assert again.log().strip().count("\n") == 0, again.log()[-3000:]  # one line
    assert "start-up recovery could not index" in said and "No space left on device" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    # Moved to a disk with room, recovery indexes from the segments what the catalog missed.
    roomy = tmp_path / "roomy"
    shutil.copytree(data_dir, roomy, symlinks=True)
    moved = make_server("--workers", "1", data_dir=roomy)
    assert moved.stop() == 0
    assert_exports_exactly(roomy, tmp_path / "out-recovered", stored, refused)


# -- 6. association cap -----------------------------------------------------------------

def associate_once_admitted(ae: AE, port: int, timeout: float = 10.0):
    """An association, retried (bounded) until established: a slot frees only once the
    worker has told the acceptor the previous association ended, a moment after its release."""
    deadline = time.monotonic() + timeout
    for _ in range(40):
        assoc = ae.associate(HOST, port, ae_title="STOWAGE")
        if assoc.is_established or time.monotonic() > deadline:
            return assoc
        time.sleep(0.25)
    return assoc


def test_association_cap_rejects_transient_then_recovers(make_server):
    server = make_server("--workers", "2", STOWAGE_MAX_ASSOCIATIONS="1")
    ae = scu(timeout=5)
    first = associate_once_admitted(ae, server.port)  # the readiness echo may still hold the slot
    assert first.is_established
    try:
        # pynetdicom itself sometimes reports a fast A-ASSOCIATE-RJ as an abort (its requestor
        # checks the socket after the RJ may already have closed it), so: never admitted,
        # and seen as rejected at least once in five tries.
        outcomes = []
        for _ in range(5):
            extra = ae.associate(HOST, server.port, ae_title="STOWAGE")
            outcomes.append("established" if extra.is_established else "rejected" if extra.is_rejected
                            else "aborted" if extra.is_aborted else "?")
            if extra.is_established:
                extra.release()
        assert "established" not in outcomes, f"admitted past the cap of 1: {outcomes}"
        assert "rejected" in outcomes, outcomes
        with raw_connect(server.port) as s:
            # PS3.8: the RJ answers an A-ASSOCIATE-RQ; nothing comes before the RQ is sent.
            s.settimeout(0.5)
            with pytest.raises(socket.timeout):
                s.recv(16)
            s.sendall(associate_rq(server.port))
            rj = read_pdu_or_close(s, timeout=10)
        assert rj[:6] == bytes([A_ASSOCIATE_RJ, 0, 0, 0, 0, 4]), rj.hex()
        result, source, reason = rj[7], rj[8], rj[9]
        assert (result, source, reason) == (2, 3, 2), "want rejected-transient, provider (presentation), local limit"
        r = subprocess.run([dcmtk("echoscu"), HOST, str(server.port), "-aec", "STOWAGE"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode != 0 and "Rejected Transient" in r.stderr + r.stdout, r.stderr
        assert first.send_c_echo().Status == 0  # the admitted one is untouched
    finally:
        first.release()
    third = associate_once_admitted(ae, server.port)
    assert third.is_established, "no association admitted after the first was released"
    assert third.send_c_echo().Status == 0
    third.release()


# -- 7. a worker killed while another association is idle ---------------------------------

def _worker_with_connection(server, local_port: int) -> psutil.Process | None:
    for w in server.workers():
        for c in w.net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == local_port and c.laddr.port == server.port:
                return w
    return None


def test_killed_worker_is_replaced_and_other_associations_survive(server, tmp_path):
    files = [part10(tmp_path / "in" / f"ct-{i}.dcm") for i in range(4)]
    ae = scu()
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
        local_port = assoc.dul.socket.socket.getsockname()[1]
        holder = _worker_with_connection(server, local_port)
        assert holder is not None, "no worker holds our association"
        workers = server.workers()
        assert len(workers) == 2
        victim = next(w for w in workers if w.pid != holder.pid)
        victim.kill()  # SIGKILL, by PID
        victim.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = worker_pids(server)
            if len(now) == 2 and victim.pid not in now:
                break
            time.sleep(0.2)
        now = worker_pids(server)
        assert len(now) == 2 and victim.pid not in now and holder.pid in now, (now, victim.pid)
        (replacement,) = now - {holder.pid}
        # The replacement serves echo: it is the least loaded once ready, so a new association
        # lands there (bounded tries while it starts up).
        deadline, served_by = time.monotonic() + 15, None
        while served_by != replacement:
            assert time.monotonic() < deadline, f"no echo served by the new worker {replacement}"
            probe = scu().associate(HOST, server.port, ae_title="STOWAGE")
            if probe.is_established:
                w = _worker_with_connection(server, probe.dul.socket.socket.getsockname()[1])
                served_by = w.pid if w else None
                assert probe.send_c_echo().Status == 0
                probe.release()
            if served_by != replacement:
                time.sleep(0.3)
        for f in files[1:]:  # the idle association on the surviving worker goes on storing
            status = assoc.send_c_store(pydicom.dcmread(f))
            assert status and status.Status == 0, f"{f.name}: {status}"
    finally:
        assoc.release()
    got = exported(server.data_dir, tmp_path / "out")
    assert set(got) == {request_uid(f) for f in files}


def test_stores_resume_once_space_is_freed(make_server, tmpfs, tmp_path, monkeypatch):
    """After a full disk, freeing space is enough: the next C-STORE succeeds, no restart
    (what ops/RUNBOOK.md tells the administrator)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    disk = tmpfs(tmp_path / "disk", "16m")
    ballast = disk / "ballast"
    ballast.write_bytes(b"\0" * (5 << 20))
    server = make_server("--workers", "2", data_dir=disk / "data", STOWAGE_MIN_FREE_BYTES="0")
    stored, refused, _comments = fill_until_refused(server, tmp_path)
    assert refused and stored
    ballast.unlink()
    again = incompressible_ct(tmp_path / "after" / "ct-after.dcm")
    # The store path asks the kernel again before it refuses (engine/store/freespace.py): once
    # the file system shows the room, the very next store is taken.
    wait_for(lambda: shutil.disk_usage(disk).free > 2 * again.stat().st_size, 10, "the ballast's space to come back")
    status = store_file(scu(), server.port, again)
    assert status.Status == 0x0000, f"0x{status.Status:04X} {status.get('ErrorComment')}"
    assert "exited with" not in server.log(), server.log()[-4000:]
    assert_exports_exactly(disk / "data", tmp_path / "out", stored + [again], refused)


def test_sealed_uid_filter_on_a_full_tmpfs_is_read_without_sigbus(tmpfs, tmp_path):
    """The sealed-UID filter is a sparse file. On tmpfs even reading a hole through a map
    needs a page, so on a full one a mapped read is SIGBUS: it must be read with pread
    there. Probed in a child process, which a SIGBUS would kill."""
    import sys
    from stowage.catalog.sealed_uids import SealedUids
    disk = tmpfs(tmp_path / "disk", "4m")
    SealedUids.create(disk / "uids.bloom").close()
    fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT)  # fill the file system
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    probe = ("import sys; from pathlib import Path; from stowage.catalog.sealed_uids import SealedUids; "
             f"f = SealedUids(Path({str(disk / 'uids.bloom')!r}), writable=False); "
             "print(sum(f'1.2.3.{i}' in f for i in range(2000)))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip() == "0"  # an empty filter holds none of them
