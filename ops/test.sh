#!/usr/bin/env bash
# Install everything the tests need (DCMTK and Orthanc from Debian, stowage and its test
# extras from PyPI), then run the whole test suite. Root or sudo is needed for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
[ -x /usr/bin/storescp ] || missing+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)   # a storage commitment peer; tests run it as a subprocess
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)  # tests/test_dicomweb_orthanc.py
command -v openssl >/dev/null || missing+=(openssl)  # tests/test_tls.py makes its certificates with it
command -v dciodvfy >/dev/null || missing+=(dicom3tools)  # tests/test_export.py checks the DICOMDIR with it
command -v faketime >/dev/null || missing+=(faketime)  # tests/test_deidentify_consistency.py: a process on another day
[ -x /usr/bin/chromium ] || missing+=(chromium)  # the real browser of tests/browser.py (dashboard, OHIF viewer)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)  # tests/test_iceberg_catalog.py: a SQL catalog
[ -x /usr/sbin/haproxy ] || missing+=(haproxy)  # tests/test_haproxy.py: the balancer in front of two nodes
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install -q -e '.[test]'
# One test process per core, up to 4 (pytest-xdist), each taking whole files (--dist loadfile:
# a module's fixtures start once): most tests wait on peers, timeouts and fsyncs, so two on two
# cores finish the suite in a little over half the time of one (1,167 s against 2,084 s). Later
# flags win: `-n 0` runs it serially.
jobs=$(nproc); [ "$jobs" -le 4 ] || jobs=4
# Where apt-get puts DCMTK, tried first: otherwise each test process asks pynetdicom's
# scripts of the same names for their --version first (a Python start-up each, seconds
# under load) before it finds DCMTK's (bench/procs.find_dcmtk).
export DCMTK_BIN="${DCMTK_BIN:-/usr/bin}"
exec python3 -m pytest -q -n "$jobs" --dist loadfile --no-loadscope-reorder "$@"
