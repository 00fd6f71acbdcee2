"""DELETE of a study, series or instance (PS3.18 defines no deletion; dicomweb-client,
dcm4chee-arc and Orthanc use DELETE on the resource), off unless `http_delete = true`: through the very code
of `stowage delete` (engine/lifecycle/delete.py: durable tombstones, hidden at once from
every door, an audit line). The path must name a series or instance under the study it
names, so a wrong study in the URL deletes nothing. The series metadata kept on disk of
what it deletes goes with it (engine/store/series_cache.py)."""
from __future__ import annotations

from aiohttp import web

from stowage.engine.lifecycle.delete import DeleteError, delete
from stowage.engine.web.access import TOKEN_NAME
from stowage.engine.web.context import CONFIG, path_uid
from stowage.engine.web.errors import refusal
from stowage.engine.web.records import find
from stowage.engine.web.store import STORE


async def delete_resource(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    info = request.match_info
    if not config.http_delete:  # Allow: what this resource takes (STOW-RS posts to a study, not below)
        raise refusal(405, "DELETE is turned off on this archive (set http_delete = true to allow it)",
                      {"Allow": "GET, HEAD" if "series" in info else "GET, HEAD, POST"})
    study = path_uid(request, "study")
    series = path_uid(request, "series") if "series" in info else None
    instance = path_uid(request, "instance") if "instance" in info else None
    store = request.app[STORE]
    found = await store.run(find, store.lookups, study, series, instance)
    if not found:
        raise refusal(404, f"no such {'instance' if instance else 'series' if series else 'study'} in this archive")
    level, uid = ("instance", instance) if instance else ("series", series) if series else ("study", study)
    actor = f"dicomweb:{request.get(TOKEN_NAME, '?')}@{request.remote}"
    try:
        result = await store.run(delete, config, level, [uid], actor=actor, catalog=store.lookups)
    except DeleteError as e:
        raise refusal(400, str(e)) from None
    return web.json_response({"deleted": result.summary()}, status=200)


def routes(base: str) -> list[web.RouteDef]:
    s, se, i = f"{base}/studies/{{study}}", "/series/{series}", "/instances/{instance}"
    return [web.delete(s, delete_resource), web.delete(s + se, delete_resource), web.delete(s + se + i, delete_resource)]
