"""HTTP/1.x framing for the dev server: where each message begins and ends.

Sans-IO and pure: heads are parsed from bytes, bodies are delimited by the rules of RFC
9112 (section 6), and a chunked body is scanned incrementally without being decoded
into copies, so the dev server forwards every byte as it came. Anything outside what
these functions understand raises :class:`ParseError`; the dev server then falls back
to piping raw bytes, which is what it did before it understood HTTP at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

MAX_HEAD = 64 * 1024  # request line or status line plus headers
MAX_CHUNK_LINE = 8 * 1024  # a chunk-size line with its extensions, or a trailer line
HEAD_END = b"\r\n\r\n"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.([01])")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only (str.isdigit() takes "²"), below int's digit limit
# Hop-by-hop headers that describe the worker's connection, not the client's.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection"})


class ParseError(ValueError):
    """Bytes that are not HTTP/1.x as this module understands it."""


@dataclass(frozen=True)
class Head:
    """A request or response head: its first line's parts and its header fields."""

    first: tuple[str, str, str]  # (method, target, version) or (version, status, reason)
    minor: int  # HTTP/1.<minor>
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order
    raw: bytes  # the head as received, ending with CRLF CRLF

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of every ``name`` field, lower-cased (Connection, Expect)."""
        return {t.strip().lower() for value in self.values(name) for t in value.split(",") if t.strip()}

    @property
    def method(self) -> str:
        return self.first[0]

    @property
    def target(self) -> str:
        return self.first[1]

    @property
    def status(self) -> int:
        return int(self.first[1])


def _parse_fields(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also rejects obsolete line folding
            raise ParseError(f"bad header line {line[:80]!r}")
        fields.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return tuple(fields)


def _split_head(raw: bytes) -> list[bytes]:
    if len(raw) > MAX_HEAD or not raw.endswith(HEAD_END) or raw.find(HEAD_END) != len(raw) - 4:
        raise ParseError("not one complete head")
    return raw[:-4].split(b"\r\n")


def parse_request_head(raw: bytes) -> Head:
    """``raw`` is a request head up to and including its blank line."""
    lines = _split_head(raw)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise ParseError(f"bad request line {lines[0][:80]!r}")
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        raise ParseError(f"not HTTP/1.x: {lines[0][:80]!r}")
    method, target, text = (p.decode("latin-1") for p in parts)
    return Head((method, target, text), int(version.group(1)), _parse_fields(lines[1:]), raw)


def parse_response_head(raw: bytes) -> Head:
    """``raw`` is a response head (final or 1xx) up to and including its blank line."""
    lines = _split_head(raw)
    version_part, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    version = _VERSION.fullmatch(version_part)
    if version is None or len(status) != 3 or not status.isdigit():
        raise ParseError(f"bad status line {lines[0][:80]!r}")
    first = (version_part.decode(), status.decode(), reason.decode("latin-1"))
    return Head(first, int(version.group(1)), _parse_fields(lines[1:]), raw)


@dataclass(frozen=True)
class Framing:
    """How a body is delimited: ``none``, ``length`` (``length`` bytes), ``chunked``,
    ``close`` (until the connection closes) or ``tunnel`` (no more HTTP: raw bytes both
    ways, after a 101 or a successful CONNECT)."""

    kind: Literal["none", "length", "chunked", "close", "tunnel"]
    length: int = 0


NO_BODY = Framing("none")


def _content_length(head: Head) -> int | None:
    values = {v.strip() for value in head.values("content-length") for v in value.split(",")}
    if not values:
        return None
    if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
        raise ParseError(f"bad content-length {sorted(values)}")
    return int(values.pop())


def _chunked_last(head: Head) -> bool | None:
    """None without Transfer-Encoding, else whether ``chunked`` is the final coding."""
    codings = [t.strip().lower() for value in head.values("transfer-encoding") for t in value.split(",")]
    if not codings:
        return None
    return codings[-1] == "chunked"


def request_framing(head: Head) -> Framing:
    """The body of a request (RFC 9112 6.3: requests never end at close).

    A request with both Transfer-Encoding and Content-Length, or with a coding other
    than chunked last, is refused: it is how request smuggling starts, and the raw pipe
    leaves the judgement to the worker."""
    chunked = _chunked_last(head)
    length = _content_length(head)
    if chunked is not None:
        if not chunked or length is not None:
            raise ParseError("transfer-encoding that cannot delimit a request")
        return Framing("chunked")
    return Framing("length", length) if length else NO_BODY


def response_framing(request_method: str, head: Head) -> Framing:
    """The body of a response to ``request_method`` (RFC 9112 6.3, in its order)."""
    status = head.status
    if status == 101 or (request_method == "CONNECT" and 200 <= status < 300):
        return Framing("tunnel")
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    chunked = _chunked_last(head)
    if chunked is not None:
        return Framing("chunked") if chunked else Framing("close")
    length = _content_length(head)
    return Framing("close") if length is None else Framing("length", length)


def keeps_alive(head: Head) -> bool:
    """Whether the sender of ``head`` keeps its connection open after this message."""
    tokens = head.tokens("connection")
    return "close" not in tokens if head.minor >= 1 else "keep-alive" in tokens


def wants_upgrade(request: Head) -> bool:
    return request.method == "CONNECT" or (
        "upgrade" in request.tokens("connection") and bool(request.values("upgrade"))
    )


def expects_continue(request: Head) -> bool:
    return request.minor >= 1 and "100-continue" in request.tokens("expect")


def without_fields(head: Head, names: set[str], extra: tuple[bytes, ...] = ()) -> bytes:
    """``head.raw`` without the fields called ``names`` (lower-case), plus ``extra`` lines."""
    lines = head.raw[:-4].split(b"\r\n")
    kept = [lines[0]]
    kept += [line for line in lines[1:] if line.partition(b":")[0].decode("ascii").lower() not in names]
    return b"\r\n".join([*kept, *extra]) + HEAD_END


def response_head_for_client(response: Head, request: Head, *, keep_alive: bool) -> bytes:
    """The response head to send to the client, whose connection is not the worker's.

    The worker's ``Connection`` (and the fields it names) describe the worker's side: a
    draining worker says ``close`` to end *its* connection, and the client must not be
    made to reconnect for that. As nginx does, the dev server says what it will do with
    the client's connection instead. A ``Content-Length`` beside a ``Transfer-Encoding``
    is dropped (RFC 9112 6.3: the coding delimits the body; a proxy removes the length)."""
    hop = {*_HOP_BY_HOP, *response.tokens("connection")}
    if response.values("transfer-encoding"):
        hop.add("content-length")
    if not keep_alive:
        extra: tuple[bytes, ...] = (b"connection: close",)
    elif request.minor == 0:
        extra = (b"connection: keep-alive",)
    else:
        extra = ()
    return without_fields(response, hop, extra)


class ChunkedScanner:
    """Finds where a chunked body ends, fed any slicing of the byte stream.

    ``feed(data)`` returns how many bytes of ``data`` belong to the body; once ``done``,
    the rest of ``data`` is the next message. ``on_data`` (optional) receives the decoded
    payload, for those who want it (the tests).
    """

    def __init__(self, on_data: Callable[[bytes], None] | None = None) -> None:
        self.done = False
        self._on_data = on_data
        self._state: Literal["size", "data", "data-end", "trailer"] = "size"
        self._remaining = 0
        self._line = bytearray()

    def feed(self, data: bytes) -> int:
        i = 0
        while i < len(data) and not self.done:
            if self._state == "data":
                take = min(self._remaining, len(data) - i)
                if self._on_data is not None:
                    self._on_data(data[i : i + take])
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data-end"
                continue
            end = data.find(b"\n", i)
            stop = len(data) if end == -1 else end + 1
            self._line += data[i:stop]
            i = stop
            if len(self._line) > MAX_CHUNK_LINE:
                raise ParseError("chunk line too long")
            if end != -1:
                line = bytes(self._line)
                self._line.clear()
                self._on_line(line)
        return i

    def _on_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise ParseError(f"chunk line without CRLF: {line[:80]!r}")
        content = line[:-2]
        if self._state == "data-end":
            if content:
                raise ParseError("chunk data longer than its size")
            self._state = "size"
        elif self._state == "size":
            size = content.partition(b";")[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                raise ParseError(f"bad chunk size {content[:80]!r}")
            self._remaining = int(size, 16)
            self._state = "data" if self._remaining else "trailer"
        elif not content:  # the blank line after the trailer fields
            self.done = True
        else:
            _parse_fields([content])
