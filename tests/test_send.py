"""`stowage send` and `stowage echo` as users run them, against DCMTK storescp (bit-
preserving, so what arrives is exactly what went over the wire) and pynetdicom."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt

from conftest import CT, DCMTK_NODELAY, HOST, MR, copies, dataset_bytes, dcmtk, echo_ok, free_port

RLE_SRC = Path(get_testdata_file("MR_small_RLE.dcm"))
J2K_SRC = Path(get_testdata_file("MR_small_jp2klossless.dcm"))  # the same SOP Instance UID as RLE_SRC


@pytest.fixture
def compressed(tmp_path) -> list[Path]:
    """One RLE and one JPEG 2000 instance, with UIDs of their own."""
    return copies(RLE_SRC, tmp_path / "rle", 1, "rle") + copies(J2K_SRC, tmp_path / "j2k", 1, "j2k")


def stowage(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def store(port: int, paths: list[Path]) -> None:
    """C-STORE files to stowage, each in the transfer syntax it is encoded in, and each as the
    data set bytes of its file (pynetdicom's chunked mode: not decoded and encoded again), so
    that what was sent is `dataset_bytes(path)`."""
    from pynetdicom import _config
    metas = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    ae = AE("MODALITY")
    for pair in sorted({(str(m.SOPClassUID), str(m.file_meta.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(*pair[:1], [pair[1]])
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        for p in paths:
            status = assoc.send_c_store(p)
            assert status.Status == 0, p
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def by_uid(paths: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def as_implicit(src: Path, out: Path, n: int, tag: str) -> list[Path]:
    paths = copies(src, out, n, tag)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(p, enforce_file_format=True)
    return paths


class StoreSCP:
    """DCMTK storescp writing what it receives, bit-preserving, into a directory."""

    def __init__(self, out: Path, *options: str, aet: str = "DEST", port: int | None = None,
                 nodelay: bool = False) -> None:
        """`port`: one chosen beforehand (a destination configured before it comes up);
        `nodelay`: TCP_NODELAY=1 (conftest.DCMTK_NODELAY), without which storescp's every
        C-STORE response waits about 40 ms for a delayed ACK."""
        self.out, self.port, self.aet = out, port or free_port(), aet
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([dcmtk("storescp"), "+B", "-aet", aet, "-od", str(out), *options,
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, **(DCMTK_NODELAY if nodelay else {})))
        deadline = time.monotonic() + 20
        while not echo_ok(self.port, aet=aet, timeout=1.0):
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)

    def received(self) -> dict[str, Path]:
        return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in self.out.iterdir()}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def scps():
    started: list[StoreSCP] = []

    def make(out: Path, *options: str, aet: str = "DEST", port: int | None = None, nodelay: bool = False) -> StoreSCP:
        s = StoreSCP(out, *options, aet=aet, port=port, nodelay=nodelay)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def config_with(tmp_path: Path, **remotes: tuple) -> Path:
    """[remotes.AE] tables from AE=(host, port[, associations])."""
    cfg = tmp_path / "stowage.toml"
    cfg.write_text("".join(f'[remotes.{aet}]\nhost = "{spec[0]}"\nport = {spec[1]}\n'
                           + (f"associations = {spec[2]}\n" if len(spec) > 2 else "") + "\n"
                           for aet, spec in remotes.items()))
    return cfg


def study_of(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID


def test_send_study_byte_exact_to_dcmtk(server, tmp_path, scps, compressed):
    ct = copies(CT, tmp_path / "ct", 20, "ct")
    implicit = as_implicit(CT, tmp_path / "imp", 5, "imp")
    store(server.port, ct + implicit + compressed)
    dest = scps(tmp_path / "rx", "+xa")
    cfg = config_with(tmp_path, DEST=(HOST, dest.port))
    r = stowage("send", "--config", str(cfg), "--data-dir", str(server.data_dir), "--to", "DEST",
                "--study", f"{study_of(CT)},{study_of(compressed[0])}")
    assert r.returncode == 0, r.stderr
    assert "27 completed, 0 warning, 0 failed (0 converted" in r.stdout, r.stdout
    got, sources = dest.received(), by_uid(ct + implicit + compressed)
    assert set(got) == set(sources)
    for uid, path in got.items():  # what arrived is what was stored, as the modality sent it
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            pydicom.dcmread(sources[uid], stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert dataset_bytes(path) == dataset_bytes(sources[uid]), f"{uid} did not arrive byte-exact"


def test_send_converts_for_an_implicit_only_destination(server, tmp_path, scps, compressed):
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    store(server.port, ct + compressed)
    dest = scps(tmp_path / "rx", "+xi")
    cfg = config_with(tmp_path, DEST=(HOST, dest.port))
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct + compressed]
    r = stowage("send", "--config", str(cfg), "--data-dir", str(server.data_dir), "--to", "DEST",
                *[a for u in uids for a in ("--instance", u)])
    assert r.returncode == 0, r.stderr
    assert "5 completed, 0 warning, 0 failed (5 converted" in r.stdout, r.stdout
    got = dest.received()
    assert set(got) == set(uids)
    for src in ct + compressed:
        original = pydicom.dcmread(src)
        arrived = pydicom.dcmread(got[original.SOPInstanceUID])
        assert arrived.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert (arrived.pixel_array == original.pixel_array).all(), "conversion changed the pixels"
        assert arrived.PatientName == original.PatientName


def test_send_by_query_and_series(server, tmp_path, scps):
    ct = copies(CT, tmp_path / "ct", 4, "ct")
    mr = copies(MR, tmp_path / "mr", 3, "mr")
    store(server.port, ct + mr)
    dest = scps(tmp_path / "rx")
    cfg = config_with(tmp_path, DEST=(HOST, dest.port))
    base = ("send", "--config", str(cfg), "--data-dir", str(server.data_dir), "--to", "DEST", "-q")
    r = stowage(*base, "--query", "Modality=MR")
    assert r.returncode == 0, r.stderr
    assert len(dest.received()) == 3
    series = pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID
    r = stowage(*base, "--series", series)
    assert r.returncode == 0, r.stderr
    assert len(dest.received()) == 7
    r = stowage(*base, "--query", "PatientName=Nobody*")
    assert r.returncode != 0 and "nothing matches" in r.stderr
    r = stowage(*base, "--query", "Bogus=1")
    assert r.returncode != 0 and "unknown key" in r.stderr and "Traceback" not in r.stderr


def test_send_to_unknown_ae_and_unreachable_host(server, tmp_path):
    store(server.port, copies(CT, tmp_path / "ct", 2, "ct"))
    dead = free_port()
    cfg = config_with(tmp_path, GONE=(HOST, dead))
    base = ("send", "--config", str(cfg), "--data-dir", str(server.data_dir), "--study", study_of(CT))
    r = stowage(*base, "--to", "NOBODY")
    assert r.returncode != 0
    assert "unknown AE 'NOBODY'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = stowage(*base, "--to", "GONE", "-q", timeout=60)  # the refused connection ends it: no waiting it out
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"nothing sent to GONE@{HOST}:{dead}" in r.stderr and "unreachable: Connection refused" in r.stderr, r.stderr


def test_send_counts_a_corrupt_record_as_failed(server, tmp_path, scps):
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    store(server.port, ct)
    victim = pydicom.dcmread(ct[1], stop_before_pixels=True).SOPInstanceUID
    flip_payload(server.data_dir, victim)
    dest = scps(tmp_path / "rx")
    cfg = config_with(tmp_path, DEST=(HOST, dest.port))
    r = stowage("send", "--config", str(cfg), "--data-dir", str(server.data_dir), "--to", "DEST", "-q",
                "--series", pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 completed, 0 warning, 1 failed" in r.stdout
    assert victim in r.stderr and "checksum" in r.stderr
    assert victim not in dest.received()


def flip_payload(data_dir: Path, sop_instance_uid: str) -> None:
    """Corrupt the payload of the stored record of `sop_instance_uid` (flip 8 bytes)."""
    from stowage.catalog.reader import Catalog
    from stowage.engine.store.segment import _read_head
    catalog = Catalog(data_dir / "catalog")
    try:
        row = catalog.lookup(sop_instance_uid)
    finally:
        catalog.close()
    path = data_dir / "segments" / row["segment"]
    with open(path, "r+b") as f:
        rec, _crc, _running = _read_head(f, row["offset"])
        at = rec.payload_offset + rec.payload_length // 2
        f.seek(at)
        data = f.read(8)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def test_echo(tmp_path, scps):
    dest = scps(tmp_path / "rx", aet="DEST")
    cfg = config_with(tmp_path, DEST=(HOST, dest.port), GONE=(HOST, free_port()))
    r = stowage("echo", "--config", str(cfg), "DEST")
    assert r.returncode == 0 and "C-ECHO ok" in r.stdout, r.stderr
    r = stowage("echo", f"{HOST}:{dest.port}", "--aec", "DEST")
    assert r.returncode == 0, r.stderr
    r = stowage("echo", "--config", str(cfg), "NOBODY")
    assert r.returncode == 1 and "unknown AE 'NOBODY'" in r.stderr and "Traceback" not in r.stderr
    r = stowage("echo", "--config", str(cfg), "GONE")
    assert r.returncode == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr


def test_a_remote_whose_host_does_not_resolve_is_one_clear_error(tmp_path):
    """A remote AE configured with a host name that does not resolve (a typo, a DNS outage)
    is a PeerError naming the host for every opener of associations (commitment reports,
    migration's C-FIND, echo), not a socket.gaierror traceback; and one line from the CLI."""
    from stowage.engine.transfer.requestor import Peer, PeerError, echo
    with pytest.raises(PeerError, match="'nohost.invalid' does not resolve"):
        echo(Peer("NOWHERE", "nohost.invalid", 104), "STOWAGE")
    cfg = config_with(tmp_path, NOWHERE=("nohost.invalid", 104))
    r = stowage("echo", "--config", str(cfg), "NOWHERE")
    assert r.returncode == 1 and "nohost.invalid" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


class SlowSCP:
    """A pynetdicom Storage SCP that accepts only `classes`, and leaves the first C-STORE
    of `stall` unanswered for `delay` seconds (a lost response, as the sender sees it)."""

    def __init__(self, classes: list[str], stall: str = "", delay: float = 0.0) -> None:
        self.port, self.stall, self.delay = free_port(), stall, delay
        self.received: list[str] = []
        ae = AE("DEST")
        for uid in classes:
            ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server((HOST, self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        first = uid not in self.received
        self.received.append(uid)
        if uid == self.stall and first:
            time.sleep(self.delay)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_send_retries_a_store_whose_response_never_comes(server, tmp_path):
    ct = copies(CT, tmp_path / "ct", 4, "ct")
    store(server.port, ct)
    stalled = pydicom.dcmread(ct[1], stop_before_pixels=True).SOPInstanceUID
    dest = SlowSCP(["1.2.840.10008.5.1.4.1.1.2"], stall=stalled, delay=4.0)
    try:
        cfg = config_with(tmp_path, DEST=(HOST, dest.port))
        r = stowage("send", "--config", str(cfg), "--data-dir", str(server.data_dir), "--to", "DEST", "-q",
                    "--timeout", "1.5", "--study", study_of(ct[0]))
    finally:
        dest.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 completed, 0 warning, 0 failed" in r.stdout
    assert dest.received.count(stalled) == 2, "the unanswered store was not retried"
    assert set(dest.received) == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct}


def test_send_counts_a_refused_sop_class_as_failed(server, tmp_path):
    ct = copies(CT, tmp_path / "ct", 2, "ct")
    mr = copies(MR, tmp_path / "mr", 2, "mr")
    store(server.port, ct + mr)
    dest = SlowSCP(["1.2.840.10008.5.1.4.1.1.4"])  # MR only
    try:
        cfg = config_with(tmp_path, DEST=(HOST, dest.port))
        uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct + mr]
        r = stowage("send", "--config", str(cfg), "--data-dir", str(server.data_dir), "--to", "DEST", "-q",
                    "--instance", ",".join(uids))
    finally:
        dest.stop()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 completed, 0 warning, 2 failed" in r.stdout
    assert "accepted no presentation context for SOP class 1.2.840.10008.5.1.4.1.1.2" in r.stderr
    assert sorted(dest.received) == sorted(uids[2:])


def test_send_on_an_existing_association(server, tmp_path, scps, monkeypatch):
    """The C-GET shape: the core sends on an association it did not open."""
    from pynetdicom import _config
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)  # Sender sets it process-wide
    from stowage.catalog.reader import Catalog
    from stowage.engine.transfer.requestor import Peer, associate, new_ae
    from stowage.engine.transfer.selection import select
    from stowage.engine.transfer.contexts import context_batches
    from stowage.engine.transfer.send import Sender
    from pynetdicom.presentation import build_context
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    store(server.port, ct)
    dest = scps(tmp_path / "rx")
    catalog = Catalog(server.data_dir / "catalog")
    try:
        instances = select(catalog, "series", [pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID])
    finally:
        catalog.close()
    peer = Peer("DEST", HOST, dest.port)
    (contexts,) = context_batches(instances)
    assoc = associate(new_ae("GETSCP"), peer, [build_context(*cx) for cx in contexts])
    try:
        result = Sender(server.data_dir / "segments", peer, "GETSCP").send_on(assoc, instances)
    finally:
        assoc.release()
    assert (result.completed, result.failed) == (3, 0)
    assert set(dest.received()) == {i.sop_instance_uid for i in instances}


def test_context_batches_stay_within_128_and_keep_each_class_whole():
    from stowage.engine.transfer.contexts import MAX_CONTEXTS, context_batches
    from stowage.engine.transfer.results import Instance
    instances = [Instance(f"1.2.3.{i}", f"1.2.840.10008.5.1.4.1.1.{i}", ts, "000-00000001.seg", 0)
                 for i in range(60) for ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50")]
    batches = context_batches(instances)
    assert len(batches) == 2 and all(len(b) <= MAX_CONTEXTS for b in batches)
    per_class = {}
    for n, batch in enumerate(batches):
        for sop_class, _syntax in batch:
            per_class.setdefault(sop_class, set()).add(n)
    assert len(per_class) == 60 and all(len(v) == 1 for v in per_class.values())
    first = [ts for sop_class, ts in batches[0] if sop_class == "1.2.840.10008.5.1.4.1.1.0"]
    assert first == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2"]


def test_query_keys_are_schema_columns_and_values_are_bound():
    from stowage.engine.transfer.selection import SelectionError, _like, parse_query
    assert parse_query("Modality=CT patient_id='A B'") == [("modality", "CT"), ("patient_id", "A B")]
    for bad in ("sop_instance_uid=1; DROP TABLE x", "Modality", "\"1=1 OR\"=x"):
        with pytest.raises(SelectionError):
            parse_query(bad)
    assert _like("DOE^J*_%?") == "DOE^J%\\_\\%_"
