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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stowage.bench.corpus import generate
from stowage.bench.harness.orthanc import Orthanc, executable
from stowage.bench.procs import find_dcmtk, free_port, serve_stowage, stop_tree, tear_down, wait_echo
from stowage.bench.report import timed_medians


def _storescp(storescp: str, echoscu: str, out: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    out.mkdir(parents=True)
    proc = subprocess.Popen([storescp, "+B", "-aet", "DEST", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_echo(echoscu, port, "DEST")
    return proc, port


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
        files = generate(work / "corpus", args.kind, args.count, patients=1, studies_per_patient=1,
                         series_per_study=1)
        mb = sum(p.stat().st_size for p in files) / 1e6
        port = free_port()
        data = work / "data"
        server = serve_stowage(data, port, echoscu)
        subprocess.run([storescu, "-aec", "STOWAGE", "127.0.0.1", str(port), *map(str, files)], check=True,
                       capture_output=True)
        import pydicom
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        results: dict[str, list[float]] = {"stowage send": [], "storescu (files)": []}
        if executable():
            orthanc = Orthanc(work / "orthanc")
            subprocess.run([storescu, "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
                           check=True, capture_output=True)
            (orthanc_study,) = [r["ID"] for r in orthanc.rest("POST", "/tools/lookup", study)
                                if r["Type"] == "Study"]
            results["orthanc store"] = []
        for r in range(args.repeat):
            for name in results:
                out = work / f"rx-{name.split()[0]}-{r}"
                rx, rx_port = _storescp(storescp, echoscu, out)
                try:
                    if name == "orthanc store":
                        orthanc.rest("PUT", "/modalities/dest", {"AET": "DEST", "Host": "127.0.0.1",
                                                                 "Port": rx_port})
                        t = time.monotonic()
                        orthanc.rest("POST", "/modalities/dest/store", {"Resources": [orthanc_study],
                                                                        "Synchronous": True})
                        results[name].append(time.monotonic() - t)
                    else:
                        if name == "stowage send":
                            cmd = [sys.executable, "-m", "stowage.engine.cli", "send", "--data-dir", str(data), "-q",
                                   "--to", f"127.0.0.1:{rx_port}", "--aec", "DEST", "--study", study]
                        else:
                            cmd = [storescu, "-aec", "DEST", "127.0.0.1", str(rx_port), *map(str, files)]
                        t = time.monotonic()
                        subprocess.run(cmd, check=True, capture_output=True)
                        results[name].append(time.monotonic() - t)
                    got = len(list(out.iterdir()))
                    if got != args.count:
                        raise RuntimeError(f"{name}: {got} of {args.count} arrived")
                finally:
                    stop_tree(rx, None)
                shutil.rmtree(out)
        print(f"{args.count} {args.kind} instances, {mb:.0f} MB, one association, DCMTK storescp +B -od")
        print("\n".join(timed_medians(results, args.count, mb, "storescu (files)")))
    finally:
        tear_down(work, server, orthanc)


if __name__ == "__main__":
    main()
