"""Rendered resources and thumbnails (PS3.18 8.3.5 and 10.4.1.1.4): consumer-ready JPEG or
PNG images of a study, series, instance or frame.

Pixels go through the Modality LUT (rescale), then the VOI window: `window=center,width[,
linear|linear-exact|sigmoid]` when given, else the data set's first Window Center/Width,
else the frame's range. `viewport=vw,vh` fits the image into vw x vh keeping its aspect
ratio, after cutting out the source region `sx,sy,sw,sh` when given (`viewport=vw,vh,sx,sy,
sw,sh`; a negative sw or sh flips); `quality` (1-100) is the JPEG quality. A series renders
its middle instance, a study its first series' middle instance; a multi-frame instance its
first frame (or the one named).
"""
from __future__ import annotations

import math
from io import BytesIO

import numpy as np
from aiohttp import web
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from stowage.engine.web import pixels
from stowage.engine.web.context import path_uid
from stowage.engine.web.errors import refusal
from stowage.engine.web.negotiation import alternatives, refused
from stowage.engine.web.records import Instance, Unreadable
from stowage.engine.web.store import STORE, WebStore
from stowage.engine.web.transcode import MAX_BYTES

_STUDY_TRIES = 8  # a study renders the middle instance of its first series with pixel data among these

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG"}
THUMBNAIL = (128, 128)
_MAX_VIEWPORT = 4096


def _numbers(text: str, n: int, what: str, low: float | None = None) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise refusal(400, f"{what}={text[:40]!r}: numbers separated by commas") from None
    if not all(math.isfinite(v) for v in values):  # float() takes nan, inf and 1e400: no size, window or quality
        raise refusal(400, f"{what}={text[:40]!r}: finite numbers expected")
    if len(values) < n or (low is not None and any(v < low for v in values[:n])):
        raise refusal(400, f"{what}={text[:40]!r}: {n} numbers expected")
    return values


def _options(request: web.Request, thumbnail: bool) -> dict:
    q = request.query
    unknown = set(q) - {"window", "viewport", "quality", "access_token", "annotation", "charset"}
    if unknown:
        raise refusal(400, f"unknown parameter(s) {', '.join(sorted(unknown))[:80]} "
                           "(rendered takes window, viewport, quality)")
    out: dict = {"window": None, "function": "linear", "viewport": THUMBNAIL if thumbnail else None, "quality": 90}
    if "window" in q:
        parts = q["window"].split(",")
        center, width = _numbers(",".join(parts[:2]), 2, "window")[:2]
        if width <= 0:
            raise refusal(400, "window: the width must be above 0")
        out["window"] = (center, width)
        if len(parts) > 2:
            fn = parts[2].strip().lower()
            if fn not in ("linear", "linear-exact", "sigmoid"):
                raise refusal(400, f"window function {fn[:20]!r}: linear, linear-exact or sigmoid")
            out["function"] = fn
    if "viewport" in q:
        values = _numbers(q["viewport"], 2, "viewport", low=1)
        vw, vh = values[:2]
        out["viewport"] = (min(int(vw), _MAX_VIEWPORT), min(int(vh), _MAX_VIEWPORT))
        if len(values) > 2:  # the source region (PS3.18 8.3.5.1.3): it was ignored, the whole image sent
            if len(values) != 6 or min(values[2:4]) < 0 or 0 in values[4:6]:
                raise refusal(400, f"viewport={q['viewport'][:60]!r}: vw,vh or vw,vh,sx,sy,sw,sh (sx, sy >= 0; "
                                   "sw, sh not 0, negative to flip)")
            out["region"] = tuple(values[2:6])
    if "quality" in q:
        quality = _numbers(q["quality"], 1, "quality", low=1)[0]
        if quality > 100:
            raise refusal(400, "quality: 1 to 100")
        out["quality"] = int(quality)
    return out


def _media_type(request: web.Request) -> str:
    accept = request.headers.get("Accept")
    no = refused(accept)  # a wildcard means any format but these ("image/jpeg; q=0, image/*": PNG)
    for alt in alternatives(accept, "image/jpeg"):
        if alt.media_type in FORMATS and alt.media_type not in no:
            return alt.media_type
        if alt.media_type in ("*/*", "image/*") or alt.multipart:
            for media in FORMATS:
                if media not in no:
                    return media
    raise refusal(406, "rendered images are given as image/jpeg or image/png")


def _to_8bit(arr: np.ndarray, ds, opts: dict) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # color: as it is, scaled to 8 bits
        if arr.dtype != np.uint8:
            top = float(arr.max()) or 1.0
            arr = (arr.astype(np.float64) * (255.0 / top)).clip(0, 255)
        return arr.astype(np.uint8)
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if opts["window"] is not None:
        center, width = opts["window"]
        if opts["function"] == "sigmoid":
            out = 255.0 / (1 + np.exp(-4 * (values - center) / width))
        else:
            if opts["function"] == "linear":
                center, width = center - 0.5, max(width - 1, 1e-6)
            out = ((values - center) / width + 0.5) * 255.0
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = apply_voi_lut(values, ds, index=0)
        low, high = float(np.min(out)), float(np.max(out))
        out = (out - low) * (255.0 / ((high - low) or 1.0))
    else:
        low, high = float(values.min()), float(values.max())
        out = (values - low) * (255.0 / ((high - low) or 1.0))
    out = out.clip(0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out


def render(store: WebStore, inst: Instance, frame: int, opts: dict, media_type: str) -> bytes:
    if inst.dataset_length > MAX_BYTES:
        raise pixels.FrameError(413, f"instances over {MAX_BYTES >> 20} MB are not rendered")
    part10 = store.reader.part10(inst)
    ds = pixels.read(part10)
    pixels.check(ds, [frame])
    try:
        arr = pixel_array(BytesIO(part10), index=frame - 1)
    except Exception as e:
        raise pixels.FrameError(406, f"cannot decode the pixels: {str(e).splitlines()[0] if str(e) else e}") from None
    image = Image.fromarray(_to_8bit(arr, ds, opts))
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if opts.get("region") is not None:
        image = _region(image, *opts["region"])
    if opts["viewport"] is not None:  # fit, keeping the aspect ratio
        vw, vh = opts["viewport"]
        scale = min(vw / image.width, vh / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    out = BytesIO()
    if FORMATS[media_type] == "JPEG":
        image.save(out, "JPEG", quality=opts["quality"])
    else:
        image.save(out, "PNG")
    return out.getvalue()


def _region(image: Image.Image, sx: float, sy: float, sw: float, sh: float) -> Image.Image:
    """The part of `image` from (sx, sy) sw wide and sh high, flipped where sw or sh is
    negative (the region then extends left of sx, or above sy)."""
    x0, x1 = sorted((sx, sx + sw))
    y0, y1 = sorted((sy, sy + sh))
    box = (max(0, round(x0)), max(0, round(y0)), min(image.width, round(x1)), min(image.height, round(y1)))
    if box[0] >= box[2] or box[1] >= box[3]:
        raise pixels.FrameError(400, f"viewport: the region {sx:g},{sy:g},{sw:g},{sh:g} lies outside the "
                                     f"{image.width}x{image.height} image")
    image = image.crop(box)
    if sw < 0:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if sh < 0:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


async def _rendered(request: web.Request, thumbnail: bool) -> web.Response:
    info = request.match_info
    opts = _options(request, thumbnail)
    media_type = _media_type(request)
    frame = 1
    if "frames" in info:
        text = info["frames"]
        if not text.isdigit() or len(text) > 9 or int(text) < 1:
            raise refusal(400, f"frame {text[:20]!r}: one frame number from 1 (rendered takes one frame)")
        frame = int(text)
    store = request.app[STORE]
    study = path_uid(request, "study")
    series = path_uid(request, "series") if "series" in info else None
    instance = path_uid(request, "instance") if "instance" in info else None
    found = await store.run(store.find, study, series, instance)
    if not found:
        raise refusal(404, f"no such {'instance' if instance else 'series' if series else 'study'} in this archive")
    candidates = _middles(found)[:_STUDY_TRIES] if series is None else _middles(found)
    for k, chosen in enumerate(candidates):
        try:
            body = await store.run(render, store, chosen, frame, opts, media_type)
        except pixels.NoPixelData as e:
            if k + 1 < len(candidates):
                continue  # a study: its next series (an SR or KO series may come first)
            raise refusal(e.status, str(e) if len(candidates) == 1 else
                          f"none of the first {len(candidates)} series of this study has pixel data") from None
        except pixels.FrameError as e:
            raise refusal(e.status, str(e)) from None
        except Unreadable as e:
            raise refusal(500, str(e)) from None
        return web.Response(body=body, content_type=media_type)
    raise AssertionError("found is never empty here")


def _middles(found: list[Instance]) -> list[Instance]:
    """The middle instance of each series in `found`, in series order (one instance: itself)."""
    by_series: dict[str, list[Instance]] = {}
    for inst in found:
        by_series.setdefault(inst.series, []).append(inst)
    return [members[len(members) // 2] for members in by_series.values()]


async def rendered(request: web.Request) -> web.Response:
    return await _rendered(request, thumbnail=False)


async def thumbnail(request: web.Request) -> web.Response:
    return await _rendered(request, thumbnail=True)


def routes(base: str) -> list[web.RouteDef]:
    s, se, i = f"{base}/studies/{{study}}", "/series/{series}", "/instances/{instance}"
    out = []
    for path in (s, s + se, s + se + i, s + se + i + "/frames/{frames}"):
        out += [web.get(path + "/rendered", rendered), web.get(path + "/thumbnail", thumbnail)]
    return out
