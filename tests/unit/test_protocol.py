"""The IPC codec: sans-IO, so every edge is testable without a socket."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockherd import protocol
from sockherd.protocol import MAX_FRAME, FrameBuffer, ProtocolError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.text(min_size=1, max_size=30), json_values, st.none() | st.integers(0, 2**31) | st.text(max_size=10))
def test_messages_round_trip(kind: str, data: Any, msg_id: int | str | None) -> None:
    if kind == "reply":
        return
    decoded = protocol.decode(protocol.message(kind, data, id=msg_id))
    assert (decoded.type, decoded.data, decoded.id) == (kind, data, msg_id)


@given(
    st.integers(0, 1000) | st.text(max_size=5), json_values, st.booleans(), st.lists(st.text(max_size=20), max_size=3)
)
def test_replies_round_trip(request_id: int | str, data: Any, done: bool, errors: list[str]) -> None:
    decoded = protocol.decode(protocol.reply(request_id, data, errors=errors, done=done))
    assert decoded.is_reply
    assert (decoded.request_id, decoded.done, list(decoded.errors)) == (request_id, done, errors)
    if data is not None:
        assert decoded.data == data


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_protocol_error(junk: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode(junk)


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not an object"),
        (b"{}", "no string 'type'"),
        (b'{"type": ""}', "no string 'type'"),
        (b'{"type": "x", "id": true}', "'id' must be"),
        (b'{"type": "x", "id": [1]}', "'id' must be"),
        (b'{"type": "x", "id": "\\ud800"}', "'id' must be"),  # a lone surrogate: no UTF-8 for it
        (b'{"type": "x", "id": "' + b"x" * 129 + b'"}', "'id' must be"),
        (b'{"type": "x", "id": ' + str(1 << 53).encode() + b"}", "'id' must be"),
        (b'{"type": "x", "id": ' + b"9" * 5000 + b"}", "not JSON"),  # Python's int digit limit
        (b'{"type": "reply"}', "request_id"),
        (b'{"type": "reply", "request_id": 1, "errors": "no"}', "errors"),
        (b'{"type": "reply", "request_id": 1, "done": "yes"}', "done"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_invalid_frames_are_named(frame: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        protocol.decode(frame)


def test_every_accepted_id_can_be_echoed_in_a_reply() -> None:
    for good in (0, -((1 << 53) - 1), (1 << 53) - 1, "", "x" * 128, "é-☃"):
        msg = protocol.decode(protocol.message("status", id=good))
        assert msg.id is not None
        assert protocol.decode(protocol.reply(msg.id, {"ok": True})).request_id == good


def test_oversized_messages_are_refused_both_ways() -> None:
    with pytest.raises(ProtocolError, match="limit"):
        protocol.message("big", "x" * MAX_FRAME)
    with pytest.raises(ProtocolError, match="limit"):
        protocol.decode(b"x" * (MAX_FRAME + 1))


def test_frame_buffer_splits_and_bounds() -> None:
    buffer = FrameBuffer()
    assert buffer.feed(b'{"type":"a"}\n{"ty') == [b'{"type":"a"}']
    assert buffer.feed(b'pe":"b"}\n') == [b'{"type":"b"}']
    with pytest.raises(ProtocolError):
        FrameBuffer().feed(b"x" * (MAX_FRAME + 1))


@given(st.lists(st.binary(max_size=50).filter(lambda b: b"\n" not in b), max_size=10), st.integers(1, 17))
def test_frame_buffer_is_independent_of_chunking(frames: list[bytes], chunk: int) -> None:
    stream = b"".join(f + b"\n" for f in frames)
    buffer = FrameBuffer()
    out: list[bytes] = []
    for i in range(0, len(stream), chunk):
        out += buffer.feed(stream[i : i + chunk])
    assert out == frames


def test_frames_are_single_lines() -> None:
    line = protocol.message("x", {"text": "a\nb"})
    assert line.count(b"\n") == 1 and json.loads(line)["data"]["text"] == "a\nb"
