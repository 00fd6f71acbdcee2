"""DIMSE services at their edges, against real peers (DCMTK, pynetdicom): what PS3.4
Annex C says about a C-FIND whose date and time ranges come together without extended
negotiation, what a failed C-MOVE or C-GET tells its requester, and the character set
of a C-FIND response."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import MRImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE

from conftest import CT, HOST, Server, dcmtk, free_port, storescu

# (study, date, time): three days, one study each, at different hours
STUDIES = (("1.2.826.0.1.3680043.2.1143.77.1", "20240101", "090000"),
           ("1.2.826.0.1.3680043.2.1143.77.2", "20240102", "153000"),
           ("1.2.826.0.1.3680043.2.1143.77.3", "20240103", "083000"))


def _write_studies(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(CT)
    paths = []
    for n, (study, date, time) in enumerate(STUDIES):
        ds = src.copy()
        ds.PatientID, ds.StudyDate, ds.StudyTime = f"EDGE{n}", date, time
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, study + ".1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = study + ".1.1"
        paths.append(out / f"{n}.dcm")
        ds.save_as(paths[-1])
    return paths


def _write_japanese(out: Path) -> list[Path]:
    """Two patients stored in UTF-8: a kanji and hiragana name, a half-width katakana one
    (their studies in 1999 at noon, out of the way of the date and time queries)."""
    src = pydicom.dcmread(CT)
    paths = []
    for n, name in enumerate(JAPANESE):
        ds = src.copy()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = f"JIS{n}", name, "19990101", "120000"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.2.1143.78.{n}"
        ds.SeriesInstanceUID = ds.StudyInstanceUID + ".1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.StudyInstanceUID + ".1.1"
        paths.append(out / f"jis{n}.dcm")
        ds.save_as(paths[-1])
    return paths


JAPANESE = ("Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ^ﾀﾛｳ")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One archive (1 worker) for the file, holding STUDIES and the Japanese names, with a
    move destination GONE where nothing listens."""
    tmp = tmp_path_factory.mktemp("edges")
    cfg = tmp / "stowage.toml"
    cfg.write_text(f'[remotes.GONE]\nhost = "{HOST}"\nport = {free_port()}\n')
    server = Server(tmp / "data", free_port(), ["--workers", "1", "--config", str(cfg)], log_dir=tmp).start()
    try:
        storescu(server.port, _write_studies(tmp / "in") + _write_japanese(tmp / "in"))
        yield server
    finally:
        server.kill()



def _find_studies(port: int, ext: bytes | None, **keys: str) -> list[str]:
    """Study Instance UIDs a Study Root STUDY query matches; `ext` the extended
    negotiation bytes asked for (None: no extended negotiation)."""
    ae = AE("EDGEFIND")
    ae.add_requested_context(STUDY_FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    items = []
    if ext is not None:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = STUDY_FIND
        item.service_class_application_information = ext
        items.append(item)
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", ext_neg=items or None)
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    found = []
    try:
        for status, ident in assoc.send_c_find(ds, STUDY_FIND):
            assert status is not None and "Status" in status
            if status.Status == 0xFF00:
                found.append(str(ident.StudyInstanceUID))
            else:
                assert status.Status == 0, hex(status.Status)
    finally:
        assoc.release()
    return sorted(found)


def test_date_and_time_ranges_are_separate_unless_combined_matching_was_negotiated(archive):
    """PS3.4 C.2.2.2.5.1: Study Date 20240101-20240103 with Study Time 0800-1000 is three
    mornings unless the requester asked for combined date-time matching (extended
    negotiation byte 2), when it is one continuum from the 1st 08:00 to the 3rd 10:00.
    DCMTK's findscu never asks: it was given the continuum (the 2nd at 15:30 matched)."""
    server = archive
    morning = {"StudyDate": "20240101-20240103", "StudyTime": "0800-1000"}
    mornings = [STUDIES[0][0], STUDIES[2][0]]
    assert _find_studies(server.port, None, **morning) == mornings
    assert _find_studies(server.port, b"\x01", **morning) == mornings           # relational only
    assert _find_studies(server.port, b"\x00\x01", **morning) == [s for s, _d, _t in STUDIES]
    assert _find_studies(server.port, b"\x01\x01", **morning) == [s for s, _d, _t in STUDIES]
    # DCMTK's findscu, which offers no extended negotiation
    r = subprocess.run([dcmtk("findscu"), "-S", "-aec", "STOWAGE", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", "StudyInstanceUID", "-k", "StudyDate=20240101-20240103",
                        "-k", "StudyTime=0800-1000", HOST, str(server.port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert STUDIES[0][0] in out and STUDIES[2][0] in out and STUDIES[1][0] not in out, out


def test_a_time_range_over_midnight_alone_matches_either_side(archive):
    """Matched on its own (no combined date-time matching), Study Time 1500-0845 is the
    evening and the early morning: 15:30 and 08:30 match, 09:00 does not."""
    server = archive
    assert _find_studies(server.port, None, StudyTime="1500-0845") == [STUDIES[1][0], STUDIES[2][0]]
    assert _find_studies(server.port, None, StudyDate="20240102-", StudyTime="1500-0845") == \
        [STUDIES[1][0], STUDIES[2][0]]
    assert _find_studies(server.port, None, StudyDate="-20240102", StudyTime="1500-0845") == [STUDIES[1][0]]


def _retrieve(port: int, study: str, move_to: str | None = None) -> list[Dataset]:
    """The responses to a Study Root STUDY C-MOVE to `move_to` or, without one, a C-GET
    whose requester takes MR only (the studies are CT)."""
    ae = AE("EDGEQR")
    ae.add_requested_context(STUDY_MOVE if move_to else STUDY_GET)
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", ext_neg=[build_role(MRImageStorage, scp_role=True)])
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", study
    try:
        rsps = assoc.send_c_move(ds, move_to, STUDY_MOVE) if move_to else assoc.send_c_get(ds, STUDY_GET)
        return [status for status, _ident in rsps]
    finally:
        assoc.release()


def test_a_retrieve_whose_sub_operations_all_fail_says_why(archive):
    """0xA702 with only counts left the PACS administrator at the requester guessing: the
    final response's Error Comment now says why the sub-operations failed (an unreachable
    destination, a requester that takes no CT)."""
    server = archive
    final = _retrieve(server.port, STUDIES[0][0], move_to="GONE")[-1]
    assert final.Status == 0xA702 and final.NumberOfFailedSuboperations == 1, final
    assert final.get("ErrorComment") == "GONE is unreachable: Connection refused", final
    assert len(final.ErrorComment) <= 64
    final = _retrieve(server.port, STUDIES[0][0])[-1]  # C-GET, no CT context
    assert final.Status == 0xA702 and final.NumberOfFailedSuboperations == 1, final
    assert final.get("ErrorComment") == "EDGEQR took no context for 1.2.840.10008.5.1.4.1.1.2", final
    assert len(final.ErrorComment) <= 64


def test_a_name_the_requested_character_set_cannot_carry_comes_back_whole(archive):
    """A request in ISO_IR 13 (JIS X 0201: romaji and half-width katakana) for a patient
    stored in UTF-8 with a kanji and hiragana name: Python's shift_jis, which stands for
    ISO_IR 13, writes kanji, so the response was labelled ISO_IR 13 and the name arrived
    as 'Yamada^Tarou=??^??=???^???'. It comes back in the instance's own set; a
    half-width katakana name still comes back in ISO_IR 13."""
    server = archive
    ae = AE("EDGEFIND")
    ae.add_requested_context(STUDY_FIND)
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 13"
    query.QueryRetrieveLevel, query.PatientID, query.PatientName = "STUDY", "JIS*", ""
    got = {}
    try:
        for status, ident in assoc.send_c_find(query, STUDY_FIND):
            if status.Status == 0xFF00:
                got[str(ident.PatientID)] = (str(ident.PatientName), ident.SpecificCharacterSet)
    finally:
        assoc.release()
    assert got == {"JIS0": (JAPANESE[0], "ISO_IR 192"), "JIS1": (JAPANESE[1], "ISO_IR 13")}, got


def test_a_sequence_key_whose_item_holds_only_return_keys_matches_every_entity(archive, tmp_path):
    """`findscu -k "ProcedureCodeSequence[0].CodeValue"` asks for the codes back: an item
    of zero-length keys is return keys only (PS3.4 C.2.2.2.3: universal matching), so it
    must not drop the studies that have no such sequence; it dropped every one."""
    r = subprocess.run([dcmtk("findscu"), "-S", "-aec", "STOWAGE", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", "StudyInstanceUID", "-k", "StudyDate=20240101-20240103",
                        "-k", "ProcedureCodeSequence[0].CodeValue", "-k", "ProcedureCodeSequence[0].CodeMeaning",
                        HOST, str(archive.port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert all(study in out for study, _d, _t in STUDIES), out
    item = Dataset()
    item.CodeValue = "*"  # a lone `*` is universal too
    assert _find_studies(archive.port, None, StudyDate="20240101-20240103",
                         ProcedureCodeSequence=[item]) == [s for s, _d, _t in STUDIES]
    item.CodeValue = "NOPE"  # a real matching key still matches
    assert _find_studies(archive.port, None, StudyDate="20240101-20240103", ProcedureCodeSequence=[item]) == []


def test_sub_operation_counts_beyond_65535_are_sent_as_65535():
    """The counts are US: a C-MOVE or C-GET of more than 65535 instances (a patient's
    whole history) could not encode its first pending response (struct.error), which
    ended the retrieve after one instance; the count now says 65535 until fewer remain.
    (An archive that large takes minutes to fill, too long here: checked by hand with
    65,540 instances moved to an unreachable destination: 0xC000 'internal error' after
    one sub-operation before, pending responses and a final 0xA702 after. This checks
    the encoding the handler uses.)"""
    from io import BytesIO

    from pydicom.filereader import read_dataset
    from pynetdicom.dimse_primitives import C_MOVE

    from stowage.protocol.pynetdicom_patches import retrieve_pending_command
    command = retrieve_pending_command(C_MOVE, 7, "1.2.840.10008.5.1.4.1.2.2.2", (70000, 65536, 1, 0))
    ds = read_dataset(BytesIO(command), True, True)
    assert (ds.NumberOfRemainingSuboperations, ds.NumberOfCompletedSuboperations,
            ds.NumberOfFailedSuboperations, ds.NumberOfWarningSuboperations) == (65535, 65535, 1, 0)
