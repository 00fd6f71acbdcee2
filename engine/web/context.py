"""What every handler needs from the application: its configuration, the DICOMweb base
path, this server's URL as the client reached it, and the UIDs of the path, checked."""
from __future__ import annotations

import re

from aiohttp import web

from stowage.engine.runtime.config import Config
from stowage.engine.store.archive import valid_uid
from stowage.engine.web.errors import refusal

CONFIG = web.AppKey("config", Config)
DICOMWEB = "/dicom-web"  # the DICOMweb base path (the "service" root of PS3.18)
# uri-host [":" port] (RFC 9110 7.2, RFC 3986 3.2.2): ASCII only. Anything else (a byte
# aiohttp kept as a surrogate) would go into every Retrieve URL we answer with.
_HOST = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%:\[\]]+")


def base_url(request: web.Request) -> str:
    """This server's DICOMweb root as the client reached it: the Host header, with our
    port added when the header lacks one (some clients, dicomweb-client among them, send
    the host name alone)."""
    host = request.host
    if not _HOST.fullmatch(host):
        raise refusal(400, f"the Host header {host[:80]!r} is not a host name and port (RFC 9110 7.2)")
    if ":" not in host.rsplit("]", 1)[-1]:  # no port after the name or the IPv6 literal ("[::1]" has none)
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = sockname[1] if sockname else None
        if port and port != (443 if request.scheme == "https" else 80):
            host = f"{host}:{port}"
    return f"{request.scheme}://{host}{DICOMWEB}"


def path_uid(request: web.Request, name: str) -> str:
    """The UID `name` ({study}, {series}, {instance}) of the path; 400 when it is not one."""
    uid = request.match_info[name]
    if not valid_uid(uid):
        raise refusal(400, f"{name} {uid[:80]!r} is not a valid UID (digits and dots, at most 64)")
    return uid
