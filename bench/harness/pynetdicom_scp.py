"""Minimal pynetdicom Storage SCP for the ingest benchmark.

Writes every received dataset, as received (no decode), to ``OUT/<SOPInstanceUID>.dcm``.
Run: ``python -m stowage.bench.harness.pynetdicom_scp --port N --aet AET --out DIR``; SIGTERM stops it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


def main(argv: list[str] | None = None) -> None:
    """Serve C-ECHO and C-STORE until killed."""
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.pynetdicom_scp")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--aet", default="PYNETDICOM")
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        with open(out / f"{uid}.dcm", "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title=a.aet)
    ae.maximum_associations = 64
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.start_server((a.bind, a.port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
