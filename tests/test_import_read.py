"""How an import process reads a file: the file meta from a first, short read, then the
data set as bytes of its own. File meta groups of every length around that first read's
size must give exactly the bytes after the meta, as pydicom finds them."""
from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement

from stowage.engine.importer import loader
from stowage.engine.importer.part10 import Malformed, check_whole
from test_import import dataset_of


def _with_meta_padding(path: Path, private_length: int) -> bytes:
    """CT_small with a Private Information (0002,0102) of `private_length` bytes in its
    file meta and a short element after it (so that, as lengths vary, its header falls
    across the end of the first read), written as a Part-10 file; returns the bytes."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta[0x00020102] = DataElement(0x00020102, "OB", b"\x01" * private_length)
    ds.file_meta[0x00020200] = DataElement(0x00020200, "UI", "1.2")
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


@pytest.mark.parametrize("delta", [-40, -10, -8, -6, -4, -2, 0, 2, 4, 6, 8, 10, 40, 5000])  # even, as values are padded
def test_meta_of_any_length_gives_the_exact_data_set(tmp_path, delta):
    probe = _with_meta_padding(tmp_path / "probe.dcm", 2)
    base_offset = len(probe) - len(dataset_of(probe))  # preamble, DICM and meta with 2 bytes private
    private = loader._META_READ - base_offset + delta + 2
    raw = _with_meta_padding(tmp_path / "f.dcm", private)
    expected = dataset_of(raw)
    assert len(raw) - len(expected) == loader._META_READ + delta  # the data set starts where we meant
    fd = os.open(tmp_path / "f.dcm", os.O_RDONLY)
    try:
        info, dataset, head = loader._read_file(fd, len(raw))
    finally:
        os.close(fd)
    assert dataset == expected
    assert head == raw[:info.dataset_offset]
    assert info.sop_instance_uid == pydicom.dcmread(tmp_path / "f.dcm").SOPInstanceUID
    check_whole(dataset, info.transfer_syntax_uid, info.dataset_offset)


def test_truncation_is_reported_at_its_place_in_the_file(tmp_path):
    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    cut = tmp_path / "cut.dcm"
    size = len(raw) // 2  # within Pixel Data
    cut.write_bytes(raw[:size])
    fd = os.open(cut, os.O_RDONLY)
    try:
        info, dataset, _head = loader._read_file(fd, size)
    finally:
        os.close(fd)
    pixel_data_at = raw.rindex(b"\xe0\x7f\x10\x00OW")  # its element header, counted in the file
    with pytest.raises(Malformed, match=rf"truncated: element \(7FE0,0010\) of \d+ bytes at byte {pixel_data_at} "
                                        rf"runs past the end of the file \({size} bytes\)"):
        check_whole(dataset, info.transfer_syntax_uid, info.dataset_offset)
