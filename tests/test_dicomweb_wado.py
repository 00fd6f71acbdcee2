"""WADO-RS against a running `stowage serve`, with dicomweb-client: retrieval byte-exact
with transfer-syntax=*, converted on request, metadata from the catalog with BulkDataURIs,
frames as stored and decoded, bulk data; 404 and 406 with reasons; a series mixing records
held as is (JPEG 2000) and zstd ones byte-exact part by part, and a record damaged on disk
never sent."""
from __future__ import annotations

import http.client
from io import BytesIO

import numpy as np
import pydicom
import pytest
import requests
from requests import HTTPError

from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import CT, HOST, dataset_bytes, wait_for
from stowage.bench.harness.dicomweb_lean import ACCEPT, read_parts
from stowage.engine.store.segment import iter_records
from web_server import c_store, parts, start

JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    # series metadata made ahead 1 s after a series goes quiet (engine/web/stable_series.py)
    cfg = tmp_path_factory.mktemp("cfg") / "wado.toml"
    cfg.write_text("metadata_stable_seconds = 1\n")
    w = start(tmp_path_factory.mktemp("wado"), "--config", str(cfg))
    yield w
    w.server.stop()


def _ct_study(web):
    return next(s for s, v in web.corpus.studies.items() if len(v) == 2)


def _j2k(web):
    return next(uid for uid, p in web.corpus.by_uid.items()
                if pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS)


def _where(web, uid):
    for study, series in web.corpus.studies.items():
        for se, uids in series.items():
            if uid in uids:
                return study, se
    raise KeyError(uid)


def test_study_retrieve_as_stored_is_byte_exact(web):
    c = web.client()
    study = _ct_study(web)
    got = list(c.iter_study(study, media_types=(("application/dicom", "*"),)))
    assert len(got) == 6
    for ds in got:
        buf = BytesIO()
        sent = web.corpus.by_uid[ds.SOPInstanceUID]
        raw = requests.get(f"{web.base}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
                           headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert raw.status_code == 200
        assert dataset_bytes(sent) in raw.content  # the data set exactly as stored
        del buf
    whole = requests.get(f"{web.base}/studies/{study}",
                         headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert whole.status_code == 200 and "Transfer-Encoding" not in whole.headers  # its length known beforehand
    assert int(whole.headers["Content-Length"]) == len(whole.content)
    assert all(dataset_bytes(web.corpus.by_uid[ds.SOPInstanceUID]) in whole.content for ds in got)
    assert whole.content.endswith(b"--\r\n") and whole.content.count(b"\r\nContent-Location: ") == len(got)
    j2k = _j2k(web)
    study, series = _where(web, j2k)
    [inst] = c.retrieve_series(study, series, media_types=(("application/dicom", "*"),))
    assert inst.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS


def test_default_and_named_syntaxes_are_converted(web):
    c = web.client()
    j2k = _j2k(web)
    study, series = _where(web, j2k)
    inst = c.retrieve_instance(study, series, j2k, media_types=("application/dicom",))  # no syntax: the default
    assert inst.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    original = pydicom.dcmread(web.corpus.by_uid[j2k])
    assert np.array_equal(inst.pixel_array, original.pixel_array)
    ct_study = _ct_study(web)
    ct_series = next(iter(web.corpus.studies[ct_study]))
    r = requests.get(f"{web.base}/studies/{ct_study}/series/{ct_series}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'})
    implicit = parts(r)
    assert len(implicit) == 3
    for headers, body in implicit:
        assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2"
        ds = pydicom.dcmread(BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        assert ds.PixelData == pydicom.dcmread(web.corpus.by_uid[ds.SOPInstanceUID]).PixelData
    r = requests.get(f"{web.base}/studies/{ct_study}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert r.status_code == 406 and "transfer-syntax=*" in r.text


def test_series_metadata_comes_with_bulk_data_uris(web):
    c = web.client()
    study = _ct_study(web)
    series = next(iter(web.corpus.studies[study]))
    meta = c.retrieve_series_metadata(study, series)
    assert len(meta) == 3
    for m in meta:
        assert m["00280010"]["Value"] == [128] and m["00100010"]["Value"][0]["Alphabetic"] == "DOE^JOHN"
        uri = m["7FE00010"]["BulkDataURI"]
        assert uri.endswith(f"/instances/{m['00080018']['Value'][0]}/bulkdata/7FE00010")
        assert m["00200032"]["vr"] == "DS"  # Image Position (Patient), for the viewer
    one = meta[0]["00080018"]["Value"][0]
    [inst] = c.retrieve_instance_metadata(study, series, one) and [c.retrieve_instance_metadata(study, series, one)]
    assert inst["00080018"]["Value"] == [one]
    assert len(c.retrieve_study_metadata(study)) == 6
    pixels = c.retrieve_bulkdata(meta[0]["7FE00010"]["BulkDataURI"])
    assert pixels[0] == pydicom.dcmread(web.corpus.by_uid[meta[0]["00080018"]["Value"][0]]).PixelData


def _normal(obj):
    """Numbers as numbers (pydicom writes some DS as floats, we as ints); BulkDataURIs as
    one marker (pydicom names nested ones by their own tag only); an empty value of several
    as null, as PS3.18 F.2.5 writes it (pydicom writes "")."""
    if isinstance(obj, dict):
        return {k: "bulk" if k == "BulkDataURI" else _normal(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normal(v) for v in obj]
    if obj == "":
        return None
    return float(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) else obj


def _special_instances(tmp) -> list:
    """Instances whose attributes the catalog's header cannot all hold: an Icon Image
    Sequence and overlay data (bulk, cut out of the header), a waveform, and a CT with a
    private element after its Pixel Data."""
    out = []
    for name in ("examples_overlay.dcm", "waveform_ecg.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        out.append(ds)
    ct = pydicom.dcmread(CT)
    ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ct.private_block(0x7FE1, "STOWAGE TEST", create=True).add_new(0x01, "LO", "after the pixels")
    out.append(ct)
    paths = []
    for ds in out:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(tmp / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def test_metadata_holds_every_attribute(web):
    """PS3.18 metadata is every attribute but bulk data, which is there as a BulkDataURI that
    gives its bytes: also what the catalog's header leaves out (bulk values it cuts, what
    follows the pixels), and a bulk value inside a sequence."""
    c = web.client()
    paths = _special_instances(web.tmp)
    c_store(web.server.port, paths)
    ct = web.corpus.studies[_ct_study(web)]
    plain = [web.corpus.by_uid[next(iter(ct.values()))[0]]]  # a native slice: from the catalog's header
    plain += [p for p in web.corpus.files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "MR"][:1]
    for path in paths + plain:
        original = pydicom.dcmread(path)
        meta = c.retrieve_instance_metadata(original.StudyInstanceUID, original.SeriesInstanceUID,
                                            original.SOPInstanceUID)
        want = original.to_json_dict(1024, lambda e: "bulk", suppress_invalid_tags=True)
        want = {k: v for k, v in want.items() if not k.endswith("0000") and k not in ("00080005", "FFFCFFFC")}
        assert set(want) <= set(meta), (path.name, sorted(set(want) - set(meta)))
        for key, value in want.items():
            assert _normal(meta[key]) == _normal(value), (path.name, key)
            if "BulkDataURI" in meta[key]:  # the URI gives the value
                [got] = c.retrieve_bulkdata(meta[key]["BulkDataURI"])
                assert got == original[int(key, 16)].value, (path.name, key)
        assert meta["00083002"]["Value"] == [original.file_meta.TransferSyntaxUID]
    overlay = pydicom.dcmread(paths[0])
    meta = c.retrieve_instance_metadata(overlay.StudyInstanceUID, overlay.SeriesInstanceUID, overlay.SOPInstanceUID)
    icon = meta["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert icon.endswith("/bulkdata/00880200.0.7FE00010")
    assert c.retrieve_bulkdata(icon) == [overlay.IconImageSequence[0].PixelData]
    tail = pydicom.dcmread(paths[2])
    meta = c.retrieve_series_metadata(tail.StudyInstanceUID, tail.SeriesInstanceUID)
    assert meta[0]["7FE11001"]["Value"] == ["after the pixels"]  # past the Pixel Data: not in the header
    r = requests.get(f"{web.base}/studies/{tail.StudyInstanceUID}/series/{tail.SeriesInstanceUID}/instances/"
                     f"{tail.SOPInstanceUID}/bulkdata/7FE00010.x")
    assert r.status_code == 400 and "eight hex digits" in r.text


def _slices(tmp, n: int, study: str, series: str, first: int = 1) -> list:
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    paths = []
    for i in range(first, first + n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i
        paths.append(tmp / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def test_series_metadata_is_made_once_the_series_is_stable(web, tmp_path):
    """A series that has received nothing for metadata_stable_seconds has its metadata made
    with no request (engine/web/stable_series.py): the kept file appears by itself, the first
    request is answered from it (not made again), and is what the stored slices say; a slice
    that joins later gets the series made anew, again with no request."""
    import zstandard
    from stowage.engine.store.series_cache import SeriesCache
    study, series = generate_uid(), generate_uid()
    first = _slices(tmp_path, 3, study, series)
    c_store(web.server.port, first)
    kept = SeriesCache(web.server.data_dir).path(series)
    wait_for(kept.exists, 60, "the stable series' metadata made ahead of any request")
    made = kept.stat().st_ino
    meta = web.client().retrieve_series_metadata(study, series)
    assert kept.stat().st_ino == made  # answered from the file made ahead, not made again
    assert [m["00080018"]["Value"][0] for m in meta] == [pydicom.dcmread(p).SOPInstanceUID for p in first]
    for path, m in zip(first, meta):
        original = pydicom.dcmread(path)
        want = original.to_json_dict(1024, lambda e: "bulk", suppress_invalid_tags=True)
        for key, value in want.items():
            if not key.endswith("0000") and key not in ("00080005", "FFFCFFFC"):
                assert _normal(m[key]) == _normal(value), key
        assert m["7FE00010"]["BulkDataURI"].startswith(f"{web.base}/studies/{study}/series/{series}/instances/")
    joined = _slices(tmp_path, 1, study, series, first=4)
    c_store(web.server.port, joined)
    wait_for(lambda: kept.stat().st_ino != made, 60, "the series made anew once stable again")
    body = kept.read_bytes().split(b"\n", 1)[1]
    assert pydicom.dcmread(joined[0]).SOPInstanceUID.encode() in zstandard.ZstdDecompressor().decompress(body)
    assert len(web.client().retrieve_series_metadata(study, series)) == 4


def test_frames_as_stored_and_decoded(web):
    c = web.client()
    multi = next(uid for uid, p in web.corpus.by_uid.items() if pydicom.dcmread(p).get("NumberOfFrames", 1) == 3)
    study, series = _where(web, multi)
    original = pydicom.dcmread(web.corpus.by_uid[multi])
    size = len(original.PixelData) // 3
    got = c.retrieve_instance_frames(study, series, multi, [3, 1])
    assert got == [original.PixelData[2 * size:], original.PixelData[:size]]
    j2k = _j2k(web)
    study, series = _where(web, j2k)
    stored = c.retrieve_instance_frames(study, series, j2k, [1], media_types=(("application/octet-stream", "*"),))
    assert stored[0][:4] in (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")  # a JPEG 2000 codestream, as stored
    r = requests.get(f"{web.base}/studies/{study}/series/{series}/instances/{j2k}/frames/1",
                     headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert "transfer-syntax=1.2.840.10008.1.2.4.90" in r.text.split("\r\n\r\n")[0]
    raw = c.retrieve_instance_frames(study, series, j2k, [1])
    expected = pydicom.dcmread(web.corpus.by_uid[j2k]).pixel_array
    assert np.array_equal(np.frombuffer(raw[0], dtype="<u2").reshape(expected.shape), expected.astype("<u2"))
    jp2 = c.retrieve_instance_frames(study, series, j2k, [1], media_types=(("image/jp2", JPEG2000_LOSSLESS),))
    assert jp2 == stored


def test_frames_of_a_series_follow_stores_and_deletes(web, tmp_path):
    """A viewer loads a series frame by frame: each lookup is answered from its series' rows
    kept while the catalog is unchanged (engine/web/records.SeriesLookups); an instance
    stored into the series afterwards is found, one deleted afterwards is not served."""
    from conftest import cli, copies
    files = copies(CT, tmp_path / "ct", 4, "ct")
    c_store(web.server.port, files[:3])
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    c = web.client()
    pixels = pydicom.dcmread(files[0]).PixelData

    def frame(uid):
        return requests.get(f"{web.base}/studies/{study}/series/{series}/instances/{uid}/frames/1",
                            headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})

    for _ in range(2):  # every HTTP process asked, each keeping the series' rows
        assert [c.retrieve_instance_frames(study, series, uid, [1])[0] == pixels for uid in uids[:3]] == [True] * 3
    assert frame(uids[3]).status_code == 404
    c_store(web.server.port, files[3:])
    assert [frame(uids[3]).status_code for _ in range(4)] == [200] * 4
    deleted = cli("delete", "--data-dir", str(web.server.data_dir), "--instance", uids[0], "--yes")
    assert deleted.returncode == 0, deleted.stderr
    answers = [frame(uids[0]) for _ in range(4)]
    assert [r.status_code for r in answers] == [404] * 4, [r.text[:200] for r in answers]
    assert [frame(uid).status_code for uid in uids[1:]] == [200] * 3


def test_not_found_and_not_acceptable(web):
    c = web.client()
    study = _ct_study(web)
    series = next(iter(web.corpus.studies[study]))
    inst = web.corpus.studies[study][series][0]
    for url, words in (("/studies/1.2.3.4", "no such study"),
                       (f"/studies/{study}/series/1.2.3/metadata", "no such series"),
                       (f"/studies/{study}/series/{series}/instances/{inst}/frames/2", "1 frame"),
                       (f"/studies/{study}/series/{series}/instances/{inst}/bulkdata/00420011", "has no")):
        r = requests.get(web.base + url)
        assert r.status_code == 404 and words in r.text, (url, r.text)
    r = requests.get(f"{web.base}/studies/{study}/series/{series}/instances/{inst}/frames/0,x")
    assert r.status_code == 400
    for trick in (f"/studies/{study}/series/..%2F..%2Fetc/metadata", f"/studies/{study}/series/%2e%2e/metadata",
                  f"/studies/{study}/series/{series}/instances/1.2.3%00.4", "/studies/1.2.3%2Fa"):
        r = requests.get(web.base + trick)
        assert r.status_code in (400, 404) and ("not a valid UID" in r.text or "no such" in r.text), (trick, r.text)
    r = requests.get(f"{web.base}/studies/{study}/series/{series}/instances/{inst}/frames/1",
                     headers={"Accept": 'multipart/related; type="image/jls"'})
    assert r.status_code == 406 and "transfer-syntax=*" in r.text
    with pytest.raises(HTTPError):
        c.retrieve_study("1.2.3.999")


def test_rendered_and_thumbnails(web):
    from PIL import Image
    c = web.client()
    study = _ct_study(web)
    series = next(iter(web.corpus.studies[study]))
    inst = web.corpus.studies[study][series][0]
    jpeg = c.retrieve_instance_rendered(study, series, inst, params={"window": "40,400", "quality": "80"})
    image = Image.open(BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (128, 128)
    pixels = np.asarray(image)
    assert pixels.std() > 5  # an image, not a blank
    png = c.retrieve_series_rendered(study, series, media_types=("image/png",), params={"viewport": "64,32"})
    image = Image.open(BytesIO(png))
    assert image.format == "PNG" and image.size == (32, 32)
    for url in (f"/studies/{study}/thumbnail", f"/studies/{study}/series/{series}/thumbnail",
                f"/studies/{study}/series/{series}/instances/{inst}/frames/1/thumbnail"):
        r = requests.get(web.base + url, headers={"Accept": "image/jpeg"})
        assert r.status_code == 200 and Image.open(BytesIO(r.content)).size == (128, 128), url
    multi = next(uid for uid, p in web.corpus.by_uid.items() if pydicom.dcmread(p).get("NumberOfFrames", 1) == 3)
    mstudy, mseries = _where(web, multi)
    frame1, frame3 = (c.retrieve_instance_frames_rendered(mstudy, mseries, multi, [k], media_types=("image/png",),
                                                           params={"window": "1000,2000"}) for k in (1, 3))
    assert frame1 != frame3  # frame 3 is brighter (pixels + 200)
    j2k = _j2k(web)
    jstudy, jseries = _where(web, j2k)
    assert Image.open(BytesIO(c.retrieve_instance_rendered(jstudy, jseries, j2k))).size == (64, 64)
    for params, words in (({"window": "40"}, "window"), ({"viewport": "0,5"}, "viewport"),
                          ({"quality": "500"}, "quality"), ({"zoom": "2"}, "unknown")):
        r = requests.get(f"{web.base}/studies/{study}/series/{series}/instances/{inst}/rendered", params=params)
        assert r.status_code == 400 and words in r.text, (params, r.text)
    r = requests.get(f"{web.base}/studies/{study}/rendered", headers={"Accept": "image/gif"})
    assert r.status_code == 406


def test_wado_uri(web):
    from PIL import Image
    study = _ct_study(web)
    series = next(iter(web.corpus.studies[study]))
    inst = web.corpus.studies[study][series][1]
    q = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": inst}
    r = requests.get(f"{web.url}/wado", params=q)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    r = requests.get(f"{web.url}/wado", params={**q, "contentType": "image/png", "rows": "64",
                                                  "windowCenter": "40", "windowWidth": "400"})
    assert Image.open(BytesIO(r.content)).size == (64, 64)
    r = requests.get(f"{web.url}/wado", params={**q, "contentType": "application/dicom"})
    assert dataset_bytes(web.corpus.by_uid[inst]) in r.content
    for params, status in (({**q, "requestType": "X"}, 400), ({**q, "objectUID": "1.2.3"}, 404),
                           ({**q, "contentType": "text/html"}, 406), ({**q, "bogus": "1"}, 400),
                           ({"requestType": "WADO", "studyUID": study, "seriesUID": series}, 400)):
        assert requests.get(f"{web.url}/wado", params=params).status_code == status, params


def test_metadata_from_the_header_is_the_metadata_from_the_record():
    """The fast path (a whole header, element by element, pieces kept across instances)
    gives the JSON the general path (the record, read and converted) gives, for every
    bundled pydicom file whose header is whole (a dozen or so)."""
    import json
    import warnings
    from pathlib import Path

    from pydicom.filereader import _read_file_meta_info, read_preamble
    from stowage.catalog.attributes import HEADER, extract
    from stowage.engine.web import metadata
    from stowage.engine.web.records import Instance

    class Reader:
        def __init__(self, part10: bytes) -> None:
            self.part10 = lambda inst: part10

    class Store:
        def __init__(self, part10: bytes) -> None:
            self.reader = Reader(part10)

    fast = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in map(str, sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))):
            raw = open(path, "rb").read()  # the bundled files only (get_testdata_files would try downloads)
            if len(raw) > 1 << 20:
                continue  # a few large multi-frame files: slow to read, none has a whole header
            try:
                with open(path, "rb") as f:
                    read_preamble(f, False)
                    syntax = str(_read_file_meta_info(f).TransferSyntaxUID)
                    data = raw[f.tell():]
                header = extract(data, syntax)[HEADER]
            except Exception:
                continue  # no file meta, or not a data set the store takes
            inst = Instance("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", syntax, "s", 0, len(data), header)
            for _ in range(2):  # the second time from kept pieces
                encoded = metadata._encoded_from_header(inst, "http://x/studies/1.2/series/1.2.3/instances/1.2.3.4")
                if encoded is None:
                    break
                assert json.loads(encoded) == metadata.instance_json(Store(raw), inst, "http://x"), path
                fast.add(path.rsplit("/", 1)[-1])
    assert len(fast) >= 10, fast  # (CT_small and MR_small end in trailing padding: read from the record)


# -- records held as is beside zstd ones; a damaged record -----------------------------

def _as_is_series(out, n_j2k: int, n_ct: int):
    """One series: JPEG 2000 instances (records stored as is) and native CT ones (zstd)."""
    study, series = generate_uid(), generate_uid()
    files = []
    for i, src in enumerate([get_testdata_file("MR_small_jp2klossless.dcm")] * n_j2k + [CT] * n_ct):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = out / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, series, files


def _get_series(web, study: str, series: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(HOST, web.http_port, timeout=60)
    conn.request("GET", f"/dicom-web/studies/{study}/series/{series}", headers={"Accept": ACCEPT})
    return conn.getresponse()


def test_stored_as_is_and_compressed_records_in_one_answer_are_byte_exact(web, tmp_path):
    study, series, files = _as_is_series(tmp_path, 3, 2)
    c_store(web.server.port, files)
    r = requests.get(f"{web.base}/studies/{study}/series/{series}", headers={"Accept": ACCEPT}, timeout=60)
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)
    got = parts(r)
    assert len(got) == 5
    for path, (_headers, body) in zip(files, got):  # in instance order
        assert body[128:132] == b"DICM" and body.endswith(dataset_bytes(path)), path.name
        assert pydicom.dcmread(BytesIO(body)).SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID
    resp = _get_series(web, study, series)
    nbytes, delimiters = read_parts(resp, bytearray(1 << 16))  # the benchmark's lean client
    assert (nbytes, delimiters) == (len(r.content), 6)


def test_a_record_damaged_on_disk_is_not_sent(web, tmp_path):
    study, series, files = _as_is_series(tmp_path, 2, 0)
    c_store(web.server.port, files)
    victim_uid = pydicom.dcmread(files[1], stop_before_pixels=True).SOPInstanceUID
    for seg in sorted((web.server.data_dir / "segments").glob("*.seg")):
        victim = next((rec for rec in iter_records(seg) if rec.header.get("sop_instance_uid") == victim_uid), None)
        if victim is not None:
            break
    assert victim is not None and victim.flags == 0  # held as is
    with open(seg, "r+b") as f:  # bytes flipped in the middle of its pixel data
        f.seek(victim.payload_offset + victim.payload_length - 200)
        f.write(b"\xde\xad\xbe\xef")
    resp = _get_series(web, study, series)
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    partial = cut.value.partial
    assert dataset_bytes(files[0]) in partial  # the sound instance before it was sent
    assert b"\xde\xad\xbe\xef" not in partial  # the damaged one was not


def test_a_busy_machine_makes_only_the_overdue_series_one_a_look(web, tmp_path):
    """engine/web/stable_series.py's CPU policy, on the server's catalog (its own cache folder
    here, so the server's maker does not interfere): while other processes keep the CPUs
    busy, a series stable for less than OVERDUE times the stable age waits, and of the
    overdue ones only the oldest is made per look; an idle machine makes every stable one,
    but not one with compressed pixel data (its records would all be read)."""
    import time
    from stowage.engine.runtime.config import Config
    from stowage.engine.store.series_cache import SeriesCache
    from stowage.engine.web import stable_series
    from stowage.engine.web.store import WebStore
    store = WebStore(Config.from_dict({"data_dir": str(web.server.data_dir)}))
    try:
        store.series_cache = SeriesCache(tmp_path)
        busy = [1.0]
        maker = stable_series.StableSeries(store, 1.0, busy=lambda: busy[0])
        study = _ct_study(web)
        series = list(web.corpus.studies[study])  # two series
        now_us = int(time.time() * 1e6)
        stable, overdue = now_us - 2_000_000, now_us - (stable_series.OVERDUE + 2) * 1_000_000
        maker.pending = {series[0]: (study, stable)}
        assert maker.make_due() == 0 and series[0] in maker.pending  # stable, not overdue, machine busy
        maker.pending = {series[0]: (study, overdue), series[1]: (study, overdue - 1)}
        assert maker.make_due() == 1  # overdue: the oldest alone
        assert store.series_cache.path(series[1]).exists() and not store.series_cache.path(series[0]).exists()
        assert list(maker.pending) == [series[0]]
        busy[0] = 0.0
        maker.pending[series[0]] = (study, stable)
        assert maker.make_due() == 1 and store.series_cache.path(series[0]).exists()  # idle: made
        maker.pending = {series[0]: (study, stable)}
        assert maker.make_due() == 0  # its file is current: not made again
        j2k_study, j2k_series = _where(web, _j2k(web))  # compressed pixels: every record would be read
        maker.pending = {j2k_series: (j2k_study, stable)}
        assert maker.make_due() == 0 and not store.series_cache.path(j2k_series).exists()
    finally:
        store.close()


def test_a_study_thumbnail_skips_series_without_pixel_data(tmp_path):
    """A study's rendered and thumbnail resources show its first series that has pixels: a
    study whose first series is an SR (a report stored before the images) got a 404, and the
    dashboard's study showed no picture. A series of the SR alone still says why not."""
    from PIL import Image
    w = start(tmp_path, corpus=False)
    try:
        study = generate_uid()
        sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
        ct = pydicom.dcmread(CT)
        for ds, number in ((sr, 1), (ct, 2)):
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = number
            ds.save_as(tmp_path / f"{number}.dcm")
        c_store(w.server.port, [tmp_path / "1.dcm", tmp_path / "2.dcm"])
        for what in ("thumbnail", "rendered"):
            r = requests.get(f"{w.base}/studies/{study}/{what}", headers={"Accept": "image/jpeg"}, timeout=30)
            assert r.status_code == 200, (what, r.text)
            assert np.asarray(Image.open(BytesIO(r.content))).std() > 5  # the CT, not a blank
        r = requests.get(f"{w.base}/studies/{study}/series/{sr.SeriesInstanceUID}/thumbnail", timeout=30)
        assert r.status_code == 404 and "no Pixel Data" in r.text
    finally:
        w.server.stop()
