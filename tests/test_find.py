"""C-FIND against a running archive, with real peers: DCMTK findscu and pynetdicom, every
model and level, cancel, failures with their Error Comments, relational queries through
extended negotiation, character sets, and queries while stores are in flight."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

import find_corpus as fc
from stowage.catalog.keys import models
from conftest import CT, HOST, MR, Server, copies, dcmtk, free_port, storescu, wait_for

PATIENT_ROOT, STUDY_ROOT, PS_ONLY = (m.find for m in models().values())
MWL_FIND = "1.2.840.10008.5.1.4.31"
S11, S12, S21 = fc.uid(1, 1), fc.uid(1, 2), fc.uid(2, 1)
CANCEL_SERIES_SIZE = 1500  # enough matches that a C-CANCEL lands while they are still being sent



@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A running archive (2 workers) holding the corpus, stored with DCMTK storescu, plus a
    series of CANCEL_SERIES_SIZE instances."""
    tmp = tmp_path_factory.mktemp("find")
    server = Server(tmp / "data", free_port(), ["--workers", "2"]).start()
    try:
        storescu(server.port, fc.write(fc.datasets() + fc.charset_datasets(), tmp / "corpus"))
        big = copies(MR, tmp / "big", CANCEL_SERIES_SIZE, "big")
        storescu(server.port, big)
        server.big_series = pydicom.dcmread(big[0], stop_before_pixels=True).SeriesInstanceUID
        server.big_study = pydicom.dcmread(big[0], stop_before_pixels=True).StudyInstanceUID
        yield server
    finally:
        server.kill()


def associate(port: int, *sop_classes: str, relational: bool = False):
    ae = AE("FINDTEST")
    for uid in sop_classes or (PATIENT_ROOT, STUDY_ROOT, PS_ONLY):
        ae.add_requested_context(uid)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ext = []
    if relational:
        for uid in sop_classes:
            item = SOPClassExtendedNegotiation()
            item.sop_class_uid = uid
            item.service_class_application_information = b"\x01"
            ext.append(item)
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", ext_neg=ext or None)
    assert assoc.is_established
    return assoc


def find(port: int, sop_class: str, ds: Dataset, relational: bool = False) -> tuple[int, list[Dataset], Dataset]:
    """(final status, identifiers, final status data set) of one C-FIND."""
    assoc = associate(port, sop_class, relational=relational)
    try:
        results, final = [], None
        for status, ident in assoc.send_c_find(ds, sop_class):
            assert status is not None and "Status" in status, "no response (timeout or abort)"
            if status.Status in (0xFF00, 0xFF01):
                results.append(ident)
            else:
                final = status
        return final.Status, results, final
    finally:
        assoc.release()


q = fc.identifier


def uids(results: list[Dataset], keyword: str) -> list[str]:
    return sorted(str(r.get(keyword)) for r in results)


# --- every model and level, pynetdicom ------------------------------------------------------

CASES = [
    (PATIENT_ROOT, "PATIENT", dict(PatientID="PAT-1", PatientName="", NumberOfPatientRelatedInstances=""),
     "PatientID", ["PAT-1"]),
    (PATIENT_ROOT, "STUDY", dict(PatientID="PAT-1", StudyInstanceUID="", StudyDate=""), "StudyInstanceUID", [S11, S12]),
    (PATIENT_ROOT, "SERIES", dict(PatientID="PAT-1", StudyInstanceUID=S11, SeriesInstanceUID="", Modality=""),
     "SeriesInstanceUID", [fc.uid(1, 1, 1), fc.uid(1, 1, 2)]),
    (PATIENT_ROOT, "IMAGE", dict(PatientID="PAT-1", StudyInstanceUID=S12, SeriesInstanceUID=fc.uid(1, 2, 1),
                                 SOPInstanceUID=""), "SOPInstanceUID", [fc.uid(1, 2, 1, 1), fc.uid(1, 2, 1, 2)]),
    (STUDY_ROOT, "STUDY", dict(PatientName="SMYTHE*", StudyInstanceUID=""), "StudyInstanceUID", [S21]),
    (STUDY_ROOT, "SERIES", dict(StudyInstanceUID=S21, SeriesInstanceUID="", NumberOfSeriesRelatedInstances=""),
     "SeriesInstanceUID", [fc.uid(2, 1, 1)]),
    (STUDY_ROOT, "IMAGE", dict(StudyInstanceUID=S11, SeriesInstanceUID=fc.uid(1, 1, 2), SOPInstanceUID="",
                               SOPClassUID=""), "SOPInstanceUID", [fc.uid(1, 1, 2, 1)]),
    (PS_ONLY, "PATIENT", dict(PatientID="PAT-2", PatientName=""), "PatientID", ["PAT-2"]),
    (PS_ONLY, "STUDY", dict(PatientID="PAT-2", StudyInstanceUID="", ModalitiesInStudy=""), "StudyInstanceUID", [S21]),
]


@pytest.mark.parametrize("sop_class, level, keys, unique, expected", CASES,
                         ids=[f"{models()[c[0]].name}-{c[1]}" for c in CASES])
def test_pynetdicom_every_model_and_level(archive, sop_class, level, keys, unique, expected):
    status, results, _ = find(archive.port, sop_class, q(level, **keys))
    assert status == 0x0000
    assert uids(results, unique) == expected
    for r in results:
        assert r.QueryRetrieveLevel == level and r.RetrieveAETitle == "STOWAGE"
        assert set(keys) <= set(r.dir())


def findscu(port: int, model_flag: str, out: Path, *keys: str, extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, list[Dataset]]:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), model_flag, "-aec", "STOWAGE", "-X", "-od", str(out), *extra]
    for k in keys:
        args += ["-k", k]
    r = subprocess.run([*args, HOST, str(port)], capture_output=True, text=True, timeout=120)
    return r, [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


FLAGS = {PATIENT_ROOT: "-P", STUDY_ROOT: "-S", PS_ONLY: "-O"}


@pytest.mark.parametrize("sop_class, level, keys, unique, expected", CASES,
                         ids=[f"{models()[c[0]].name}-{c[1]}" for c in CASES])
def test_findscu_every_model_and_level(archive, tmp_path, sop_class, level, keys, unique, expected):
    args = [f"QueryRetrieveLevel={level}"] + [f"{k}={v}" for k, v in keys.items()]
    r, results = findscu(archive.port, FLAGS[sop_class], tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert uids(results, unique) == expected


def test_the_audit_line_keeps_its_log_level_and_names_the_query_level(archive, tmp_path):
    """A C-FIND's audit line in audit.jsonl: "level" is the line's log level, as on every
    other line (a log pipeline filters on it); the query's level is "query_level" (it was
    "level", which overwrote the log level with "STUDY")."""
    r, _results = findscu(archive.port, FLAGS[STUDY_ROOT], tmp_path, "QueryRetrieveLevel=STUDY",
                          "PatientID=X", "StudyInstanceUID=", extra=("-aet", "LEVELPROBE"))
    assert r.returncode == 0, r.stderr

    def the_line() -> dict | None:
        for line in (archive.data_dir / "audit.jsonl").read_text().splitlines():
            d = json.loads(line)
            if d.get("event") == "find" and d.get("calling_ae") == "LEVELPROBE":
                return d
        return None
    line = wait_for(the_line, 30, "the C-FIND's audit line")
    assert line["level"] == "info" and line["query_level"] == "STUDY", line


def test_findscu_matching_types(archive, tmp_path):
    def studies(*keys: str) -> list[str]:
        out = tmp_path / f"q{time.monotonic_ns()}"
        r, results = findscu(archive.port, "-S", out, "QueryRetrieveLevel=STUDY", "StudyInstanceUID=",
                             "AccessionNumber=ACC-*", *keys)
        assert r.returncode == 0, r.stderr
        return uids(results, "StudyInstanceUID")
    assert studies("PatientName=SM?TH*") == [S11, S12, S21]
    assert studies("StudyDate=20240101-20240131") == [S11, fc.uid(3, 1)]
    assert studies("StudyDate=20231231-20240110", "StudyTime=2359-1015") == sorted([S11, S21, fc.uid(3, 1)])
    assert studies(f"StudyInstanceUID={S12}\\{S21}") == [S12, S21]
    assert studies(f"PatientID={fc.INJECTION}") == [fc.uid(3, 1)]
    assert studies("StudyDescription=100%_SURE") == [S21]
    assert studies("(0008,1032)[0].CodeValue=MR001") == [S12]


# --- cancel -----------------------------------------------------------------------------------


def _encode(ds: Dataset, implicit: bool) -> BytesIO:
    from pydicom.filebase import DicomBytesIO
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    write_dataset(fp, ds)
    return BytesIO(fp.getvalue())


@contextmanager
def paused(assoc):
    """Hold the SCU's own reactor (as pynetdicom's send_c_* do), so that responses read with
    the low-level DIMSE calls below are not taken by it."""
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + 10
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0001)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def test_cancel_with_pynetdicom(archive):
    """C-CANCEL after the first match (pynetdicom drops a C-CANCEL that arrives before
    the request is dispatched): the SCP stops with Cancel before its 300 matches are out,
    and the association goes on."""
    assoc = associate(archive.port, STUDY_ROOT)
    try:
        cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == STUDY_ROOT)
        req = C_FIND()
        req.MessageID, req.AffectedSOPClassUID, req.Priority = 5, STUDY_ROOT, 2
        req.Identifier = _encode(q("IMAGE", StudyInstanceUID=archive.big_study, SeriesInstanceUID=archive.big_series,
                                   SOPInstanceUID=""), cx.transfer_syntax[0].is_implicit_VR)
        pending, final = 0, None
        with paused(assoc):
            assoc.dimse.send_msg(req, cx.context_id)
            while final is None:
                _cx, rsp = assoc.dimse.get_msg(block=True)
                assert rsp is not None, "no response"
                if rsp.Status == 0xFF00:
                    pending += 1
                    if pending == 1:
                        assoc.send_c_cancel(5, cx.context_id)
                else:
                    final = rsp.Status
        assert final == 0xFE00
        assert pending < CANCEL_SERIES_SIZE
        got = [i for s, i in assoc.send_c_find(q("STUDY", StudyInstanceUID=S11), STUDY_ROOT) if s.Status == 0xFF00]
        assert len(got) == 1  # the association still serves the next request
    finally:
        assoc.release()


def test_cancel_with_findscu(archive, tmp_path):
    r, results = findscu(archive.port, "-S", tmp_path, "QueryRetrieveLevel=IMAGE",
                         f"StudyInstanceUID={archive.big_study}", f"SeriesInstanceUID={archive.big_series}",
                         "SOPInstanceUID=", extra=("--cancel", "2", "-v"))
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    assert "Final Find Response (Cancel" in log
    assert len(results) < CANCEL_SERIES_SIZE


# --- failures -------------------------------------------------------------------------------------


def _without_level() -> Dataset:
    ds = Dataset()
    ds.PatientID = "PAT-1"
    return ds


@pytest.mark.parametrize("sop_class, ds, status, words", [
    (STUDY_ROOT, _without_level(), 0xA900, "Level"),
    (STUDY_ROOT, q("FRAME", PatientID="PAT-1"), 0xA900, "Level"),
    (STUDY_ROOT, q("PATIENT", PatientID="PAT-1"), 0xA900, "Level"),
    (PS_ONLY, q("STUDY", PatientID="PAT-1", SeriesInstanceUID=""), 0xA900, "SERIES"),
    (PS_ONLY, q("SERIES", SeriesInstanceUID=""), 0xA900, "Level"),
    (STUDY_ROOT, q("SERIES", StudyInstanceUID=f"{S11}\\{S12}", SeriesInstanceUID=""), 0xA900, "one value"),
])
def test_failures_carry_status_and_error_comment(archive, sop_class, ds, status, words):
    got, results, final = find(archive.port, sop_class, ds)
    assert got == status and results == []
    comment = str(final.ErrorComment)
    assert words in comment and len(comment) <= 64


def test_unsupported_sop_class(archive):
    """A SOP class we do not serve is refused at negotiation; a C-FIND whose Affected SOP
    Class is not its presentation context's gets 0x0122 (SOP Class not supported)."""
    ae = AE("FINDTEST")
    ae.add_requested_context(MWL_FIND)
    ae.add_requested_context(STUDY_ROOT)
    assoc = ae.associate(HOST, archive.port, ae_title="STOWAGE")
    try:
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == [STUDY_ROOT]
        assert [c.abstract_syntax for c in assoc.rejected_contexts] == [MWL_FIND]
        cx = assoc.accepted_contexts[0]
        req = C_FIND()
        req.MessageID, req.AffectedSOPClassUID, req.Priority = 7, PATIENT_ROOT, 2
        req.Identifier = _encode(q("STUDY", PatientID=""), cx.transfer_syntax[0].is_implicit_VR)
        with paused(assoc):
            assoc.dimse.send_msg(req, cx.context_id)
            _cx, rsp = assoc.dimse.get_msg(block=True)
        assert rsp.Status == 0x0122 and 0 < len(rsp.ErrorComment) <= 64
    finally:
        assoc.release()


# --- relational queries --------------------------------------------------------------------------


def test_relational_queries_through_extended_negotiation(archive):
    assoc = associate(archive.port, STUDY_ROOT, relational=True)
    try:
        assert assoc.acceptor.sop_class_extended.get(STUDY_ROOT) == b"\x01"
        got = [i for s, i in assoc.send_c_find(q("STUDY", PatientID="PAT-1", StudyInstanceUID="", Modality="MR"),
                                                  STUDY_ROOT) if s.Status == 0xFF00]
        assert uids(got, "StudyInstanceUID") == [S12]
        series = [i for s, i in assoc.send_c_find(q("SERIES", StudyInstanceUID=f"{S11}\\{S12}", SeriesInstanceUID=""),
                                                     STUDY_ROOT) if s.Status == 0xFF00]
        assert len(series) == 3
    finally:
        assoc.release()
    status, got, _ = find(archive.port, STUDY_ROOT, q("STUDY", PatientID="PAT-1", StudyInstanceUID="", Modality="MR"))
    assert status == 0 and uids(got, "StudyInstanceUID") == [S11, S12]  # hierarchical: Modality not matched


# --- character sets --------------------------------------------------------------------------------


@pytest.mark.parametrize("charset, name, expected", [
    ("\\ISO 2022 IR 87", "山田*", ["Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"]),
    ("ISO_IR 192", "王^小*", ["Wang^XiaoDong=王^小東", "Wang^XiaoDong=王^小东"]),
    ("\\ISO 2022 IR 149", "홍^길동", ["Hong^Gildong=洪^吉洞=홍^길동"]),
    ("ISO_IR 100", "Buc^J*", ["Buc^Jérôme"]),
    (None, "Yamada*", ["Yamada^Tarou=山田^太郎=やまだ^たろう"]),
])
def test_character_sets(archive, charset, name, expected):
    status, results, _ = find(archive.port, STUDY_ROOT, q("STUDY", charset, PatientName=name, StudyInstanceUID=""))
    assert status == 0
    assert sorted(str(r.PatientName) for r in results) == sorted(expected)
    for r in results:  # non-ASCII responses always state their character set
        assert "SpecificCharacterSet" in r


def test_mislabelled_instance_does_not_break_queries(archive):
    status, results, _ = find(archive.port, STUDY_ROOT, q("STUDY", PatientID="CP1252", PatientName="",
                                                          StudyInstanceUID="", OtherPatientIDs=""))
    assert status == 0 and len(results) == 1


def test_findscu_utf8_query(archive, tmp_path):
    r, results = findscu(archive.port, "-S", tmp_path, "QueryRetrieveLevel=STUDY", "SpecificCharacterSet=ISO_IR 192",
                         "PatientName=*=王^小東*", "StudyInstanceUID=")
    assert r.returncode == 0, r.stderr
    assert [str(x.PatientName) for x in results] == ["Wang^XiaoDong=王^小東"]
    assert results[0].SpecificCharacterSet == "ISO_IR 192"


# --- freshness -----------------------------------------------------------------------------------


def test_read_your_writes_across_associations(archive, tmp_path):
    """Each acknowledged store is found at once by a C-FIND on another association (which
    the acceptor may hand to the other worker)."""
    files = copies(CT, tmp_path / "fresh", 6, "fresh")
    store = AE("STORETEST")
    store.add_requested_context(pydicom.dcmread(files[0]).SOPClassUID, "1.2.840.10008.1.2.1")
    for path in files:
        ds = pydicom.dcmread(path)
        a = store.associate(HOST, archive.port, ae_title="STOWAGE")
        assert a.send_c_store(ds).Status == 0
        a.release()
        status, results, _ = find(archive.port, STUDY_ROOT, q("IMAGE", StudyInstanceUID=ds.StudyInstanceUID,
                                                              SeriesInstanceUID=ds.SeriesInstanceUID,
                                                              SOPInstanceUID=ds.SOPInstanceUID))
        assert status == 0 and len(results) == 1, f"{path.name} acknowledged but not found"


def test_queries_while_stores_are_in_flight(archive, tmp_path):
    files = copies(CT, tmp_path / "flight", 150, "flight")
    series = pydicom.dcmread(files[0], stop_before_pixels=True)
    ds = q("SERIES", StudyInstanceUID=series.StudyInstanceUID, SeriesInstanceUID=series.SeriesInstanceUID,
           NumberOfSeriesRelatedInstances="")
    errors: list[str] = []

    def send() -> None:
        # In five associations with a pause after each, so that queries see the series part
        # stored however fast storescu is (one association relied on its Nagle delays).
        for at in range(0, len(files), 30):
            storescu(archive.port, files[at:at + 30])
            time.sleep(0.3)

    sender = threading.Thread(target=send)
    seen = []
    sender.start()
    deadline = time.monotonic() + 120
    while sender.is_alive() and time.monotonic() < deadline:
        status, results, _ = find(archive.port, STUDY_ROOT, ds)
        if status != 0:
            errors.append(f"status 0x{status:04X}")
        seen.append(int(results[0].NumberOfSeriesRelatedInstances) if results else 0)
    sender.join(timeout=120)
    assert not sender.is_alive(), "storescu still sending after 120 s"
    assert not errors
    # The order below means something only if queries ran while the series was being stored:
    # at least two of them, one of which saw part of it.
    assert len(seen) >= 2 and any(0 < n < len(files) for n in seen), f"no query saw the stores in flight: {seen}"
    assert seen == sorted(seen), f"a query saw fewer instances than an earlier one: {seen}"
    assert seen[-1] <= len(files), seen
    status, results, _ = find(archive.port, STUDY_ROOT, ds)
    assert status == 0 and int(results[0].NumberOfSeriesRelatedInstances) == len(files)


def test_each_pending_response_is_one_pdu(archive):
    """Pending responses go out as one P-DATA-TF holding the command and the identifier
    (workers/find.py); a client reading raw PDUs sees every match, then the final status."""
    from stowage.bench.harness.find_client import _PDV, FindClient, _command, _encode
    client = FindClient(HOST, archive.port, "STOWAGE", STUDY_ROOT)
    try:
        ds = q("IMAGE", StudyInstanceUID=archive.big_study, SeriesInstanceUID=archive.big_series, SOPInstanceUID="")
        client._send_pdvs([(0x01, _command(STUDY_ROOT, 1)), (0x00, _encode(ds))])
        shapes = []
        while True:
            pdu_type, body = client._read_pdu()
            assert pdu_type == 0x04
            pdvs, pos = [], 0
            while pos < len(body):
                length, _cx, control = _PDV.unpack_from(body, pos)
                pdvs.append(control)
                pos += 4 + length
            shapes.append(tuple(pdvs))
            if pdvs == [0x03]:  # the final response: a command without a data set
                break
        assert shapes[:-1] == [(0x03, 0x02)] * CANCEL_SERIES_SIZE
    finally:
        client.close()


def test_a_worker_takes_more_than_ten_query_associations_at_once(make_server):
    """Only the acceptor's cap limits associations: pynetdicom's own default (10 per AE)
    must not refuse the eleventh C-FIND association a worker serves."""
    server = make_server("--workers", "1")
    ae = AE("MANY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root FIND
    ae.acse_timeout = 10
    held = []
    try:
        for _ in range(14):
            held.append(ae.associate(HOST, server.port, ae_title="STOWAGE"))
        assert [a.is_established for a in held] == [True] * 14
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        statuses = [status.Status for status, _ident in held[-1].send_c_find(ds, "1.2.840.10008.5.1.4.1.2.2.1")]
        assert statuses[-1] == 0x0000
    finally:
        for a in held:
            if a.is_established:
                a.release()
