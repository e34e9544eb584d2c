"""The IPC wire format, shared by the daemon, the CLI client and the worker library.

Newline-delimited JSON over a UNIX stream socket: one object per line, at most
``MAX_FRAME`` bytes a line. The codec here is sans-IO (bytes in, messages out) so it is
tested without sockets, and so a worker in any language can implement it from
docs/protocol.md alone.

A message is ``{"type": str, "data"?: any}``; a request adds ``"id"``; a reply is
``{"type": "reply", "request_id", "data"?, "errors"?, "done": bool}``. Several replies
to one request form a stream; the last one has ``done: true``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # asyncio is the daemon's: the CLI, a blocking client, starts faster without it
    import asyncio

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # bytes in one line, newline included

# Roles a peer declares in its hello.
ROLE_CLIENT = "client"
ROLE_WORKER = "worker"


class ProtocolError(Exception):
    """A frame that is not a valid message: the connection that sent it is closed."""


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded frame. ``id`` is set for requests, ``request_id`` for replies."""

    type: str
    data: Any = None
    id: int | str | None = None
    request_id: int | str | None = None
    errors: tuple[str, ...] = ()
    done: bool = True
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_reply(self) -> bool:
        return self.type == "reply"


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame: compact JSON and a newline. Refuses what the peer would refuse."""
    line = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(line) > MAX_FRAME:
        raise ProtocolError(
            f"message of type {message.get('type')!r} is {len(line)} bytes, over the {MAX_FRAME}-byte limit"
        )
    return line


def message(type_: str, data: Any = None, *, id: int | str | None = None) -> bytes:
    """Encode a message (with ``id``: a request)."""
    frame: dict[str, Any] = {"type": type_}
    if data is not None:
        frame["data"] = data
    if id is not None:
        frame["id"] = id
    return encode(frame)


def reply(request_id: int | str, data: Any = None, *, errors: list[str] | None = None, done: bool = True) -> bytes:
    """Encode one reply of a (possibly streamed) answer to request ``request_id``."""
    frame: dict[str, Any] = {"type": "reply", "request_id": request_id, "done": done}
    if data is not None:
        frame["data"] = data
    if errors:
        frame["errors"] = errors
    return encode(frame)


MAX_ID_LENGTH = 128  # characters of a string id
MAX_INT_ID = (1 << 53) - 1  # what every JSON implementation represents exactly


def _valid_id(value: Any) -> bool:
    """An id the daemon can always echo back: checked at the door, so that no reply (and
    no operation waiting to send one) can fail on it halfway."""
    if isinstance(value, bool):  # an int subclass; `true` as an id is a bug in the peer
        return False
    if isinstance(value, int):
        return -MAX_INT_ID <= value <= MAX_INT_ID
    if isinstance(value, str):
        if len(value) > MAX_ID_LENGTH:
            return False
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate, "\ud800": JSON allows it, UTF-8 does not
            return False
        return True
    return False


def decode(line: bytes) -> Message:
    """Parse one frame (with or without its newline). Raises ProtocolError, never more."""
    if len(line) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(line)} bytes is over the {MAX_FRAME}-byte limit")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, a 5000-digit number
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is a JSON {type(obj).__name__}, not an object")
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("frame has no string 'type'")
    msg_id = obj.get("id")
    if msg_id is not None and not _valid_id(msg_id):
        raise ProtocolError(
            f"'id' must be an integer of at most 53 bits or a UTF-8 string of at most {MAX_ID_LENGTH} characters"
        )
    if kind != "reply":
        return Message(kind, obj.get("data"), msg_id, raw=obj)
    request_id = obj.get("request_id")
    if not _valid_id(request_id):
        raise ProtocolError("reply has no string or integer 'request_id'")
    errors = obj.get("errors") or []
    if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
        raise ProtocolError("reply 'errors' must be a list of strings")
    done = obj.get("done", True)
    if not isinstance(done, bool):
        raise ProtocolError("reply 'done' must be a boolean")
    return Message(kind, obj.get("data"), None, request_id, tuple(errors), done, raw=obj)


class FrameBuffer:
    """Splits a byte stream into frames, for blocking-socket peers (CLI, worker library).

    An unterminated line longer than MAX_FRAME raises ProtocolError as soon as it is
    seen, so a peer cannot make the reader buffer without bound.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            if end + 1 - start > MAX_FRAME:
                raise ProtocolError(f"frame over the {MAX_FRAME}-byte limit")
            frames.append(bytes(self._buffer[start:end]))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > MAX_FRAME:
            raise ProtocolError(f"frame over the {MAX_FRAME}-byte limit")
        return frames


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """Next line from an asyncio stream, or None at EOF. Oversize raises ProtocolError.

    The reader must have been created with ``limit=MAX_FRAME``.
    """
    import asyncio

    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("connection closed in the middle of a frame") from None
        return None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"frame over the {MAX_FRAME}-byte limit") from None
    return line[:-1]
