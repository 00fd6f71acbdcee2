"""C-MOVE SCP against DCMTK movescu and pynetdicom, with DCMTK storescp (bit-preserving)
and pynetdicom as destinations: every model and level, byte-exact arrival, conversion for
an implicit-only destination, unknown destination, refused SOP class, cancel, and a move
of several hundred instances."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (MRImageStorage, PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelMove)

from conftest import CT, HOST, MR, cli, copies, dataset_bytes, dcmtk, free_port
from test_send import RLE_SRC, J2K_SRC, as_implicit, by_uid, config_with, scps, stowage, store  # noqa: F401  (scps: fixture)

MODELS = {"P": "PATIENT STUDY SERIES IMAGE", "S": "STUDY SERIES IMAGE", "O": "PATIENT STUDY"}


def key_options(keys: dict[str, str]) -> list[str]:
    """`keys` as DCMTK's -k options."""
    return [option for k, v in keys.items() for option in ("-k", f"{k}={v}")]


def identifier(keys: dict[str, str]) -> pydicom.Dataset:
    """The C-MOVE or C-GET identifier holding `keys` (keywords and values)."""
    ds = pydicom.Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def movescu(port: int, model: str, dest: str, keys: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    args = [dcmtk("movescu"), "-v", f"-{model}", "-aet", "MOVESCU", "-aec", "STOWAGE", "-aem", dest, *key_options(keys)]
    return subprocess.run(args + [HOST, str(port)], capture_output=True, text=True, timeout=timeout)


def keys_for(path: Path, model: str, level: str) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    chain = {"PATIENT": ("PatientID", ds.PatientID), "STUDY": ("StudyInstanceUID", ds.StudyInstanceUID),
             "SERIES": ("SeriesInstanceUID", ds.SeriesInstanceUID), "IMAGE": ("SOPInstanceUID", ds.SOPInstanceUID)}
    levels = MODELS[model].split()
    keys = {"QueryRetrieveLevel": level}
    for lvl in levels[: levels.index(level) + 1]:
        keys[chain[lvl][0]] = chain[lvl][1]
    return keys


def clear(d: Path) -> None:
    for p in d.iterdir():
        p.unlink()


@pytest.fixture
def archive(make_server, tmp_path, scps):  # noqa: F811
    """storescp DEST (all syntaxes) and IMPL (implicit VR LE only), stowage knowing both and
    sending one pending response per sub-operation (pending_interval 0), which tests count."""
    dest = scps(tmp_path / "rx", "+xa", nodelay=True)
    impl = scps(tmp_path / "rx-impl", "+xi", aet="IMPL", nodelay=True)
    cfg = config_with(tmp_path, DEST=(HOST, dest.port), IMPL=(HOST, impl.port))
    server = make_server("--workers", "2", "--config", str(cfg), STOWAGE_PENDING_INTERVAL="0")
    return server, dest, impl, cfg


def test_move_every_model_and_level_byte_exact(archive, tmp_path):
    server, dest, _impl, _cfg = archive
    ct = copies(CT, tmp_path / "ct", 4, "ct")
    imp = as_implicit(CT, tmp_path / "imp", 3, "imp")            # same study, another series
    rle = copies(RLE_SRC, tmp_path / "rle", 2, "rle")
    j2k = copies(J2K_SRC, tmp_path / "j2k", 1, "j2k")            # MR patient: RLE and J2K studies
    store(server.port, ct + imp + rle + j2k)  # each file's data set bytes, as they are
    sources = by_uid(ct + imp + rle + j2k)
    cases = {  # (model, level, sample file) -> expected count
        ("P", "PATIENT", ct[0]): 7, ("P", "STUDY", imp[0]): 7, ("P", "SERIES", imp[0]): 3, ("P", "IMAGE", ct[1]): 1,
        ("S", "STUDY", rle[0]): 3, ("S", "SERIES", rle[0]): 2, ("S", "IMAGE", j2k[0]): 1,
        ("O", "PATIENT", rle[0]): 3, ("O", "STUDY", ct[0]): 7,
    }
    for (model, level, sample), want in cases.items():
        clear(dest.out)
        r = movescu(server.port, model, "DEST", keys_for(sample, model, level))
        assert r.returncode == 0, r.stderr
        assert "Received Final Move Response (Success)" in r.stderr + r.stdout, (model, level, r.stderr)
        got = dest.received()
        assert len(got) == want and set(got) <= set(sources), (model, level, sorted(got))
        for uid, path in got.items():  # arrived as the modality sent it
            assert dataset_bytes(path) == dataset_bytes(sources[uid]), f"{uid} not byte-exact"
            assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
                pydicom.dcmread(sources[uid], stop_before_pixels=True).file_meta.TransferSyntaxUID


def _pyn_move(port: int, dest: str, keys: dict[str, str], model=StudyRootQueryRetrieveInformationModelMove,
              on_pending=None) -> list:
    ae = AE("PYNMOVE")
    ae.add_requested_context(model)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 60
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    out = []
    try:
        for status, ident in assoc.send_c_move(identifier(keys), dest, model):
            out.append((status, ident))
            if on_pending is not None and status and status.Status == 0xFF00:
                on_pending(assoc, len(out))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def test_move_conversion_counts_and_unknown_destination(archive, tmp_path):
    server, _dest, impl, _cfg = archive
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    rle = copies(RLE_SRC, tmp_path / "rle", 1, "rle")
    j2k = copies(J2K_SRC, tmp_path / "j2k", 1, "j2k")
    store(server.port, ct + rle + j2k)
    studies = "\\".join(sorted({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in ct + rle + j2k}))
    rsps = _pyn_move(server.port, "IMPL", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": studies})
    statuses = [s.Status for s, _ in rsps]
    assert statuses == [0xFF00] * 4 + [0x0000], statuses
    assert [s.NumberOfRemainingSuboperations for s, _ in rsps[:-1]] == [4, 3, 2, 1]
    final = rsps[-1][0]
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
            final.NumberOfWarningSuboperations) == (5, 0, 0)
    got = impl.received()
    assert len(got) == 5
    for path in got.values():  # converted: compressed to uncompressed, explicit to implicit
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        ds.pixel_array  # decodes
    rsps = _pyn_move(server.port, "NOWHERE", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": studies})
    assert [s.Status for s, _ in rsps] == [0xA801]
    r = movescu(server.port, "S", "NOWHERE", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": studies})
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in r.stdout + r.stderr, r.stderr


class SlowSCP:
    """A pynetdicom Storage SCP taking only MR, each store taking `delay` seconds."""

    def __init__(self, delay: float = 0.0, hold_after: int = 0) -> None:
        self.port, self.received, self.delay = free_port(), [], delay
        self.hold_after, self.go_on = hold_after, threading.Event()  # the hold_after-th store waits for go_on
        ae = AE("SLOW")
        ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server((HOST, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:
        time.sleep(self.delay)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        if len(self.received) == self.hold_after:
            self.go_on.wait(120)
        return 0

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            assert time.monotonic() < deadline, f"{len(self.received)} of {n} stores arrived in {timeout} s"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.shutdown()


def test_move_refused_sop_class_is_a_warning_with_failed_uids(make_server, tmp_path):
    dest = SlowSCP()
    try:
        cfg = config_with(tmp_path, SLOW=(HOST, dest.port))
        server = make_server("--workers", "2", "--config", str(cfg))
        ct = copies(CT, tmp_path / "ct", 2, "ct")
        mr = copies(MR, tmp_path / "mr", 3, "mr")
        store(server.port, ct + mr)
        ds_keys = {"QueryRetrieveLevel": "PATIENT", "PatientID": pydicom.dcmread(ct[0]).PatientID}
        rsps = _pyn_move(server.port, "SLOW", ds_keys, PatientRootQueryRetrieveInformationModelMove)
        assert rsps[-1][0].Status == 0xA702  # nothing could be sent: CT refused
        studies = "\\".join(sorted({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in ct + mr}))
        rsps = _pyn_move(server.port, "SLOW", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": studies})
        final, ident = rsps[-1]
        assert final.Status == 0xB000
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 2)
        ct_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct}
        failed = ident.FailedSOPInstanceUIDList
        assert set([failed] if isinstance(failed, str) else failed) == ct_uids
        assert "accepted no presentation context for SOP class 1.2.840.10008.5.1.4.1.1.2" in server.log()
    finally:
        dest.stop()


def test_move_cancel(make_server, tmp_path):
    dest = SlowSCP(delay=0.05)
    try:
        cfg = config_with(tmp_path, SLOW=(HOST, dest.port))
        server = make_server("--workers", "2", "--config", str(cfg))
        mr = copies(MR, tmp_path / "mr", 60, "mr")
        store(server.port, mr)
        keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": pydicom.dcmread(mr[0]).StudyInstanceUID,
                "SeriesInstanceUID": pydicom.dcmread(mr[0]).SeriesInstanceUID}

        def cancel(assoc, n):
            if n == 3:
                assoc.send_c_cancel(1, query_model=StudyRootQueryRetrieveInformationModelMove)

        rsps = _pyn_move(server.port, "SLOW", keys, on_pending=cancel)
        final = rsps[-1][0]
        assert final.Status == 0xFE00, hex(final.Status)
        assert final.NumberOfRemainingSuboperations > 0
        assert final.NumberOfCompletedSuboperations + final.NumberOfRemainingSuboperations + \
            final.NumberOfFailedSuboperations == 60
        # The move stopped at the cancel: the destination holds what the final response counts
        # as completed, each once, and no more.
        assert len(dest.received) < 60
        assert sorted(dest.received) == sorted(set(dest.received))
        assert len(dest.received) == final.NumberOfCompletedSuboperations, (len(dest.received), final)
    finally:
        dest.stop()


@pytest.mark.parametrize("how", ["C-MOVE", "stowage send"])
def test_a_study_deleted_during_a_transfer_stops_going_out(make_server, tmp_path, how):
    """A wrong-patient study deleted while a workstation pulls it (or `stowage send` pushes
    it): what the destination already answered stays completed, not one more instance goes
    out, and each one left is a failed sub-operation saying it was deleted."""
    dest = SlowSCP(hold_after=3)
    try:
        cfg = config_with(tmp_path, SLOW=(HOST, dest.port))
        server = make_server("--workers", "2", "--config", str(cfg))
        mr = copies(MR, tmp_path / "mr", 20, "mr")
        store(server.port, mr)
        study = pydicom.dcmread(mr[0]).StudyInstanceUID
        done: dict = {}
        if how == "C-MOVE":
            run = lambda: done.update(rsps=_pyn_move(server.port, "SLOW", {"QueryRetrieveLevel": "STUDY",  # noqa: E731
                                                                         "StudyInstanceUID": study}))
        else:
            run = lambda: done.update(r=stowage("send", "--data-dir", str(server.data_dir), "--config",  # noqa: E731
                                                str(cfg), "--study", study, "--to", "SLOW", "-q"))
        transfer = threading.Thread(target=run, daemon=True)
        transfer.start()
        dest.wait_for(3)  # the third store waits for its answer while the study is deleted
        deleted = cli("delete", "--data-dir", str(server.data_dir), "--study", study, "--yes")
        assert deleted.returncode == 0, deleted.stderr
        dest.go_on.set()
        transfer.join(120)
        assert not transfer.is_alive()
        assert len(dest.received) == 3, dest.received
        if how == "C-MOVE":
            final = done["rsps"][-1][0]
            assert final.Status == 0xB000, hex(final.Status)  # some completed, the rest failed
            assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 17)
            assert "deleted" in final.ErrorComment, final.ErrorComment
            failed = set(done["rsps"][-1][1].FailedSOPInstanceUIDList)
            sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr}
            assert failed == sent - set(dest.received)
        else:
            r = done["r"]
            assert r.returncode == 1, r.stdout + r.stderr
            assert "3 completed, 0 warning, 17 failed" in r.stdout, r.stdout
            assert "deleted from the archive during the transfer" in r.stderr, r.stderr
    finally:
        dest.go_on.set()
        dest.stop()


def test_move_of_several_hundred_instances(archive, tmp_path):
    server, dest, _impl, _cfg = archive
    mr = copies(MR, tmp_path / "mr", 400, "mr")
    store(server.port, mr)
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": pydicom.dcmread(mr[0]).StudyInstanceUID,
            "SeriesInstanceUID": pydicom.dcmread(mr[0]).SeriesInstanceUID}
    r = movescu(server.port, "S", "DEST", keys, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Received Final Move Response (Success)" in r.stderr + r.stdout
    want = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr}
    assert set(dest.received()) == want


def test_pending_responses_are_spaced_by_pending_interval(make_server, tmp_path, scps):  # noqa: F811
    """By default at most one pending response per 0.1 s (PS3.4 makes them optional): a
    fast move of 300 instances gets far fewer than 300, the first right after the first
    sub-operation, each with counts that add up, then the final one with all of them."""
    dest = scps(tmp_path / "rx", "+xa", nodelay=True)
    server = make_server("--workers", "2", "--config", str(config_with(tmp_path, DEST=(HOST, dest.port))))
    mr = copies(MR, tmp_path / "mr", 300, "mr")
    store(server.port, mr)
    rsps = _pyn_move(server.port, "DEST", {"QueryRetrieveLevel": "STUDY",
                                          "StudyInstanceUID": pydicom.dcmread(mr[0]).StudyInstanceUID})
    pending, (final, _) = [s for s, _ in rsps[:-1]], rsps[-1]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 300
    assert all(s.Status == 0xFF00 for s in pending)
    assert 1 <= len(pending) < 300, f"{len(pending)} pending responses for 300 sub-operations"
    assert pending[0].NumberOfRemainingSuboperations == 299
    remaining = [s.NumberOfRemainingSuboperations for s in pending]
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == len(remaining)
    for s in pending:
        assert s.NumberOfRemainingSuboperations + s.NumberOfCompletedSuboperations + \
            s.NumberOfFailedSuboperations + s.NumberOfWarningSuboperations == 300
    assert len(dest.received()) == 300


class FlakySCP:
    """A pynetdicom Storage SCP (MR) that, the first time it receives `victim`, either
    drops the connection (mode "drop") or leaves the response unsent (mode "stall": a lost
    response, as the sender sees it) until the sender sends `victim` again, at most
    `delay` s; `retried_while_stalled` says whether the sender did (noted by the handler of
    the second copy, before its response goes out)."""

    def __init__(self, victim: str, mode: str, delay: float = 0.0) -> None:
        import threading
        self.port, self.victim, self.mode, self.delay = free_port(), victim, mode, delay
        self.received: list[str] = []
        self.originators: set[tuple[str, int]] = set()
        self.retried = threading.Event()
        self.stalling = False
        self.retried_while_stalled = False
        ae = AE("FLAKY")
        ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server((HOST, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:
        import socket
        uid = str(event.request.AffectedSOPInstanceUID)
        first = uid not in self.received
        self.received.append(uid)
        rq = event.request
        self.originators.add((str(rq.MoveOriginatorApplicationEntityTitle).strip(), int(rq.MoveOriginatorMessageID)))
        if uid == self.victim and not first:
            self.retried_while_stalled = self.stalling
            self.retried.set()
        if uid == self.victim and first:
            if self.mode == "drop":
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
            else:  # the stall is the behaviour under test; it ends when the sender retries
                self.stalling = True
                self.retried.wait(self.delay)
                self.stalling = False
        return 0

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("mode", ["drop", "stall"])
def test_move_survives_a_dropped_sub_association_and_a_lost_response(make_server, tmp_path, mode):
    mr = copies(MR, tmp_path / "mr", 12, "mr")
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr]
    dest = FlakySCP(uids[5], mode, delay=60.0)
    try:
        cfg = config_with(tmp_path, FLAKY=(HOST, dest.port))
        server = make_server("--workers", "2", "--config", str(cfg), STOWAGE_DIMSE_TIMEOUT="1.5")
        store(server.port, mr)
        keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": pydicom.dcmread(mr[0]).StudyInstanceUID,
                "SeriesInstanceUID": pydicom.dcmread(mr[0]).SeriesInstanceUID}
        rsps = _pyn_move(server.port, "FLAKY", keys)
        final = rsps[-1][0]
        assert final.Status == 0x0000, hex(final.Status)
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (12, 0)
        assert dest.received.count(uids[5]) == 2, "the sub-operation was not retried"
        assert set(dest.received) == set(uids)
        assert dest.originators == {("PYNMOVE", 1)}, "each sub-operation names the C-MOVE it serves"
        if mode == "stall":  # it gave up on the lost response (dimse_timeout) instead of waiting it out
            assert dest.retried_while_stalled, "the move waited for the lost response instead of retrying"
    finally:
        dest.stop()


class CountingSCP:
    """A pynetdicom MR Storage SCP that takes at most `limit` associations at once
    (rejecting more, as pynetdicom does) and records which association each store came on."""

    def __init__(self, limit: int, delay: float = 0.01) -> None:
        self.port, self.delay = free_port(), delay
        self.stores: list[tuple[str, int]] = []
        ae = AE("COUNTING")
        ae.maximum_associations = limit
        ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server((HOST, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:
        time.sleep(self.delay)  # a destination that takes a moment per instance
        self.stores.append((str(event.request.AffectedSOPInstanceUID), id(event.assoc)))
        return 0

    def stop(self) -> None:
        self.server.shutdown()


def test_move_on_parallel_associations_and_to_a_peer_that_takes_one(make_server, tmp_path):
    mr = copies(MR, tmp_path / "mr", 40, "mr")
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr}
    wide, narrow = CountingSCP(limit=10), CountingSCP(limit=1)
    try:
        cfg = config_with(tmp_path, WIDE=(HOST, wide.port, 3), NARROW=(HOST, narrow.port, 3))
        server = make_server("--workers", "1", "--config", str(cfg))
        store(server.port, mr)
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": pydicom.dcmread(mr[0]).StudyInstanceUID}
        for dest, scp in (("WIDE", wide), ("NARROW", narrow)):
            final = _pyn_move(server.port, dest, keys)[-1][0]
            assert final.Status == 0x0000, (dest, hex(final.Status))
            assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (40, 0)
            got = [uid for uid, _assoc in scp.stores]
            assert sorted(got) == sorted(uids), f"{dest}: each instance exactly once"
        assert len({assoc for _uid, assoc in wide.stores}) == 3, "WIDE: three associations at once"
        assert len({assoc for _uid, assoc in narrow.stores}) == 1
    finally:
        wide.stop()
        narrow.stop()
