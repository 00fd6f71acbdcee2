"""Orthanc as stowage's Query/Retrieve SCU, the way a site's Orthanc front end (or a viewer
built on it) reaches the archive through its REST API: C-ECHO, C-FIND at the study level
and then down to series and instances (Orthanc's own keys and character set), C-MOVE of a
study to itself from a query answer, and a patient-level C-MOVE. What arrives in Orthanc is
checked against what was stored: the same instances, the same pixel data."""
from __future__ import annotations

import urllib.request
from io import BytesIO

import pydicom

from conftest import CT, HOST, MR, copies, storescu, wait_for


def _content(orthanc, query: str, n: int) -> list[dict]:
    """The answers of an Orthanc query, each as {keyword-ish name: value} (Orthanc's simplify)."""
    answers = orthanc.rest("GET", f"/queries/{query}/answers")
    assert len(answers) == n, answers
    return [orthanc.rest("GET", f"/queries/{query}/answers/{a}/content?simplify") for a in answers]


def _received(orthanc) -> dict[str, pydicom.Dataset]:
    """What Orthanc holds, by SOP Instance UID, read from its own files."""
    out = {}
    for iid in orthanc.rest("GET", "/instances"):
        with urllib.request.urlopen(f"http://{HOST}:{orthanc.http_port}/instances/{iid}/file", timeout=60) as r:
            ds = pydicom.dcmread(BytesIO(r.read()))
        out[str(ds.SOPInstanceUID)] = ds
    return out


def test_orthanc_finds_and_moves_studies_from_stowage(make_server, orthancs, tmp_path):
    orthanc = orthancs(tmp_path / "orthanc", {})
    config = tmp_path / "stowage.toml"
    config.write_text(f'[remotes.ORTHANC]\nhost = "{HOST}"\nport = {orthanc.dicom_port}\n')
    server = make_server("--workers", "2", "--config", str(config))
    orthanc.rest("PUT", "/modalities/stowage", {"AET": "STOWAGE", "Host": HOST, "Port": server.port})
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    mr = copies(MR, tmp_path / "mr", 2, "mr")
    storescu(server.port, ct + mr)
    ct_ds, mr_ds = pydicom.dcmread(ct[0]), pydicom.dcmread(mr[0])

    orthanc.rest("POST", "/modalities/stowage/echo", {})

    # C-FIND, study level, by Patient ID, with return keys Orthanc users ask for
    found = orthanc.rest("POST", "/modalities/stowage/query", {
        "Level": "Study", "Query": {"PatientID": str(ct_ds.PatientID), "StudyDescription": "", "StudyDate": "",
                                    "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}})
    [study] = _content(orthanc, found["ID"], 1)
    assert study["StudyInstanceUID"] == ct_ds.StudyInstanceUID
    assert study["PatientID"] == ct_ds.PatientID and study["StudyDate"] == ct_ds.StudyDate
    assert study["ModalitiesInStudy"] == "CT" and study["NumberOfStudyRelatedInstances"] == "3"

    # ... then down to its series and their instances, as Orthanc Explorer's query pages do
    series_query = orthanc.rest("POST", f"/queries/{found['ID']}/answers/0/query-series",
                                {"Query": {"Modality": "", "SeriesNumber": "", "NumberOfSeriesRelatedInstances": ""}})
    [series] = _content(orthanc, series_query["ID"], 1)
    assert series["SeriesInstanceUID"] == ct_ds.SeriesInstanceUID, series
    assert (series["Modality"], series["NumberOfSeriesRelatedInstances"]) == ("CT", "3"), series
    instances_query = orthanc.rest("POST", f"/queries/{series_query['ID']}/answers/0/query-instances", {})
    listed = {a["SOPInstanceUID"] for a in _content(orthanc, instances_query["ID"], 3)}
    stored = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct}
    assert listed == stored

    # A wildcard over every study
    everything = orthanc.rest("POST", "/modalities/stowage/query", {"Level": "Study", "Query": {"PatientName": "*"}})
    assert {a["StudyInstanceUID"] for a in _content(orthanc, everything["ID"], 2)} == \
        {ct_ds.StudyInstanceUID, mr_ds.StudyInstanceUID}

    # C-MOVE of the found study to Orthanc itself
    orthanc.rest("POST", f"/queries/{found['ID']}/answers/0/retrieve",
                 {"TargetAet": "ORTHANC", "Synchronous": True})
    got = _received(orthanc)
    assert set(got) == stored
    for p in ct:
        sent = pydicom.dcmread(p)
        assert got[str(sent.SOPInstanceUID)].PixelData == sent.PixelData
        assert got[str(sent.SOPInstanceUID)].PatientName == sent.PatientName

    # C-MOVE at the patient level (Patient Root), the MR patient's study only
    orthanc.rest("POST", "/modalities/stowage/move", {"Level": "Patient", "TargetAet": "ORTHANC",
                                                      "Resources": [{"PatientID": str(mr_ds.PatientID)}]})
    want = stored | {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mr}
    got = wait_for(lambda: set(r := _received(orthanc)) == want and r, 60,
                   lambda: f"Orthanc holds {sorted(_received(orthanc))}, not the MR study too:\n{server.log()}")
    for p in mr:
        sent = pydicom.dcmread(p)
        assert got[str(sent.SOPInstanceUID)].PixelData == sent.PixelData
