"""Negotiation keeps the sender's encoding: a requestor that proposes a compressed transfer
syntax first, beside the uncompressed ones in the same presentation context (as C-MOVE
sources like dcmqrscp do), gets it, so the instance is stored as
the sender holds it rather than decompressed on the way in."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from conftest import HOST, dataset_bytes, dcmtk, export_all

RLE = Path(get_testdata_file("MR_small_RLE.dcm"))
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def test_compressed_first_choice_is_accepted_and_stored_byte_exact(server, tmp_path):
    from pynetdicom import AE
    ds = pydicom.dcmread(RLE)
    ae = AE("RLESCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    # one context, RLE first, then the uncompressed syntaxes: as dcmqrscp proposes for C-MOVE
    ae.add_requested_context(ds.SOPClassUID, [RLE_LOSSLESS, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        assert str(assoc.accepted_contexts[0].transfer_syntax[0]) == RLE_LOSSLESS
        status = assoc.send_c_store(RLE)  # the file as it is: its data set bytes go out unchanged
        assert status and status.Status == 0x0000, status
    finally:
        assoc.release()
    out = tmp_path / "out"
    assert export_all(server.data_dir, out).returncode == 0
    got = out / f"{ds.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLE_LOSSLESS
    assert dataset_bytes(got) == dataset_bytes(RLE)


def test_uncompressed_first_choice_keeps_our_preference(server, tmp_path):
    """A sender listing Implicit VR first (storescu -xi) still gets an uncompressed syntax
    it proposed; nothing changes for uncompressed senders."""
    ct = Path(get_testdata_file("CT_small.dcm"))
    r = subprocess.run([dcmtk("storescu"), "-aec", "STOWAGE", "-xi", HOST, str(server.port), str(ct)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert export_all(server.data_dir, out).returncode == 0
    got = out / f"{pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID}.dcm"
    assert str(pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
