"""Send benchmark: `stowage send` of one study of generated CT instances to DCMTK
storescp (writing files, as a real destination does), against DCMTK storescu sending the
same files, and Orthanc sending the same study from its own storage (REST
/modalities/{id}/store, if /usr/sbin/Orthanc is installed), to the same receiver.

    python -m stowage.bench.harness.send --count 500 [--kind ct] [--repeat 3]

Steps: generate the corpus (one patient, one study, one series), start `stowage serve`
(and Orthanc) on free 127.0.0.1 ports, ingest it with storescu, then time each sender
into a fresh storescp output directory. Prints instances/s and MB/s (file bytes).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stowage.bench.harness.orthanc import Orthanc, executable
from stowage.bench.harness.transfer import arrived, one_study, receiving, store_files
from stowage.bench.procs import find_dcmtk, free_port, serve_stowage, tear_down
from stowage.bench.report import timed_medians


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--kind", default="ct")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    storescp, storescu, echoscu = (find_dcmtk(n) for n in ("storescp", "storescu", "echoscu"))
    if not all((storescp, storescu, echoscu)):
        sys.exit("DCMTK is needed: apt-get install dcmtk")
    work = Path(tempfile.mkdtemp(prefix="stowage-bench-send-"))
    server = orthanc = None
    try:
        files, mb, study = one_study(work, args.kind, args.count)
        port = free_port()
        data = work / "data"
        server = serve_stowage(data, port, echoscu)
        store_files(storescu, "STOWAGE", port, files)
        results: dict[str, list[float]] = {"stowage send": [], "storescu (files)": []}
        if executable():
            orthanc = Orthanc(work / "orthanc")
            store_files(storescu, "ORTHANC", orthanc.dicom_port, files)
            (orthanc_study,) = [r["ID"] for r in orthanc.rest("POST", "/tools/lookup", study)
                                if r["Type"] == "Study"]
            results["orthanc store"] = []
        for r in range(args.repeat):
            for name in results:
                out = work / f"rx-{name.split()[0]}-{r}"
                rx_port = free_port()
                with receiving(storescp, echoscu, out, rx_port):
                    if name == "orthanc store":
                        orthanc.rest("PUT", "/modalities/dest", {"AET": "DEST", "Host": "127.0.0.1",
                                                                 "Port": rx_port})
                        t = time.monotonic()
                        orthanc.rest("POST", "/modalities/dest/store", {"Resources": [orthanc_study],
                                                                        "Synchronous": True})
                        results[name].append(time.monotonic() - t)
                    else:
                        if name == "stowage send":
                            cmd = [sys.executable, "-m", "stowage.cli", "send", "--data-dir", str(data), "-q",
                                   "--to", f"127.0.0.1:{rx_port}", "--aec", "DEST", "--study", study]
                        else:
                            cmd = [storescu, "-aec", "DEST", "127.0.0.1", str(rx_port), *map(str, files)]
                        t = time.monotonic()
                        subprocess.run(cmd, check=True, capture_output=True)
                        results[name].append(time.monotonic() - t)
                    got = arrived(out)
                    if got != args.count:
                        raise RuntimeError(f"{name}: {got} of {args.count} arrived")
        print(f"{args.count} {args.kind} instances, {mb:.0f} MB, one association, DCMTK storescp +B -od")
        print("\n".join(timed_medians(results, args.count, mb, "storescu (files)")))
    finally:
        tear_down(work, server, orthanc)


if __name__ == "__main__":
    main()
