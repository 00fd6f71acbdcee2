"""C-GET SCP against DCMTK getscu (bit-preserving) and pynetdicom: every model and level,
byte-exact arrival (explicit, implicit, RLE), conversion for an implicit-only requester,
a refused SOP class counted as failed, cancel."""
from __future__ import annotations

import re
import subprocess
from io import BytesIO
import socket
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelGet

from conftest import CT, HOST, MR, copies, dataset_bytes, dcmtk, echo_ok, wait_for
from test_move import MODELS, identifier, key_options, keys_for
from test_send import RLE_SRC, as_implicit, by_uid, store


def getscu(port: int, model: str, out: Path, keys: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("getscu"), "-v", "+B", f"-{model}", "-aet", "GETSCU", "-aec", "STOWAGE", "-od", str(out), *options,
            *key_options(keys)]
    return subprocess.run(args + [HOST, str(port)], capture_output=True, text=True, timeout=120)


def received(out: Path) -> dict[str, Path]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}


def stored(server, tmp_path: Path, n_ct: int, n_implicit: int,
           n_rle: int) -> tuple[list[Path], list[Path], list[Path], dict[str, Path]]:
    """CT copies (Explicit VR), CT copies in Implicit VR and RLE copies, stored in `server`
    as their files' data set bytes; and those files by SOP Instance UID."""
    ct = copies(CT, tmp_path / "ct", n_ct, "ct")
    imp = as_implicit(CT, tmp_path / "imp", n_implicit, "imp")
    rle = copies(RLE_SRC, tmp_path / "rle", n_rle, "rle")
    store(server.port, ct + imp + rle)
    return ct, imp, rle, by_uid(ct + imp + rle)


def test_get_every_model_and_level_byte_exact(server, tmp_path):
    ct, imp, rle, sources = stored(server, tmp_path, 3, 2, 2)
    cases = {
        ("P", "PATIENT", ct[0]): 5, ("P", "STUDY", ct[0]): 5, ("P", "SERIES", imp[0]): 2, ("P", "IMAGE", ct[2]): 1,
        ("S", "STUDY", imp[0]): 5, ("S", "SERIES", ct[0]): 3, ("S", "IMAGE", imp[1]): 1,
        ("O", "PATIENT", ct[0]): 5, ("O", "STUDY", imp[0]): 5,
    }
    assert set(m for m, _l, _s in cases) == set(MODELS)
    for i, ((model, level, sample), want) in enumerate(cases.items()):
        out = tmp_path / f"got-{i}"
        r = getscu(server.port, model, out, keys_for(sample, model, level))
        assert r.returncode == 0, r.stderr
        assert "Received C-GET Response (Success)" in r.stdout + r.stderr, (model, level, r.stderr)
        got = received(out)
        assert len(got) == want and set(got) <= set(sources), (model, level, sorted(got))
        for uid, path in got.items():  # compared with the file the modality sent
            sent, source = pydicom.dcmread(path), pydicom.dcmread(sources[uid])
            if sent.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID:
                assert dataset_bytes(path) == dataset_bytes(sources[uid]), f"{uid} not byte-exact"
            else:  # getscu proposes one context per class (explicit first): implicit ones converted
                assert source.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
                assert sent == source


def test_get_implicit_only_requester_byte_exact_or_converted(server, tmp_path):
    """DCMTK getscu 3.6.7 always proposes explicit and implicit for storage: pynetdicom
    here proposes implicit VR LE only, so implicit instances arrive byte-exact and the
    explicit and RLE ones are converted."""
    ct, imp, rle, sources = stored(server, tmp_path, 2, 2, 1)
    studies = "\\".join(sorted({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in ct + rle}))
    rsps, got = _pyn_get(server.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": studies},
                         classes=[CTImageStorage, MRImageStorage], syntaxes=["1.2.840.10008.1.2"])
    assert rsps[-1][0].Status == 0x0000
    assert rsps[-1][0].NumberOfCompletedSuboperations == 5
    assert len(got) == 5
    imp_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in imp}
    for uid, (syntax, data) in got.items():
        assert syntax == "1.2.840.10008.1.2"
        if uid in imp_uids:
            assert data == dataset_bytes(sources[uid]), f"{uid} not byte-exact"
        else:
            assert data != dataset_bytes(sources[uid])
            ds = pydicom.dcmread(BytesIO(data), force=True)
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
            assert ds.SOPInstanceUID == uid
            ds.pixel_array  # decodes
    assert got.keys() == imp_uids | {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct + rle}
    # a compressed syntax the requester accepts (DCMTK getscu proposes only uncompressed ones)
    rle_uid = pydicom.dcmread(rle[0], stop_before_pixels=True).SOPInstanceUID
    rsps, got = _pyn_get(server.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": pydicom.dcmread(rle[0]).StudyInstanceUID,
                                       "SeriesInstanceUID": pydicom.dcmread(rle[0]).SeriesInstanceUID,
                                       "SOPInstanceUID": rle_uid}, syntaxes=["1.2.840.10008.1.2.5"])
    (rsps_final, _), = rsps[-1:]
    assert rsps_final.Status == 0x0000
    assert got[rle_uid] == ("1.2.840.10008.1.2.5", dataset_bytes(sources[rle_uid]))


def _pyn_get(port: int, keys: dict[str, str], delay: float = 0.0, cancel_after: int = 0,
             classes=(MRImageStorage,), syntaxes=None) -> tuple[list, dict]:
    got: dict[str, tuple[str, bytes]] = {}

    def on_store(event) -> int:
        time.sleep(delay)
        got[str(event.request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax),
                                                          event.request.DataSet.getvalue())
        return 0

    ae = AE("PYNGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for uid in classes:  # by default MR only: CT has no context
        ae.add_requested_context(uid, syntaxes) if syntaxes else ae.add_requested_context(uid)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 60
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", ext_neg=[build_role(uid, scp_role=True) for uid in classes],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    rsps = []
    try:
        for status, ident in assoc.send_c_get(identifier(keys), StudyRootQueryRetrieveInformationModelGet):
            rsps.append((status, ident))
            if cancel_after and len(rsps) == cancel_after:
                assoc.send_c_cancel(1, query_model=StudyRootQueryRetrieveInformationModelGet)
    finally:
        if assoc.is_established:
            assoc.release()
    return rsps, got


def test_get_counts_a_class_without_context_as_failed(make_server, tmp_path):
    server = make_server("--workers", "2", STOWAGE_PENDING_INTERVAL="0")  # a pending response per sub-operation
    ct = copies(CT, tmp_path / "ct", 2, "ct")
    mr = copies(MR, tmp_path / "mr", 3, "mr")
    store(server.port, ct + mr)
    studies = "\\".join(sorted({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in ct + mr}))
    rsps, got = _pyn_get(server.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": studies})
    final, ident = rsps[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 2)
    assert [s.Status for s, _ in rsps[:-1]] == [0xFF00] * 4
    failed = ident.FailedSOPInstanceUIDList
    assert set([failed] if isinstance(failed, str) else failed) == \
        {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct}
    assert sorted(got) == sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr)


def test_get_cancel(server, tmp_path):
    mr = copies(MR, tmp_path / "mr", 40, "mr")
    store(server.port, mr)
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": pydicom.dcmread(mr[0]).StudyInstanceUID,
            "SeriesInstanceUID": pydicom.dcmread(mr[0]).SeriesInstanceUID}
    rsps, got = _pyn_get(server.port, keys, delay=0.05, cancel_after=3)
    final = rsps[-1][0]
    assert final.Status == 0xFE00, hex(final.Status)
    assert final.NumberOfRemainingSuboperations > 0
    assert len(got) < 40
    assert len(got) == final.NumberOfCompletedSuboperations, (len(got), final)  # it stopped at the cancel


def test_get_requester_that_aborts_mid_transfer(make_server, tmp_path):
    """A requester gone mid-C-GET ends it at once (not after dimse_timeout) and harms nothing."""
    # Timeouts far beyond the wait below: a C-GET that waited for the responses that cannot
    # come would not end within it.
    server = make_server("--workers", "2", STOWAGE_DIMSE_TIMEOUT="900", STOWAGE_NETWORK_TIMEOUT="900")
    mr = copies(MR, tmp_path / "mr", 30, "mr")
    store(server.port, mr)
    seen: list[str] = []

    def on_store(event) -> int:
        seen.append(str(event.request.AffectedSOPInstanceUID))
        if len(seen) == 3:  # an A-ABORT, and gone (pynetdicom's own abort() races its DUL here)
            sock = event.assoc.dul.socket.socket
            sock.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
            sock.shutdown(socket.SHUT_RDWR)
        return 0

    ae = AE("ABORTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 30
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE", ext_neg=[build_role(MRImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    q = pydicom.Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", pydicom.dcmread(mr[0]).StudyInstanceUID
    list(assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet))
    wait_for(lambda: re.search(r"aborted ABORTER from \S+ \(STOWAGE\)", server.log()), 120,
             lambda: "the C-GET's association to end on the abort\n" + server.log()[-3000:])
    assert 3 <= len(seen) < 30
    # what had not gone out when the requester left is failed as such, and none of it arrived
    unsent = set(re.findall(r"C-GET STUDY to ABORTER: (\S+) failed: the association ended before it was sent",
                            server.log()))
    assert unsent and not unsent & set(seen), server.log()[-3000:]
    assert unsent <= {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr}
    assert "timeout" not in server.log().split("ABORTER", 1)[-1], server.log()[-3000:]
    assert "Traceback" not in server.log()
    assert echo_ok(server.port)
