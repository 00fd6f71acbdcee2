"""The dashboard at the root of the HTTP port, in a real browser (tests/browser.py): it shows
a study DCMTK storescu pushed, its study browser finds that study over QIDO-RS with series
thumbnails from WADO-RS, and the OHIF viewer opens it and renders the CT slice; no failed
request and no console error on the way."""
from __future__ import annotations

import json

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By

from browser import TOKEN, console_errors, failed_requests, fresh_logs
from conftest import wait_for

PATIENT = "CompressedSamples^CT1"  # CT_small.dcm's


def _text(driver, element_id: str) -> str:
    """The element's text; "" while it is absent or being replaced (the panels are redrawn
    every 5 s, and an element found just before a redraw is stale when read)."""
    try:
        found = driver.find_elements(By.ID, element_id)
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


def test_status_json_counts_the_study_storescu_pushed(web_archive):
    status, headers, body = web_archive.get("/dashboard/status.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    s = wait_for(lambda: (d := json.loads(web_archive.get("/dashboard/status.json")[2]))["holdings"]["instances"]
                 and d, 30, "the stored CT in the dashboard's figures")
    assert (s["holdings"]["patients"], s["holdings"]["studies"], s["holdings"]["instances"]) == (1, 1, 1)
    assert s["holdings"]["dataset_bytes"] > s["holdings"]["stored_bytes"] > 0
    assert sum(m["instances"] for m in s["ingest"]["minutes"]) == 1
    assert [(x["calling_ae"], x["instances"]) for x in s["ingest"]["senders"]] == [("STORESCU", 1)]
    assert s["activity"]["workers"] == 1 and s["storage"]["free_bytes"] > 0
    assert any(e.get("calling_ae") == "STORESCU" and e.get("stored") == 1 for e in s["audit"]), s["audit"]


def test_the_dashboard_shows_the_study_storescu_pushed(chromium, web_archive):
    fresh_logs(chromium)
    chromium.get(web_archive.url + "/")
    wait_for(lambda: _text(chromium, "instances") == "1", 60, "the stored CT in the panels (refreshed every 5 s)")
    assert _text(chromium, "patients") == "1"
    assert "1 of 1 running" in _text(chromium, "workers")
    audit = chromium.find_element(By.ID, "audit").text
    assert "association released 127.0.0.1" in audit and "1 stored" in audit, audit
    # The live panels are fetched again by the page and still show the figures.
    chromium.execute_script("return refreshPanels()")
    wait_for(lambda: _text(chromium, "instances") == "1", 10, "the refreshed panels")
    # The chart has the minute of the store drawn: some pixel of the canvas is not blank.
    drawn = chromium.execute_script("""const c = document.getElementById('ingest-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;""")
    assert drawn > 100


def _search(driver, archive, name: str, page: str = "/"):
    """Search the study browser by patient name; the study's row once it is listed."""
    fresh_logs(driver)
    driver.get(archive.url + page)
    settled = lambda: _text(driver, "search-state") not in ("", "searching…")  # noqa: E731
    wait_for(settled, 30, "the page's first search (all studies)")
    form = driver.find_element(By.ID, "study-search")
    form.find_element(By.NAME, "PatientName").send_keys(name)
    form.find_element(By.TAG_NAME, "button").click()
    wait_for(settled, 30, "the search")
    return wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f'tr.study[data-uid="{archive.study_uid}"]'),
                    30, lambda: f"the study in the results ({_text(driver, 'search-state')})")[0]


def test_the_study_browser_finds_the_study(chromium, web_archive):
    row = _search(chromium, web_archive, "compressedsamples")  # fuzzy: any case
    assert PATIENT in row.text and "1CT1" in row.text and "2004-01-19" in row.text and "CT" in row.text
    assert _text(chromium, "search-state") == "1 study"
    link = row.find_element(By.LINK_TEXT, "Open in viewer")
    assert link.get_attribute("href").endswith(f"/viewer?StudyInstanceUIDs={web_archive.study_uid}")
    assert not failed_requests(chromium)
    assert not console_errors(chromium)


def test_the_study_browser_shows_the_series_thumbnail(chromium, web_archive):
    _search(chromium, web_archive, "CompressedSamples").click()
    image = wait_for(lambda: chromium.find_elements(By.CSS_SELECTOR, "#study-results .series figure img"), 30,
                     "the series under the study")[0]
    wait_for(lambda: chromium.execute_script("return arguments[0].complete", image), 30, "the thumbnail to load")
    assert not failed_requests(chromium)
    assert not console_errors(chromium)
    levels = chromium.execute_script("""const img = arguments[0], c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        return new Set(ctx.getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 == 0)).size;""", image)
    assert levels > 64  # the rendered CT slice, not a blank square
    assert "CT #1" in chromium.find_element(By.CSS_SELECTOR, "#study-results .series figcaption").text


CANVAS = """const c = document.querySelector('canvas.cornerstone-canvas');
    if (!c || !c.width) return null;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, seen = new Set();
    let lit = 0;
    for (let i = 0; i < d.length; i += 4) { if (d[i] > 24) lit++; seen.add(d[i]); }
    return [lit, d.length / 4, seen.size];"""


def test_the_viewer_opens_the_study_and_renders_the_ct_slice(chromium, web_archive):
    """From the study browser's link to OHIF, which reads the study over our QIDO-RS and
    WADO-RS (metadata, frames) and draws it with WebGL: the slice, not a blank canvas."""
    row = _search(chromium, web_archive, "CompressedSamples")
    row.find_element(By.LINK_TEXT, "Open in viewer").click()
    lit, pixels, levels = wait_for(lambda: (r := chromium.execute_script(CANVAS)) and r[0] > 0 and r, 90,
                                   lambda: f"the CT slice on the viewer's canvas ({chromium.current_url})")
    assert lit > pixels // 10 and levels > 64, (lit, pixels, levels)  # an image, not a flat fill
    assert chromium.current_url.startswith(f"{web_archive.url}/viewer?StudyInstanceUIDs={web_archive.study_uid}")
    assert not failed_requests(chromium)
    assert not console_errors(chromium)


def test_with_tokens_the_pages_work_from_a_link_that_carries_one(chromium, web_archive_with_token):
    """An archive that serves other hosts has tokens: the dashboard opened as /?access_token=
    sends it with every request it makes (panels, QIDO, thumbnails) and hands it to the viewer;
    what holds patient data is refused without it, the pages' static files are not."""
    archive = web_archive_with_token
    for path in ("/", "/dashboard/status.json", "/dashboard/panels", "/dicom-web/studies"):
        assert archive.get(path)[0] == 401, path
    for path in ("/dashboard/static/dashboard.js", "/viewer?StudyInstanceUIDs=1.2.3", "/app-config.js"):
        assert archive.get(path)[0] == 200, path
    row = _search(chromium, archive, "CompressedSamples", page=f"/?access_token={TOKEN}")
    assert "access_token" not in chromium.current_url  # taken out of the address bar
    wait_for(lambda: _text(chromium, "instances") == "1", 60, "the stored CT in the panels (refreshed every 5 s)")
    row.click()
    image = wait_for(lambda: chromium.find_elements(By.CSS_SELECTOR, "#study-results .series figure img"), 30,
                     "the series under the study")[0]
    wait_for(lambda: chromium.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
             30, "the thumbnail to load")
    row.find_element(By.LINK_TEXT, "Open in viewer").click()
    lit, pixels, levels = wait_for(lambda: (r := chromium.execute_script(CANVAS)) and r[0] > 0 and r, 90,
                                   lambda: f"the CT slice on the viewer's canvas ({chromium.current_url})")
    assert lit > pixels // 10 and levels > 64, (lit, pixels, levels)
    assert "token" not in chromium.current_url  # OHIF takes it out too
    assert not failed_requests(chromium)
    assert not console_errors(chromium)



def test_an_import_in_progress_is_shown_with_its_process(web_archive, tmp_path):
    """`stowage import` running beside serve holds a writer slot: the dashboard names it
    (pid, command) while it runs, and not once it is done. The import process is frozen
    (SIGSTOP) while it holds its slot, so that the dashboard is asked while it runs."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import CT
    from stowage.engine.web.dashboard.activity import writers
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(400):  # the same instance: each copy found already held, the archive unchanged
        shutil.copyfile(CT, folder / f"{i}.dcm")
    data_dir = Path(web_archive.server.data_dir)
    importing = subprocess.Popen([sys.executable, "-m", "stowage.cli", "import", str(folder), "--processes", "1",
                                  "--data-dir", str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status = lambda: json.loads(web_archive.get("/dashboard/status.json")[2])  # noqa: E731
    try:
        holder = wait_for(lambda: [w for w in writers(data_dir) if w.role == "import"], 60,
                          "the import to claim its writer slot")[0]
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            shown = wait_for(lambda: [w for w in status()["activity"]["writers"] if w["role"] == "import"], 30,
                             "the import on the dashboard")
            assert shown[0]["pid"] == holder.pid and 100 <= shown[0]["slot"] <= 899
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        assert importing.wait(120) == 0, importing.stderr.read()
    finally:
        if importing.poll() is None:
            importing.kill()
            importing.wait()
    wait_for(lambda: not [w for w in status()["activity"]["writers"] if w["role"] == "import"], 30,
             "the finished import to leave the dashboard")
    assert status()["holdings"]["instances"] == 1


def test_a_migration_is_shown_from_its_checkpoint(tmp_path):
    """A migration's progress as `stowage migrate` records it (engine/migrate/checkpoint.py):
    the dashboard reads the checkpoint read-only, also while the migration holds it."""
    from stowage.engine.migrate.checkpoint import Checkpoint, Result
    from stowage.engine.migrate.enumerate import Study, Window
    from stowage.engine.runtime.config import Config
    from stowage.engine.web.dashboard import routes
    from stowage.engine.web.dashboard.status import Status

    cp = Checkpoint(tmp_path / "data" / "migrate" / "OLDPACS.sqlite")
    cp.set_meta(source="OLDPACS@10.0.0.9:104", method="move")
    window = Window(everything=True)
    cp.seed_windows([window], rescan=False)
    cp.window_done(window, "done", [Study("1.2.3", "P1", "DOE^J", "20200101", "CT", 10),
                                    Study("1.2.4", "P2", "ROE^R", "20200102", "MR", 5)], [], "")
    cp.start("1.2.3")
    cp.finish("1.2.3", Result("done", expected=10, received=10, verified=10, bytes=5_000_000), None)
    cp.start("1.2.4")
    status = Status(Config(data_dir=tmp_path / "data"))
    try:
        s = status.gather()
    finally:
        status.close()
        cp.close()
    (m,) = s["migrations"]
    assert m["source"] == "OLDPACS@10.0.0.9:104"
    assert (m["studies"], m["studies_done"], m["studies_in_flight"], m["instances_received"]) == (2, 1, 1, 10)
    page = " ".join(routes._environment().get_template("panels.html").render(s=s, chart="{}").split())
    assert "OLDPACS@10.0.0.9:104</strong>: 1 of 2 studies done (0 failed, 1 in flight), 10 instances received" in page


def test_an_open_association_is_counted(web_archive):
    """An association held open by a pynetdicom peer is counted while it is open, not after."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from conftest import HOST
    status = lambda: json.loads(web_archive.get("/dashboard/status.json")[2])["activity"]  # noqa: E731
    ae = AE(ae_title="DASHBOARD")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, web_archive.server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        wait_for(lambda: status()["associations"] == 1, 30, "the open association on the dashboard")
    finally:
        assoc.release()
    wait_for(lambda: status()["associations"] == 0, 30, "the released association to leave the dashboard")


def _report_in_study_of(ct, out):
    """A Basic Text SR in the study of `ct`, in a series of its own: a series without images."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    src = pydicom.dcmread(ct, stop_before_pixels=True)
    ds = pydicom.Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, src.get(keyword, ""))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "SR", 2, 1, "report"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.ContinuityOfContent = "SEPARATE"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_series_without_images_gets_no_thumbnail_request(chromium, tmp_path):
    """A study with a CT series and a report (SR): the study browser asked for the report
    series' thumbnail too, a 404 in the browser's console; now it shows the series with no
    image and asks for the CT's only."""
    import subprocess
    import pydicom
    from browser import WebArchive
    from conftest import CT, HOST, Server, dcmtk, free_port
    http_port = free_port()
    server = Server(tmp_path / "data", free_port(), ["--workers", "1", "--http-port", str(http_port),
                                                     "--http-processes", "1"],
                    {"STOWAGE_SCRUB_RATE": "off"}, log_dir=tmp_path).start()
    try:
        archive = WebArchive(server, http_port, str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID))
        report = _report_in_study_of(CT, tmp_path / "sr.dcm")
        sent = subprocess.run([dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(server.port), str(CT), str(report)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: b'"SR"' in archive.get(f"/dicom-web/studies/{archive.study_uid}/series")[2], 30,
                 "the report's series over QIDO-RS")
        _search(chromium, archive, "CompressedSamples").click()
        figures = wait_for(lambda: len(found := chromium.find_elements(By.CSS_SELECTOR, "#study-results .series figure"))
                           == 2 and found, 30, "both series under the study")
        images = {f.find_element(By.TAG_NAME, "figcaption").text.split()[0]: f.find_element(By.TAG_NAME, "img")
                  for f in figures}
        wait_for(lambda: chromium.execute_script("return arguments[0].complete", images["CT"]), 30, "the CT thumbnail")
        assert "(no image)" in images["SR"].get_attribute("alt")
        assert not images["SR"].get_attribute("src")
        assert not failed_requests(chromium)
        assert not console_errors(chromium)
    finally:
        server.kill()
