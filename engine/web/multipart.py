"""multipart/related bodies (RFC 2387, PS3.18 8.6): writing WADO-RS answers part by part
as they are read, never the whole body in memory; reading STOW-RS bodies as they arrive (RelatedParser)."""
from __future__ import annotations

import uuid

from aiohttp import web

from stowage.engine.web.sending import StreamedResponse


class MultipartWriter:
    """Streams parts into a prepared StreamResponse."""

    def __init__(self, part_type: str) -> None:
        self.boundary = uuid.uuid4().hex
        self.part_type = part_type
        self.parts = 0

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    async def start(self, request: web.Request, headers: dict[str, str] | None = None,
                    length: int | None = None) -> web.StreamResponse:
        """Send the status and headers: the body's `length` when known beforehand (each
        part then goes to the socket as it is, without chunk framing joined to it), else
        chunked; to an HTTP/1.0 client, which knows no chunks (nginx proxies in HTTP/1.0
        unless told otherwise), aiohttp ends such a body by closing the connection.
        enable_chunked_encoding() refused HTTP/1.0 with a RuntimeError: a 500."""
        response = StreamedResponse(headers={"Content-Type": self.content_type, **(headers or {})})
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        self.response = response
        return response

    def head(self, content_type: str, location: str | None = None, first: bool = False) -> bytes:
        """A part's delimiter and headers (`first`: the body's first part)."""
        head = f"--{self.boundary}\r\nContent-Type: {content_type}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        return (("" if first else "\r\n") + head + "\r\n").encode()

    async def part(self, content_type: str, first: bytes = b"", location: str | None = None) -> None:
        """Begin a part (its headers, then `first`); more bytes follow with write()."""
        await self.response.write(self.head(content_type, location, not self.parts) + first)
        self.parts += 1

    def closing(self, after_parts: bool | None = None) -> bytes:
        """The close delimiter, as finish() writes it (after parts, or none, or as many as
        written so far)."""
        after = bool(self.parts) if after_parts is None else after_parts
        return (f"\r\n--{self.boundary}--\r\n" if after else f"--{self.boundary}--\r\n").encode()

    async def whole_part(self, encoded: bytes | memoryview) -> None:
        """A part made whole beforehand (head() and its bytes, joined once: off the event
        loop, in the thread that read them)."""
        await self.response.write(encoded)
        self.parts += 1

    async def write(self, data: bytes | memoryview) -> None:
        await self.response.write(data)

    async def finish(self) -> web.StreamResponse:
        await self.response.write(self.closing())
        await self.response.write_eof()
        return self.response


class MultipartError(ValueError):
    """A body that is not a well-formed multipart; the message says where."""


class RelatedParser:
    """A push parser of a multipart body (RFC 2046 5.1): feed() it bytes as they arrive and
    it returns what they complete: ("start", headers), ("data", bytes or memoryview) any
    number of times, ("end",) per part, then ("done",) at the closing delimiter. Boundaries
    are found with bytes.find (C speed), whatever the chunking; memory is the chunk plus the
    boundary. A part's body is handed out as views of the chunks fed (valid while the caller
    holds them), not copied: the receiver copies each byte once, where it keeps it."""

    MAX_HEADERS = 16 << 10
    _STEP = 16 << 10  # what the small states (preamble, delimiter line, headers) take into the buffer at a time

    def __init__(self, boundary: str) -> None:
        if not 0 < len(boundary) <= 200:
            raise MultipartError(f"the boundary is {len(boundary)} characters long (1 to 200 taken)")
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        self.buf = bytearray(b"\r\n")  # so that a delimiter at the very start is found like the others
        self.state = "preamble"
        self.parts = 0

    def feed(self, data: bytes) -> list[tuple]:
        events: list[tuple] = []
        pos = 0
        while pos < len(data) and self.state != "done":  # after "done" the epilogue is ignored
            if self.state == "body" and len(self.buf) < len(self.delimiter):
                pos = self._body_in(data, pos, events)
                continue
            step = data[pos:pos + self._STEP]
            self.buf += step
            pos += len(step)
            self._run(events)
        return events

    def _run(self, events: list) -> None:
        """Move the state machine over the buffer until it needs more bytes."""
        while True:
            before = (self.state, len(self.buf))
            getattr(self, "_" + self.state)(events)
            if self.state == "done" or (self.state, len(self.buf)) == before:
                return

    def _body_in(self, data: bytes, pos: int, events: list) -> int:
        """A part's body read from `data` itself (from `pos`), the buffer holding less than a
        delimiter: views of `data` handed out up to the next delimiter, or to all but its
        last len(delimiter) - 1 bytes (kept, as a delimiter may begin there). Returns where
        the bytes not yet looked at begin."""
        keep = len(self.delimiter) - 1
        if self.buf:  # the tail kept from the last chunk: a delimiter across the two?
            edge = data[pos:pos + keep]
            if self.delimiter in bytes(self.buf) + edge or len(edge) < keep:  # across, or cannot tell yet
                self.buf += edge
                self._run(events)
                return pos + len(edge)
            events.append(("data", bytes(self.buf)))
            self.buf.clear()
        view = memoryview(data)
        i = data.find(self.delimiter, pos)
        if i < 0:
            end = max(pos, len(data) - keep)
            if end > pos:
                events.append(("data", view[pos:end]))
            self.buf += view[end:]
            return len(data)
        if i > pos:
            events.append(("data", view[pos:i]))
        events.append(("end",))
        self.state = "after_delimiter"
        return i + len(self.delimiter)

    def finish(self) -> None:
        """The body ended: raises MultipartError unless the closing delimiter was read."""
        if self.state != "done":
            where = "before its first part" if self.parts == 0 and self.state == "preamble" else \
                f"in part {max(self.parts, 1)}"
            raise MultipartError(f"the body ends before its closing boundary ({where})")

    def _preamble(self, events: list) -> None:
        i = self.buf.find(self.delimiter)
        if i < 0:
            keep = len(self.delimiter) - 1
            if len(self.buf) > keep:
                del self.buf[:len(self.buf) - keep]
            return
        del self.buf[:i + len(self.delimiter)]
        self.state = "after_delimiter"

    def _after_delimiter(self, events: list) -> None:
        if len(self.buf) < 2:
            return
        if self.buf[:2] == b"--":
            self.state = "done"
            events.append(("done",))
            return
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > 1024:
                raise MultipartError(f"junk after the boundary of part {self.parts + 1}")
            return
        if self.buf[:end].strip(b" \t"):
            raise MultipartError(f"junk after the boundary of part {self.parts + 1}")
        del self.buf[:end + 2]
        self.state = "headers"

    def _headers(self, events: list) -> None:
        if self.buf[:2] == b"\r\n":
            head, rest = b"", 2
        else:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > self.MAX_HEADERS:
                    raise MultipartError(f"the headers of part {self.parts + 1} are longer than 16 KB")
                return
            head, rest = bytes(self.buf[:end]), end + 4
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise MultipartError(f"a header line of part {self.parts + 1} has no name: {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        del self.buf[:rest]
        self.parts += 1
        self.state = "body"
        events.append(("start", headers))

    def _body(self, events: list) -> None:
        i = self.buf.find(self.delimiter)
        if i < 0:
            keep = len(self.delimiter) - 1
            if len(self.buf) > keep:
                events.append(("data", self._take(len(self.buf) - keep)))
            return
        if i:
            events.append(("data", self._take(i)))
        events.append(("end",))
        del self.buf[:len(self.delimiter)]
        self.state = "after_delimiter"

    def _take(self, n: int) -> bytes:
        """The first n bytes of the buffer, copied once, and removed from it."""
        with memoryview(self.buf) as view:
            data = view[:n].tobytes()
        del self.buf[:n]
        return data
