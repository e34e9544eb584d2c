"""HTTP/1.x framing for the dev server: heads, body delimiting, chunked scanning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockherd.daemon.http1 import (
    ChunkedScanner,
    Framing,
    ParseError,
    expects_continue,
    keeps_alive,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
    response_head_for_client,
    wants_upgrade,
    without_fields,
)


def request(first: str = "GET / HTTP/1.1", *fields: str) -> bytes:
    return "\r\n".join([first, *fields]).encode("latin-1") + b"\r\n\r\n"


def response(first: str = "HTTP/1.1 200 OK", *fields: str) -> bytes:
    return request(first, *fields)


def test_a_request_head_is_parsed() -> None:
    head = parse_request_head(request("POST /a?b=1 HTTP/1.0", "Host: x", "X-Two:  a, b ", "x-two: c"))
    assert (head.method, head.target, head.minor) == ("POST", "/a?b=1", 0)
    assert head.values("x-two") == ["a, b", "c"] and head.tokens("x-two") == {"a", "b", "c"}


@pytest.mark.parametrize(
    "raw",
    [
        request("GET / HTTP/2.0"),
        request("GET /  HTTP/1.1"),
        request("GET / HTTP/1.1", "bad header"),
        request("GET / HTTP/1.1", "x: 1", " folded"),
        request("GET / HTTP/1.1", "sp ace: 1"),
        b"GET / HTTP/1.1\r\n\r\nextra\r\n\r\n",
        b"GET / HTTP/1.1\r\n",
        request("GET / HTTP/1.1", "x: " + "a" * 70_000),
    ],
)
def test_what_is_not_http1_is_refused(raw: bytes) -> None:
    with pytest.raises(ParseError):
        parse_request_head(raw)


def test_a_response_head_is_parsed() -> None:
    head = parse_response_head(response("HTTP/1.1 404 Not Found", "Content-Length: 3"))
    assert (head.status, head.minor, head.values("content-length")) == (404, 1, ["3"])
    assert parse_response_head(response("HTTP/1.0 200")).status == 200
    for bad in ("HTTP/1.1 20 OK", "HTTP/1.1 abc OK", "ICY 200 OK"):
        with pytest.raises(ParseError):
            parse_response_head(response(bad))


@pytest.mark.parametrize(
    ("fields", "framing"),
    [
        ((), Framing("none")),
        (("content-length: 0",), Framing("none")),
        (("Content-Length: 12",), Framing("length", 12)),
        (("content-length: 5, 5", "content-length: 5"), Framing("length", 5)),
        (("transfer-encoding: chunked",), Framing("chunked")),
        (("transfer-encoding: gzip, Chunked",), Framing("chunked")),
    ],
)
def test_request_framing(fields: tuple[str, ...], framing: Framing) -> None:
    assert request_framing(parse_request_head(request("POST / HTTP/1.1", *fields))) == framing


@pytest.mark.parametrize(
    "fields",
    [
        ("content-length: 5", "content-length: 6"),
        ("content-length: -1",),
        ("transfer-encoding: gzip",),  # a request body cannot end at close
        ("transfer-encoding: chunked", "content-length: 5"),  # how smuggling starts
        ("content-length: \N{SUPERSCRIPT TWO}",),  # str.isdigit() says yes, int() says no
        ("content-length: 1\N{SUPERSCRIPT THREE}",),
        ("content-length: " + "9" * 5000,),  # past int()'s digit limit
    ],
)
def test_request_framing_refuses_the_ambiguous(fields: tuple[str, ...]) -> None:
    with pytest.raises(ParseError):
        request_framing(parse_request_head(request("POST / HTTP/1.1", *fields)))


@pytest.mark.parametrize(
    ("method", "first", "fields", "framing"),
    [
        ("HEAD", "HTTP/1.1 200 OK", ("content-length: 10",), Framing("none")),
        ("GET", "HTTP/1.1 204 No Content", (), Framing("none")),
        ("GET", "HTTP/1.1 304 Not Modified", ("content-length: 10",), Framing("none")),
        ("POST", "HTTP/1.1 100 Continue", (), Framing("none")),
        ("GET", "HTTP/1.1 101 Switching Protocols", ("upgrade: websocket",), Framing("tunnel")),
        ("CONNECT", "HTTP/1.1 200 OK", (), Framing("tunnel")),
        ("CONNECT", "HTTP/1.1 407 Auth", ("content-length: 2",), Framing("length", 2)),
        ("GET", "HTTP/1.1 200 OK", ("transfer-encoding: chunked", "content-length: 3"), Framing("chunked")),
        ("GET", "HTTP/1.1 200 OK", ("transfer-encoding: gzip",), Framing("close")),
        ("GET", "HTTP/1.1 200 OK", ("content-length: 3",), Framing("length", 3)),
        ("GET", "HTTP/1.0 200 OK", (), Framing("close")),
    ],
)
def test_response_framing(method: str, first: str, fields: tuple[str, ...], framing: Framing) -> None:
    assert response_framing(method, parse_response_head(response(first, *fields))) == framing


def test_a_non_ascii_content_length_in_a_response_is_refused() -> None:
    head = parse_response_head(response("HTTP/1.1 200 OK", "content-length: \N{SUPERSCRIPT TWO}"))
    with pytest.raises(ParseError):
        response_framing("GET", head)


def test_keep_alive_upgrade_and_expect() -> None:
    assert keeps_alive(parse_request_head(request()))
    assert not keeps_alive(parse_request_head(request("GET / HTTP/1.1", "connection: keep-alive, Close")))
    assert not keeps_alive(parse_request_head(request("GET / HTTP/1.0")))
    assert keeps_alive(parse_request_head(request("GET / HTTP/1.0", "Connection: Keep-Alive")))
    assert wants_upgrade(parse_request_head(request("GET / HTTP/1.1", "connection: Upgrade", "upgrade: websocket")))
    assert not wants_upgrade(parse_request_head(request("GET / HTTP/1.1", "upgrade: websocket")))
    assert wants_upgrade(parse_request_head(request("CONNECT host:443 HTTP/1.1")))
    assert expects_continue(parse_request_head(request("PUT / HTTP/1.1", "Expect: 100-Continue")))
    assert not expects_continue(parse_request_head(request("PUT / HTTP/1.0", "Expect: 100-continue")))


def test_the_workers_connection_fields_do_not_reach_the_client() -> None:
    head = parse_response_head(
        response("HTTP/1.1 200 OK", "Connection: close, X-Hop", "x-hop: 1", "Keep-Alive: timeout=5", "x-end: 2")
    )
    keep = parse_request_head(request())
    assert response_head_for_client(head, keep, keep_alive=True) == response("HTTP/1.1 200 OK", "x-end: 2")
    assert response_head_for_client(head, keep, keep_alive=False) == response(
        "HTTP/1.1 200 OK", "x-end: 2", "connection: close"
    )
    # RFC 9112 6.3: the coding delimits the body; a length beside it is not passed on.
    both = parse_response_head(response("HTTP/1.1 200 OK", "Content-Length: 3", "transfer-encoding: chunked"))
    assert response_head_for_client(both, keep, keep_alive=True) == response(
        "HTTP/1.1 200 OK", "transfer-encoding: chunked"
    )
    old = parse_request_head(request("GET / HTTP/1.0", "connection: keep-alive"))
    assert response_head_for_client(head, old, keep_alive=True).endswith(b"connection: keep-alive\r\n\r\n")
    assert without_fields(
        parse_request_head(request("PUT / HTTP/1.1", "Expect: 100-continue", "a: b")), {"expect"}
    ) == (request("PUT / HTTP/1.1", "a: b"))


# --- chunked bodies ------------------------------------------------------------------

extensions = st.sampled_from([b"", b";a=1", b' ; name="v"', b";x"])
trailers = st.lists(st.sampled_from([b"x-sum: 1", b"Expires: never", b"t:"]), max_size=3)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(an encoding, the payload it carries)."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
    out = b""
    for chunk in chunks:
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(chunk)
        out += size.encode() + draw(extensions) + b"\r\n" + chunk + b"\r\n"
    out += b"0" + draw(extensions) + b"\r\n" + b"".join(t + b"\r\n" for t in draw(trailers)) + b"\r\n"
    return out, b"".join(chunks)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(chunked_bodies(), st.lists(st.integers(min_value=0), max_size=20), st.binary(max_size=20))
def test_the_end_of_a_chunked_body_is_found_however_it_is_sliced(
    body: tuple[bytes, bytes], cuts: list[int], after: bytes
) -> None:
    encoded, payload = body
    decoded = bytearray()
    scanner = ChunkedScanner(decoded.extend)
    consumed = 0
    for piece in pieces(encoded + after, cuts):
        used = scanner.feed(piece)
        consumed += used
        if scanner.done:
            break
        assert used == len(piece)
    assert scanner.done and consumed == len(encoded), "the next message starts right after the body"
    assert bytes(decoded) == payload


@given(chunked_bodies(), st.lists(st.integers(min_value=0), max_size=10))
def test_a_cut_short_chunked_body_is_never_done(body: tuple[bytes, bytes], cuts: list[int]) -> None:
    encoded, _ = body
    scanner = ChunkedScanner()
    for piece in pieces(encoded[:-1], cuts):
        assert scanner.feed(piece) == len(piece)
    assert not scanner.done


@pytest.mark.parametrize(
    "encoded",
    [b"g\r\n", b"-1\r\n", b"\r\n", b"3\r\nabcd\r\n", b"3\n", b"1" * 17 + b"\r\n", b"0\r\nno colon\r\n", b"1;" * 5000],
)
def test_bad_chunked_bodies_are_refused(encoded: bytes) -> None:
    with pytest.raises(ParseError):
        ChunkedScanner().feed(encoded)
