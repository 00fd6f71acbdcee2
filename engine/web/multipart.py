"""multipart/related bodies (RFC 2387, PS3.18 8.6): writing WADO-RS answers part by part
as they are read, never the whole body in memory; reading STOW-RS bodies (aiohttp's reader)."""
from __future__ import annotations

import uuid

from aiohttp import web
from aiohttp.multipart import MultipartReader


class MultipartWriter:
    """Streams parts into a prepared StreamResponse."""

    def __init__(self, part_type: str) -> None:
        self.boundary = uuid.uuid4().hex
        self.part_type = part_type
        self.parts = 0

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    async def start(self, request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": self.content_type, **(headers or {})})
        response.enable_chunked_encoding()
        await response.prepare(request)
        self.response = response
        return response

    async def part(self, content_type: str, first: bytes = b"", location: str | None = None) -> None:
        """Begin a part (its headers, then `first`); more bytes follow with write()."""
        head = f"--{self.boundary}\r\nContent-Type: {content_type}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        await self.response.write(("\r\n" if self.parts else "").encode() + head.encode() + b"\r\n" + first)
        self.parts += 1

    async def write(self, data: bytes | memoryview) -> None:
        await self.response.write(data)

    async def finish(self) -> web.StreamResponse:
        await self.response.write((f"\r\n--{self.boundary}--\r\n" if self.parts else
                                   f"--{self.boundary}--\r\n").encode())
        await self.response.write_eof()
        return self.response


class LenientReader(MultipartReader):
    """aiohttp's reader, taking boundaries past RFC 2046's 70 characters (up to 200):
    Orthanc's DICOMweb plugin sends 73."""

    def _get_boundary(self) -> str:
        boundary = self._mimetype.parameters["boundary"]
        if not 0 < len(boundary) <= 200:
            raise ValueError(f"the boundary is {len(boundary)} characters long (1 to 200 taken)")
        return boundary
