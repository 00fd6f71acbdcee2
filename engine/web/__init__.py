"""DICOMweb (PS3.18) and the web pages, on an HTTP port of `stowage serve` of its own.

`app.build_app(config)` is the aiohttp application: DICOMweb under `/dicom-web`, the
dashboard and the viewer beside it. `processes.HttpProcesses` is the acceptor's side:
it binds the port and runs `http_processes` processes (`process.py`) that share it.
"""
