"""Accept headers of PS3.18 8.7: which media type, transfer syntax and charset a client
takes, best first. `multipart/related; type="application/dicom"; transfer-syntax=*` is one
alternative: (multipart, application/dicom, "*")."""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
)

from stowage.engine.web.errors import refusal

# PS3.18 Table 8.7.3-5: the media type of a frame or bulk data in a compressed syntax.
IMAGE_MEDIA_TYPES = {
    JPEGBaseline8Bit: "image/jpeg", JPEGExtended12Bit: "image/jpeg", JPEGLossless: "image/jpeg",
    JPEGLosslessSV1: "image/jpeg", JPEGLSLossless: "image/jls", JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2", JPEG2000: "image/jp2", HTJ2KLossless: "image/jphc",
    HTJ2KLosslessRPCL: "image/jphc", HTJ2K: "image/jphc", RLELossless: "image/dicom-rle",
}
DEFAULT_SYNTAX = {"application/dicom": ExplicitVRLittleEndian, "application/octet-stream": ExplicitVRLittleEndian,
                  "image/jpeg": JPEGBaseline8Bit, "image/jls": JPEGLSLossless, "image/jp2": JPEG2000Lossless,
                  "image/jphc": HTJ2KLossless, "image/dicom-rle": RLELossless}


@dataclass(frozen=True)
class Alternative:
    multipart: bool
    media_type: str          # the part's media type for multipart, else the whole body's
    transfer_syntax: str | None  # "*", a UID, or None (the media type's default)
    q: float


def _params(text: str) -> tuple[str, dict[str, str]]:
    pieces = [p.strip() for p in text.split(";")]
    params = {}
    for piece in pieces[1:]:
        if "=" in piece:
            k, v = piece.split("=", 1)
            params[k.strip().lower()] = v.strip().strip('"')
    return pieces[0].lower(), params


def _split(header: str) -> list[str]:
    """Comma-separated alternatives (commas inside quotes do not split)."""
    out, cur, quoted = [], [], False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [o.strip() for o in out if o.strip()]


def alternatives(header: str | None, default_part: str) -> list[Alternative]:
    """The Accept header's alternatives, best first (by q, then order). No header, or
    `*/*`, is multipart of `default_part` in its default syntax, unless the header refuses
    that with q=0 (`multipart/related; type="application/dicom"; q=0, */*`: RFC 9110
    12.5.1, a wildcard does not bring back what is named as not acceptable)."""
    no = refused_parts(header)
    found = []
    for index, text in enumerate(_split(header or "*/*")):
        media, params = _params(text)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            raise refusal(400, f"Accept: q={params.get('q')!r} is not a number") from None
        ts = params.get("transfer-syntax")
        if ts is not None and ts != "*" and not UID(ts).is_valid:
            raise refusal(400, f"Accept: transfer-syntax={ts[:70]!r} is not a UID")
        if media == "multipart/related":
            part = params.get("type", default_part).lower()
            found.append((-q, index, Alternative(True, part, ts, q)))
        elif media in ("*/*", "multipart/*"):
            if default_part not in no and "*" not in no:
                found.append((-q, index, Alternative(True, default_part, ts, q)))
        else:
            found.append((-q, index, Alternative(False, media, ts, q)))
    return [a for _q, _i, a in sorted(found, key=lambda t: t[:2]) if a.q > 0]


def refused(header: str | None) -> set[str]:
    """The media types the Accept header names with q=0 (RFC 9110 12.5.1: "not acceptable"),
    which a wildcard elsewhere in it does not bring back."""
    out = set()
    for text in _split(header or ""):
        media, params = _params(text)
        if _q(params) <= 0:
            out.add(media)
    return out


def _q(params: dict[str, str]) -> float:
    """An alternative's q; 1 when it cannot be read (alternatives() refuses such a header)."""
    try:
        return float(params.get("q", "1"))
    except ValueError:
        return 1.0


def refused_parts(header: str | None) -> set[str]:
    """The part types `multipart/related` is refused for with q=0 ("*": every part type,
    when the refusal names none)."""
    out = set()
    for text in _split(header or ""):
        media, params = _params(text)
        if media == "multipart/related" and _q(params) <= 0:
            out.add(params.get("type", "*").lower())
    return out


def image_media_type(transfer_syntax: str) -> str:
    return IMAGE_MEDIA_TYPES.get(transfer_syntax, "application/octet-stream")
