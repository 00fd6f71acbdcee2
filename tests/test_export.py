"""`stowage export`: flat, tree and DICOMDIR layouts, run as users run it, over instances
that DCMTK's storescu stored into a running archive. Values in the corpus are hostile on
purpose (path separators, `..`, control characters, ISO 2022 Japanese, 200-character
descriptions, two patients whose IDs sanitize alike): whatever they hold, every file
stays inside the out folder and holds the data set exactly as storescu sent it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import CT, HOST, MR, Server, cli, copies, dataset_bytes, dcmtk, free_port, received_by_dcmtk
from test_find import storescu

RTPLAN = Path(get_testdata_file("rtplan.dcm"))
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def instance(src: Path, out: Path, patient: tuple[str, str], study: dict, series: dict, number: int | None,
             charset: str | list[str] | None = None) -> Path:
    """A copy of `src` with fresh UIDs and the given patient/study/series values."""
    ds = pydicom.dcmread(src)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientID, ds.PatientName = patient
    for k, v in {**study, **series}.items():
        setattr(ds, k, v)
    if number is None:
        ds.InstanceNumber = None
    else:
        ds.InstanceNumber = number
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what storescu sends, whatever the SCP
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return path


def study_values(date: str, accession: str, description: str, **more: str) -> dict:
    return {"StudyInstanceUID": generate_uid(), "StudyDate": date, "AccessionNumber": accession,
            "StudyDescription": description, **more}


def series_values(number: str, modality: str, description: str) -> dict:
    return {"SeriesInstanceUID": generate_uid(), "SeriesNumber": number, "Modality": modality,
            "SeriesDescription": description}


def corpus(out: Path) -> dict[str, list[Path]]:
    """Files by the AE title that sends them: 8 patients (2 without an ID), 8 studies, 9 series,
    16 instances."""
    out.mkdir(parents=True)
    a, b = [], []
    jane = study_values("20240102", "ACC1", "HEAD CT")
    ct, mr = series_values("2", "CT", "AXIAL 5mm"), series_values("10", "MR", "T1")
    a += [instance(CT, out, ("PAT-A", "DOE^JANE"), jane, ct, n) for n in (1, 2, 3)]
    a += [instance(MR, out, ("PAT-A", "DOE^JANE"), jane, mr, n) for n in (1, 2)]
    later = study_values("20240301", "", "FOLLOW UP", StudyID="S77")
    a.append(instance(CT, out, ("PAT-A", "DOE^JANE"), later, series_values("1", "CT", ""), 1))
    hostile = study_values("20230101", "..", "a/b\\c/../" + "Ω" * 200)
    evil = series_values("3", "CT", "\x1b[31mred\x00/../../")
    b += [instance(CT, out, ("../../etc", "../../etc/passwd"), hostile, evil, n, "ISO_IR 192") for n in (1, 2)]
    b.append(instance(CT, out, ("X/Y", "SAME"), study_values("20200101", "A1", "ONE"), series_values("1", "CT", ""), 1))
    b.append(instance(CT, out, ("X_Y", "SAME"), study_values("20200101", "A1", "ONE"), series_values("1", "CT", ""), 1))
    jp, jp_series = study_values("20220202", "JP1", ""), series_values("1", "CT", "")
    b += [instance(CT, out, ("H31", JAPANESE), jp, jp_series, n, ["", "ISO 2022 IR 87"]) for n in (1, 2)]
    for _ in (1, 2):  # nothing readable at all: no ID, no name, no date, no numbers; two studies
        b.append(instance(CT, out, ("", ""), study_values("", "", ""), series_values("", "CT", ""), None))
    rt, rt_series = study_values("20210101", "RT", "PLAN"), series_values("1", "RTPLAN", "plan")
    b += [instance(RTPLAN, out, ("RT-1", "PLAN^PAT"), rt, rt_series, n) for n in (1, 2)]
    return {"SRC_A": a, "SRC_B": b}


def export(data_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`stowage export`, run in this process (conftest.cli: the same command code, exit code and
    output, without a new interpreter's imports, 1.5-3 s an export on the 2-core machine)."""
    return cli("export", "--data-dir", str(data_dir), "--out", str(out), *(args or ("--all",)))


class Archive:
    def __init__(self, base: Path):
        self.base = base
        self.files = corpus(base / "files")
        every = [p for ps in self.files.values() for p in ps]
        self.sent = received_by_dcmtk(every, base / "sent")  # what storescu really sends
        self.meta = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p, stop_before_pixels=True) for p in every}
        self.server = Server(base / "data", free_port(), ["--workers", "2"], log_dir=base).start()
        for aet, files in self.files.items():
            r = subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", "STOWAGE", HOST, str(self.server.port),
                                *map(str, files)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and "Failed" not in r.stderr, r.stderr
        self.data_dir = self.server.data_dir


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    a = Archive(tmp_path_factory.mktemp("export"))
    yield a
    a.server.kill()


def dcm_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p.name != "DICOMDIR")


def assert_inside(out: Path) -> None:
    """Nothing under `out` is a link, every path resolves inside it, no name is hidden or
    '..', and no name holds a control character or exceeds 255 bytes."""
    root = out.resolve()
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            assert not p.is_symlink()
            assert p.resolve().is_relative_to(root), p
            assert not name.startswith(".") and name not in ("..", "."), p
            assert not re.search(r"[\x00-\x1f\x7f/\\]", name), repr(name)
            assert len(name.encode()) <= 255, name


def test_flat_is_one_file_per_instance_named_by_its_uid(archive, tmp_path):
    r = export(archive.data_dir, tmp_path / "flat")
    assert r.returncode == 0, r.stderr
    files = dcm_files(tmp_path / "flat")
    assert {p.name for p in files} == {f"{uid}.dcm" for uid in archive.sent}
    for p in files:
        assert dataset_bytes(p) == archive.sent[p.stem], p.name
    assert f"exported {len(archive.sent)} instance(s)" in r.stdout


def test_tree_names_are_readable_and_safe(archive, tmp_path):
    out = tmp_path / "tree"
    r = export(archive.data_dir, out, "--all", "--layout", "tree")
    assert r.returncode == 0, r.stderr
    assert_inside(out)
    assert sorted(os.listdir(tmp_path)) == ["tree"], "something was written beside the out folder"
    files = dcm_files(out)
    assert len(files) == len(archive.sent)
    by_uid = {}
    for p in files:
        rel = p.relative_to(out).parts
        assert len(rel) == 4, rel  # patient / study / series / file
        uid = re.fullmatch(r"(?:\d{4}_)?([\d.]+)\.dcm", rel[3]).group(1)
        assert dataset_bytes(p) == archive.sent[uid], rel
        by_uid[uid] = rel
    for uid, rel in by_uid.items():  # every folder ends with an 8-hex suffix; names say what they hold
        assert all(re.fullmatch(r".+_[0-9a-f]{8}", part) for part in rel[:3]), rel
        ds = archive.meta[uid]
        if ds.PatientID == "PAT-A" and ds.StudyDescription == "HEAD CT":
            assert rel[0].startswith("DOE_JANE_PAT-A_") and rel[1].startswith("20240102_ACC1_HEAD_CT_")
            assert rel[2].startswith("002_CT_AXIAL_5mm_" if ds.Modality == "CT" else "010_MR_T1_")
            assert rel[3] == f"{int(ds.InstanceNumber):04d}_{uid}.dcm"
        if ds.PatientID == "PAT-A" and ds.StudyDescription == "FOLLOW UP":
            assert rel[1].startswith("20240301_S77_FOLLOW_UP_")  # no accession number: the Study ID
        if ds.PatientID == "H31":
            assert "山田_太郎" in rel[0] and rel[0].startswith("Yamada_Tarou_")
        if ds.PatientID == "../../etc":
            assert rel[0].startswith("etc_passwd_etc_") and rel[1].startswith("20230101_a_b_c_Ω")
            assert len(rel[1].encode()) <= 140 and rel[2].startswith("003_CT_31mred_")
        if not ds.PatientID:  # nothing readable: the Study UID names the folders, the UID the file
            assert rel[0].startswith(ds.StudyInstanceUID.replace(".", ".")[:20])
            assert rel[3] == f"{uid}.dcm"
    same = {by_uid[u][0] for u, ds in archive.meta.items() if ds.PatientName == "SAME"}
    assert len(same) == 2 and all(n.startswith("SAME_X_Y_") for n in same), same  # collide, yet apart
    jane = {by_uid[u][:2] for u, ds in archive.meta.items() if ds.PatientID == "PAT-A"}
    assert len({p for p, _ in jane}) == 1 and len(jane) == 2  # one patient folder, two studies
    noid = {by_uid[u][0] for u, ds in archive.meta.items() if not ds.PatientID}
    assert len(noid) == 2  # without a Patient ID, each study is its own patient

    # A re-run writes nothing again; a damaged file is rewritten; a stray tmp never shows.
    victim = files[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    r = export(archive.data_dir, out, "--all", "--layout", "tree")
    assert r.returncode == 0, r.stderr
    assert f"({len(files) - 1} already there)" in r.stdout
    assert dcm_files(out) == files
    assert dataset_bytes(victim) == archive.sent[re.search(r"([\d.]+)\.dcm$", victim.name).group(1)]


def test_tree_keeps_existing_folders_when_a_name_changes(archive, tmp_path):
    """A folder found by its suffix is reused even if its readable part differs (renamed by
    a user, or a value changed since the first export): no instance is written twice."""
    out = tmp_path / "tree"
    sel = ("--patient", "PAT-A", "--layout", "tree")
    assert export(archive.data_dir, out, *sel).returncode == 0
    (patient,) = os.listdir(out)
    renamed = "Jane_" + patient.rsplit("_", 1)[1]
    os.rename(out / patient, out / renamed)
    r = export(archive.data_dir, out, *sel)
    assert r.returncode == 0 and "(6 already there)" in r.stdout, r.stdout + r.stderr
    assert os.listdir(out) == [renamed]


def check_dicomdir(out: Path, want: dict[str, bytes]) -> FileSet:
    fs = FileSet(out / "DICOMDIR")
    listed = {i.SOPInstanceUID: i for i in fs}
    assert set(listed) == set(want)
    ids = {}
    for uid, inst in listed.items():
        fid = inst.ReferencedFileID  # as the DICOMDIR says (FileID would be where pydicom moves it)
        parts = (fid,) if isinstance(fid, str) else tuple(fid)
        assert len(parts) <= 8 and all(re.fullmatch(r"[A-Z0-9_]{1,8}", c) for c in parts), parts
        assert dataset_bytes(out.joinpath(*parts)) == want[uid]
        ids[uid] = Path(*parts)
    assert {p.relative_to(out) for p in dcm_files(out)} == set(ids.values())
    return fs


def test_dicomdir(archive, tmp_path):
    out = tmp_path / "media"
    r = export(archive.data_dir, out, "--all", "--dicomdir")
    assert r.returncode == 0, r.stderr
    assert_inside(out)
    fs = check_dicomdir(out, archive.sent)
    kinds = {i.SOPInstanceUID: i.node.record_type for i in fs}
    for uid, ds in archive.meta.items():
        assert kinds[uid] == ("RT PLAN" if ds.Modality == "RTPLAN" else "IMAGE")
    ids = set(fs.find_values("PatientID"))
    assert {"PAT-A", "../../etc", "X/Y", "X_Y", "H31", "RT-1"} <= ids
    assert len([i for i in ids if i.startswith("NOID_")]) == 2  # a Type 1 key invented, per study
    assert JAPANESE in {str(v) for v in fs.find_values("PatientName")}
    dump = subprocess.run([dcmtk("dcmdump"), "-M", str(out / "DICOMDIR")], capture_output=True, text=True,
                          errors="replace", timeout=60)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    assert dump.stdout.count('"Directory Record" IMAGE') == len(archive.sent) - 2
    assert dump.stdout.count('"Directory Record" PATIENT') == 8

    # Again, and more into the same folder: nothing written twice, every instance still listed.
    before = {p: p.stat().st_mtime_ns for p in dcm_files(out)}
    r = export(archive.data_dir, out, "--all", "--dicomdir")
    assert r.returncode == 0 and f"({len(archive.sent)} already there)" in r.stdout, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in dcm_files(out)} == before
    check_dicomdir(out, archive.sent)


def test_dicomdir_grows_with_each_selection(archive, tmp_path):
    out = tmp_path / "media"
    jane = {u: archive.sent[u] for u, ds in archive.meta.items() if ds.PatientID == "PAT-A"}
    assert export(archive.data_dir, out, "--patient", "PAT-A", "--dicomdir").returncode == 0
    check_dicomdir(out, jane)
    rt = {u: archive.sent[u] for u, ds in archive.meta.items() if ds.PatientID == "RT-1"}
    r = export(archive.data_dir, out, "--patient", "RT-1", "--dicomdir")
    assert r.returncode == 0, r.stderr
    check_dicomdir(out, {**jane, **rt})
    noid = {u: ds for u, ds in archive.meta.items() if not ds.PatientID}
    study = next(iter(noid.values())).StudyInstanceUID
    more = {u: archive.sent[u] for u, ds in noid.items() if ds.StudyInstanceUID == study}
    assert export(archive.data_dir, out, "--study", study, "--dicomdir").returncode == 0
    check_dicomdir(out, {**jane, **rt, **more})
    # DCMTK reads it as its own: updating it with a file it lists leaves every record in place.
    records = subprocess.run([dcmtk("dcmdump"), str(out / "DICOMDIR")], capture_output=True, text=True,
                             errors="replace", timeout=60).stdout.count('"Directory Record"')
    assert records == (1 + 2 + 3 + 6) + (1 + 1 + 1 + 2) + (1 + 1 + 1 + 1)  # PAT-A, RT-1, one without ID
    listed = FileSet(out / "DICOMDIR")
    fid = Path(*next(i for i in listed if i.PatientID == "PAT-A").ReferencedFileID)  # (Type 1 keys all there)
    up = subprocess.run([dcmtk("dcmmkdir"), "+U", "-Pgp", str(fid)], cwd=out, capture_output=True, text=True,
                        timeout=60)
    assert up.returncode == 0 and "E:" not in up.stderr, up.stderr
    assert subprocess.run([dcmtk("dcmdump"), str(out / "DICOMDIR")], capture_output=True, text=True,
                          errors="replace", timeout=60).stdout.count('"Directory Record"') == records
    check_dicomdir(out, {**jane, **rt, **more})
    # dicom3tools: the DICOMDIR as a Basic Directory IOD (instances whose own values break
    # their VRs would make it complain: hence the well-formed subset here)
    assert shutil.which("dciodvfy"), "dicom3tools is not installed: apt-get install dicom3tools (ops/test.sh does)"
    v = subprocess.run(["dciodvfy", str(out / "DICOMDIR")], capture_output=True, text=True, errors="replace",
                       timeout=60)
    assert "Error" not in v.stdout + v.stderr and "BasicDirectory" in v.stdout + v.stderr, v.stdout + v.stderr


def test_dicomdir_and_tree_are_exclusive(archive, tmp_path):
    r = export(archive.data_dir, tmp_path / "o", "--all", "--dicomdir", "--layout", "tree")
    assert r.returncode == 2 and "--dicomdir" in r.stderr


def test_a_damaged_dicomdir_is_one_line(archive, tmp_path):
    out = tmp_path / "media"
    out.mkdir()
    (out / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"garbage")
    r = export(archive.data_dir, out, "--all", "--dicomdir")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "DICOMDIR" in r.stderr, r.stderr


def test_one_dicomdir_export_at_a_time(archive, tmp_path):
    import fcntl
    out = tmp_path / "media"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running --dicomdir export holds it
        r = export(archive.data_dir, out, "--all", "--dicomdir")
        assert r.returncode == 1 and "another export" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert os.listdir(out) == []
        assert export(archive.data_dir, out, "--all", "--layout", "flat").returncode == 0  # others need no lock
    finally:
        os.close(fd)
    shutil.rmtree(out)
    assert export(archive.data_dir, out, "--all", "--dicomdir").returncode == 0


def test_unwritable_out_is_one_line(archive, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        r = export(archive.data_dir, out, "--all", "--layout", "tree")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("Error: ") and r.stderr.strip().count("\n") == 0, r.stderr


def test_no_write_through_a_planted_link(archive, tmp_path):
    """In a shared out folder, links planted under the names stowage would use (they are
    predictable) lead nowhere: a folder link stops the export, a file link is replaced."""
    first = tmp_path / "first"
    assert export(archive.data_dir, first, "--patient", "PAT-A", "--layout", "tree").returncode == 0
    (patient,) = os.listdir(first)
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "shared"
    out.mkdir()
    (out / patient).symlink_to(victim)
    r = export(archive.data_dir, out, "--patient", "PAT-A", "--layout", "tree")
    assert r.returncode == 1 and "outside the out folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(victim.iterdir()) == []
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    flat = tmp_path / "flat"
    flat.mkdir()
    uid = next(u for u, ds in archive.meta.items() if ds.PatientID == "PAT-A")
    (flat / f"{uid}.dcm").symlink_to(target)
    from stowage.engine.transfer.export import export as run  # in this process: its temporary file's name is known
    (flat / f".{uid}.dcm.{os.getpid()}.tmp").symlink_to(target)
    assert run(archive.data_dir, flat, "instance", [uid]).written == 1
    assert target.read_text() == "keep me" and not (flat / f"{uid}.dcm").is_symlink()
    assert dataset_bytes(flat / f"{uid}.dcm") == archive.sent[uid]


def test_disk_full_is_one_line_and_leaves_no_partial_file(archive, tmp_path):
    where = tmp_path / "small"
    where.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {(m.stderr or m.stdout).strip()}")
    try:
        for layout in ("flat", "tree"):
            out = where / layout
            r = export(archive.data_dir, out, "--all", "--layout", layout)
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert "no space left" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
            for p in out.rglob("*"):
                assert not p.name.startswith("."), f"a temporary file remains: {p}"
                if p.is_file():
                    assert dataset_bytes(p) == archive.sent[re.search(r"([\d.]+)\.dcm$", p.name).group(1)]
            shutil.rmtree(out)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def test_kill_9_mid_export_leaves_no_partial_file(make_server, tmp_path):
    server = make_server("--workers", "2")
    files = copies(CT, tmp_path / "files", 600, "k")
    storescu(server.port, files)
    out = tmp_path / "out"
    for _attempt in range(10):  # until killed while a file is being written (its tmp file there)
        proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "export", "--data-dir", str(server.data_dir),
                                 "--out", str(out), "--all", "--layout", "tree"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not any(out.rglob(".*.tmp")):
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if any(out.rglob(".*.tmp")):
            break
    assert any(out.rglob(".*.tmp")), "never killed mid-file"
    finals = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.dcm")}
    assert len(finals) < len(files), "the export was not caught mid-way"
    assert export(server.data_dir, tmp_path / "whole", "--all", "--layout", "tree").returncode == 0
    for rel, data in finals.items():
        assert data == (tmp_path / "whole" / rel).read_bytes(), f"{rel} is partial"
    r = export(server.data_dir, out, "--all", "--layout", "tree")  # resumes; sweeps the dead export's tmp file
    assert r.returncode == 0 and f"exported {len(files)} instance(s)" in r.stdout, r.stdout + r.stderr
    assert (f"({len(finals)} already there)" in r.stdout) if finals else ("already" not in r.stdout), r.stdout
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in (tmp_path / "whole").rglob("*"))


def test_corrupt_and_marked_records_are_listed_and_the_rest_exported(make_server, tmp_path):
    from stowage.engine.store.integrity import marks_of
    server = make_server("--workers", "1")
    files = copies(CT, tmp_path / "files", 3, "c")
    storescu(server.port, files)
    server.stop()
    q = cli("query", "--data-dir", str(server.data_dir), "--format", "json",
            "SELECT sop_instance_uid AS uid, segment, \"offset\", record_length FROM instances ORDER BY 1")
    rows = json.loads(q.stdout)
    flipped, marked, good = rows
    with open(server.data_dir / "segments" / flipped["segment"], "r+b") as f:  # a byte inside the payload
        at = flipped["offset"] + flipped["record_length"] - 100
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    marks_of(server.data_dir).mark(marked["segment"], marked["offset"], marked["uid"], "test", "test")
    out = tmp_path / "out"
    r = export(server.data_dir, out, "--all", "--layout", "tree")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and {flipped["uid"], marked["uid"]} == {line.split()[1].rstrip(":") for line in failed}
    assert "marked corrupt" in r.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    assert [p.name.split("_", 1)[1] for p in written] == [f"{good['uid']}.dcm"]  # no partial file, no tmp file


def test_query_tells_sources_apart_by_calling_ae(archive):
    r = cli("query", "--data-dir", str(archive.data_dir), "--format", "json",
            "SELECT calling_ae, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"calling_ae": aet, "n": len(files)} for aet, files in archive.files.items()]


HOSTILE = ["..", ".", "../../etc", "/etc/passwd", "a\\..\\b", "\x00", "x\x00y", "\x1b[2J", "  ", "...hidden",
           "CON", "ＡＢ／..／", "a∕b", "名前/../", "Ω" * 300, "\ud800", "-_-", "\u202eevil"]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_value_never_names_a_path(value):
    from stowage.engine.transfer import export_names as en
    for name in (en.folder([(value, 40), (value, 32)], value, value), en.file_name(value, value),
                 en.tree_parts(en.Names((value, value, value), value, value, value, value, value, value, value,
                                        value, value, value, value))[1]):
        assert name and name not in (".", "..") and not name.startswith(".")
        assert not re.search(r"[\x00-\x1f\x7f/\\∕／\u202e]", name), repr(name)
        assert len(name.encode("utf-8", "surrogatepass")) <= 200
        name.encode("utf-8")  # no lone surrogate survives


def test_names_that_sanitize_alike_stay_apart():
    from stowage.engine.transfer import export_names as en
    a = en.folder([("SAME", 40), ("X/Y", 32)], "", "", "X/Y", "")
    b = en.folder([("SAME", 40), ("X_Y", 32)], "", "", "X_Y", "")
    assert a != b and a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0] == "SAME_X_Y"
