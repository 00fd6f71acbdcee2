"""QIDO-RS against a running `stowage serve` (its HTTP port), with dicomweb-client as the
client: the same matching as C-FIND, nested paths, includefield, limit/offset with its
maximum, fuzzy person names, 204 on no match, and the access rules of the port."""
from __future__ import annotations

import pytest
import requests
from requests import HTTPError

from web_server import start


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    w = start(tmp_path_factory.mktemp("qido"), "--config", str(_config(tmp_path_factory)))
    yield w
    w.server.stop()


def _config(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "web.toml"
    p.write_text('http_cors_origins = ["http://viewer.example"]\nqido_max_limit = 4\n')
    return p


def _uids(results, keyword="StudyInstanceUID"):
    tag = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018"}[keyword]
    return {r[tag]["Value"][0] for r in results}


def test_studies_match_like_c_find(web):
    c = web.client()
    studies = web.corpus.studies
    found = c.search_for_studies()
    assert _uids(found) == set(studies)
    doe = c.search_for_studies(search_filters={"PatientName": "DOE*"})
    assert len(doe) == 1 and doe[0]["00100010"]["Value"][0]["Alphabetic"] == "DOE^JOHN"
    assert doe[0]["00201208"]["Value"] == [6] and doe[0]["00201206"]["Value"] == [2]
    assert doe[0]["00080061"]["Value"] == ["CT"]
    assert doe[0]["00081190"]["Value"][0] == f"{web.base}/studies/{_uids(doe).pop()}"
    ranged = c.search_for_studies(search_filters={"StudyDate": "20210101-20211231"})
    assert {r["00100020"]["Value"][0] for r in ranged} == {"PID-2"}
    by_list = c.search_for_studies(search_filters={"StudyInstanceUID": ",".join(list(studies)[:2])})
    assert _uids(by_list) == set(list(studies)[:2])
    by_modality = c.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})
    assert {r["00100020"]["Value"][0] for r in by_modality} == {"PID-2"}
    assert "00100010" in doe[0] and "00080005" not in doe[0] and "00080052" not in doe[0]


def test_nested_series_and_instances(web):
    c = web.client()
    study, series = next((s, v) for s, v in web.corpus.studies.items() if len(v) == 2)
    found = c.search_for_series(study_instance_uid=study)
    assert _uids(found, "SeriesInstanceUID") == set(series)
    assert all(r["00201209"]["Value"] == [3] for r in found)
    one = next(iter(series))
    inst = c.search_for_instances(study_instance_uid=study, series_instance_uid=one)
    assert _uids(inst, "SOPInstanceUID") == set(series[one])
    assert inst[0]["00280010"]["Value"] == [128]  # Rows, from the stored header
    url = inst[0]["00081190"]["Value"][0]
    assert url.startswith(f"{web.base}/studies/{study}/series/{one}/instances/")
    in_study = c.search_for_instances(study_instance_uid=study, search_filters={"InstanceNumber": "2"})
    assert len(in_study) == 2
    top = _uids(c.search_for_series(search_filters={"Modality": "CT"}), "SeriesInstanceUID")
    assert set(series) < top and len(top) == 3  # and the multi-frame CT's
    assert len(c.search_for_series(search_filters={"Modality": "MR"})) == 2


def test_includefield_fuzzy_and_a_sequence_key(web):
    c = web.client()
    got = c.search_for_studies(search_filters={"PatientID": "PID-1"}, fields=["StudyDescription", "00100030"])
    assert got[0]["00081030"]["Value"] == ["CHEST CT"] and "00100030" in got[0]
    everything = c.search_for_instances(search_filters={"PatientID": "PID-1", "InstanceNumber": "1"},
                                        fields=["all"])
    assert everything and "00200032" in everything[0] or "00200013" in everything[0]
    assert not requests.get(f"{web.base}/studies", params={"PatientName": "müller*"}).content
    fuzzy = c.search_for_studies(search_filters={"PatientName": "muller*"}, fuzzymatching=True)
    assert {r["00100020"]["Value"][0] for r in fuzzy} == {"PID-2"}
    r = requests.get(f"{web.base}/studies", params={"ReferencedStudySequence.ReferencedSOPInstanceUID": "1.2.3"})
    assert r.status_code == 204


def test_limit_offset_and_their_maximum(web):
    c = web.client()
    all_instances = c.search_for_instances()
    assert len(all_instances) == 4  # qido_max_limit = 4 in this module's configuration
    r = requests.get(f"{web.base}/instances")
    assert "more matches" in r.headers["Warning"] and r.headers["Warning"].startswith("299 ")
    seen = []
    for offset in range(0, 20, 3):
        seen += c.search_for_instances(limit=3, offset=offset)
    assert len(_uids(seen, "SOPInstanceUID")) == len(web.corpus.by_uid) == len(seen)
    r = requests.get(f"{web.base}/instances", params={"limit": "100000000"})
    assert r.status_code == 200 and len(r.json()) == 4 and "maximum of 4" in r.headers["Warning"]
    r = requests.get(f"{web.base}/instances", params={"limit": str(2**31 - 1), "offset": "2"})  # valid, clipped
    assert r.status_code == 200 and len(r.json()) == 4 and "maximum of 4" in r.headers["Warning"]
    for key in ("limit", "offset"):
        for bad, words in (("-1", "whole number"), ("ten", "whole number"), ("2.5", "whole number"),
                           ("1e3", "whole number"), ("\u00b2", "whole number"), ("", "whole number"),
                           (str(2**31), "at most 2147483647"), ("9" * 40, "at most")):
            r = requests.get(f"{web.base}/studies", params={key: bad})
            assert r.status_code == 400 and key in r.text and words in r.text, (key, bad, r.text)
        r = requests.get(f"{web.base}/studies?{key}=1&{key}=2")
        assert r.status_code == 400 and "given 2 times" in r.text
    assert requests.get(f"{web.base}/studies").status_code == 200  # and it keeps serving


def test_no_match_is_204_and_bad_keys_are_400(web):
    r = requests.get(f"{web.base}/studies", params={"PatientID": "NOBODY"})
    assert r.status_code == 204 and not r.content
    for params, words in (({"NoSuchKeyword": "x"}, "unknown query key"), ({"Rows": "many"}, "number"),
                          ({"PatientName.PatientID": "x"}, "not a sequence"),
                          ({"fuzzymatching": "maybe"}, "fuzzymatching")):
        r = requests.get(f"{web.base}/studies", params=params)
        assert r.status_code == 400 and words in r.text, (params, r.text)
    for path in ("/studies/1.2.x/series", "/studies/..%2F..%2Fetc/series", "/studies/" + "1" * 80 + "/series"):
        r = requests.get(f"{web.base}{path}")
        assert r.status_code in (400, 404) and ("not a valid UID" in r.text or r.status_code == 404), path
    study = next(iter(web.corpus.studies))
    r = requests.delete(f"{web.base}/studies/{study}")  # DELETE is off unless http_delete = true
    assert r.status_code == 405 and "http_delete" in r.text and "DELETE" not in r.headers["Allow"]
    assert requests.get(f"{web.base}/studies/{study}/metadata").status_code == 200
    r = requests.get(f"{web.base}/studies", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406 and "application/dicom+json" in r.text
    with pytest.raises(HTTPError) as e:
        web.client().search_for_studies(search_filters={"SOPClassesInStudy": "x", "NumberOfStudyRelatedInstances": "a"})
    assert e.value.response.status_code == 400


def test_cors_and_the_start_up_line(web):
    log = web.server.log()
    assert "loopback clients only" in log and "no http_tokens configured" in log
    r = requests.options(f"{web.base}/studies", headers={"Origin": "http://viewer.example",
                                                         "Access-Control-Request-Method": "GET"})
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    r = requests.get(f"{web.base}/studies", headers={"Origin": "http://viewer.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    r = requests.get(f"{web.base}/studies", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = requests.options(f"{web.base}/studies", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "GET"})
    assert r.status_code == 403


def test_a_killed_http_process_is_replaced_and_the_port_keeps_answering(web):
    import os
    import signal

    import psutil
    from conftest import wait_for

    def http_processes() -> set[int]:
        return {p.pid for p in psutil.Process(web.server.proc.pid).children(recursive=True)
                if "stowage.engine.web.process" in " ".join(p.cmdline())}
    before = http_processes()
    assert len(before) == 2  # --http-processes 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    for _ in range(20):  # the other process answers meanwhile
        assert requests.get(f"{web.base}/studies", timeout=30).status_code == 200
    wait_for(lambda: len(http_processes() - {victim}) == 2, 30, "a new HTTP process")
    assert "http process" in web.server.log() and "restarting it" in web.server.log()
