"""Orthanc with its DICOMweb plugin (Debian's orthanc-dicomweb) as a second, independent
DICOMweb client of stowage: configured with stowage in DicomWeb.Servers, it queries
stowage (QIDO-RS), retrieves a study from it (WADO-RS), and STOWs a study to it."""
from __future__ import annotations

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import CT
from orthanc import Orthanc
from web_server import start

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from pathlib import Path
    if not Path(PLUGIN).exists():
        pytest.fail("Orthanc's DICOMweb plugin is not installed: apt-get install orthanc-dicomweb (ops/test.sh does)")
    w = start(tmp_path_factory.mktemp("stowage"))
    try:
        o = Orthanc(tmp_path_factory.mktemp("orthanc"), {}, Plugins=[PLUGIN],
                    DicomWeb={"Enable": True, "Root": "/dicom-web/",
                              "Servers": {"stowage": [f"{w.base}/"]}})
        try:
            yield w, o
        finally:
            o.stop()
    finally:
        w.server.stop()


def test_orthanc_queries_stowage(pair):
    w, o = pair
    found = o.rest("POST", "/dicom-web/servers/stowage/get",
                   {"Uri": "/studies", "Arguments": {"PatientID": "PID-1"}})
    assert len(found) == 1 and found[0]["00100020"]["Value"] == ["PID-1"]
    study = found[0]["0020000D"]["Value"][0]
    series = o.rest("POST", "/dicom-web/servers/stowage/get", {"Uri": f"/studies/{study}/series"})
    assert {s["0020000E"]["Value"][0] for s in series} == set(w.corpus.studies[study])


def test_orthanc_retrieves_a_study_from_stowage(pair):
    w, o = pair
    study = next(s for s, v in w.corpus.studies.items() if len(v) == 2)
    o.rest("POST", "/dicom-web/servers/stowage/retrieve", {"Resources": [{"Study": study}]})
    [orthanc_study] = o.rest("POST", "/tools/lookup", study)
    instances = o.rest("GET", f"/studies/{orthanc_study['ID']}/instances")
    assert len(instances) == 6
    one = instances[0]
    uid = one["MainDicomTags"]["SOPInstanceUID"]
    raw = requests.get(f"http://127.0.0.1:{o.http_port}/instances/{one['ID']}/file").content
    from io import BytesIO
    got = pydicom.dcmread(BytesIO(raw))
    assert got.PixelData == pydicom.dcmread(w.corpus.by_uid[uid]).PixelData


def test_orthanc_stows_a_study_to_stowage(pair, tmp_path):
    w, o = pair
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), "FROM-ORTHANC"
    paths = []
    for i in range(2):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    o.upload(paths)
    [study] = o.rest("POST", "/tools/lookup", ds.StudyInstanceUID)
    o.rest("POST", "/dicom-web/servers/stowage/stow", {"Resources": [study["ID"]]})
    found = w.client().search_for_instances(study_instance_uid=ds.StudyInstanceUID)
    assert len(found) == 2
    back = w.client().retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert back.PatientID == "FROM-ORTHANC" and back.PixelData == ds.PixelData
