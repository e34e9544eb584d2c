"""The dev server as an HTTP/1.x proxy: keep-alive clients lose nothing across restarts.

Two kinds of upstream: a real daemon with a hand-written uvicorn integration (plain
``uvicorn.Server``, which closes idle keep-alive connections at shutdown), and small
scripted servers on UNIX sockets that misbehave on purpose, served by a ``DevServer``
running on an event loop of the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from conftest import DaemonFactory
from sockherd.daemon.devserver import RETRIES, DevServer
from support.daemon import REPO
from support.http import LoadGenerator, build_request, read_response

HANDWRITTEN = [sys.executable, str(REPO / "tests" / "apps" / "handwritten_uvicorn.py")]
RETRIED = re.compile(r"dev server: .* sent again")

Handler = Callable[[socket.socket], None]


# --- helpers -------------------------------------------------------------------------


@contextlib.contextmanager
def dev_server(published: Callable[[], list[Path]], retries: int = RETRIES) -> Iterator[DevServer]:
    """A DevServer on a free port, on an event loop in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = DevServer(0, published, retries=retries)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextlib.contextmanager
def scripted_upstream(path: Path, handler: Handler) -> Iterator[Path]:
    """A UNIX socket server that runs ``handler`` on each connection, in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield path
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for conn in conns:
            conn.close()


def read_request(conn: socket.socket, buffer: bytearray) -> bytes | None:
    """One request head and its Content-Length body from ``conn``; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    match = re.search(rb"(?i)content-length: *(\d+)", buffer[:end])
    length = int(match.group(1)) if match else 0
    while len(buffer) < end + length:
        buffer += conn.recv(65536)
    request = bytes(buffer[: end + length])
    del buffer[: end + length]
    return request


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


@contextlib.contextmanager
def http_connection(port: int) -> Iterator[http.client.HTTPConnection]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


# --- with real workers ---------------------------------------------------------------


def test_keep_alive_clients_lose_nothing_across_restarts(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": HANDWRITTEN, "workers": 2}, "--dev-server=0")
    status = daemon.wait_ready(2, timeout=30)
    port = status["daemon"]["dev_server"]
    mark = daemon.mark()
    started = time.monotonic()
    with LoadGenerator(port, concurrency=8, post_every=3) as load:
        load.wait_requests(200)
        for _ in range(5):
            assert daemon.cli("restart").returncode == 0
            load.wait_requests(100)
    result = load.stop()
    elapsed = time.monotonic() - started
    retried = sum(1 for line in daemon.lines[mark:] if RETRIED.search(line))
    print(f"\n{result.total} requests in {elapsed:.1f}s ({result.total / elapsed:.0f}/s), {retried} sent again")
    assert result.failures == []
    assert result.ok > 700 and result.methods["POST"] > 200
    assert len(result.pids) >= 2 * 6, "every generation served"
    # Each restart closes the idle keep-alive connections the dev server holds: without
    # sending again, these requests would have failed (see the scripted test below).
    assert retried > 0


def test_request_bodies_head_and_keep_alive(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": HANDWRITTEN, "workers": 1}, "--dev-server=0")
    port = daemon.wait_ready(1, timeout=30)["daemon"]["dev_server"]
    with http_connection(port) as conn:
        conn.request("POST", "/", body=b"x" * 1000)
        assert conn.getresponse().read().endswith(b" POST 1000\n")
        sock = conn.sock
        conn.request("POST", "/", body=iter([b"abc", b"", b"d" * 70_000]), encode_chunked=True)
        response = conn.getresponse()
        assert response.read().endswith(b" POST 70003\n") and response.getheader("connection") is None
        conn.request("HEAD", "/")
        response = conn.getresponse()
        assert response.status == 200 and int(response.getheader("content-length", "0")) > 0 and response.read() == b""
        big = 5 << 20  # above the buffered size: streamed to the worker
        conn.request("PUT", "/", body=b"y" * big)
        assert conn.getresponse().read().endswith(f" PUT {big}\n".encode())
        conn.request("POST", "/", body=iter([b"z" * big]), encode_chunked=True)
        assert conn.getresponse().read().endswith(f" POST {big}\n".encode())
        conn.request("GET", "/")
        assert conn.getresponse().read().endswith(b" GET 0\n")
        assert conn.sock is sock, "one client connection all along"


def test_expect_continue_and_pipelining(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": HANDWRITTEN, "workers": 1}, "--dev-server=0")
    port = daemon.wait_ready(1, timeout=30)["daemon"]["dev_server"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert read_response(sock).body.endswith(b" POST 5\n")
        # Two requests in one write: each answered, in order, on the same connection.
        sock.sendall(build_request("POST", "/", b"a" * 7) + build_request("GET", "/", close=True))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    first, second = data.split(b"HTTP/1.1 200 ")[1:]
    assert first.endswith(b" POST 7\n") and second.endswith(b" GET 0\n")
    assert b"connection: close" in second.lower()


# --- with scripted upstreams ---------------------------------------------------------


def closes_reused_connections(conn: socket.socket) -> None:
    """Answers the first request of a connection and closes it when the second arrives,
    unanswered: the race of a worker closing an idle keep-alive connection."""
    buffer = bytearray()
    if read_request(conn, buffer) is not None:
        conn.sendall(ok(b"first"))
        conn.recv(1)
    conn.close()


def test_a_request_on_a_closed_idle_connection_is_sent_again(tmp_dir: Path) -> None:
    with (
        scripted_upstream(tmp_dir / "up.sock", closes_reused_connections) as path,
        dev_server(lambda: [path]) as dev,
        http_connection(dev.port) as conn,
    ):
        for body in (b"", b"a", b"bb"):
            conn.request("POST", "/", body=body)
            assert conn.getresponse().read() == b"first"
        assert dev.retried == 2


def test_without_retries_the_same_request_fails(tmp_dir: Path) -> None:
    with (
        scripted_upstream(tmp_dir / "up.sock", closes_reused_connections) as path,
        dev_server(lambda: [path], retries=0) as dev,
        http_connection(dev.port) as conn,
    ):
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"first"
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 502 and response.read() == b"the worker closed the connection\n"
        assert dev.retried == 0


def test_a_fresh_connection_closed_before_answering_is_not_sent_again(tmp_dir: Path) -> None:
    requests: list[bytes] = []

    def takes_and_closes(conn: socket.socket) -> None:
        requests.append(read_request(conn, bytearray()) or b"")
        conn.close()

    with (
        scripted_upstream(tmp_dir / "up.sock", takes_and_closes) as path,
        dev_server(lambda: [path]) as dev,
        http_connection(dev.port) as conn,
    ):
        conn.request("POST", "/order", body=b"1")
        assert conn.getresponse().status == 502
        assert len(requests) == 1 and dev.retried == 0, "the worker may have acted on it"


def test_upgrade_switches_to_raw_bytes_both_ways(tmp_dir: Path) -> None:
    def upgrades(conn: socket.socket) -> None:
        buffer = bytearray()
        while (request := read_request(conn, buffer)) is not None:
            if b"upgrade: echo" not in request.lower():
                conn.sendall(ok(b"plain"))
                continue
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
            conn.sendall(bytes(buffer))
            while data := conn.recv(65536):
                conn.sendall(data.upper())
            conn.shutdown(socket.SHUT_WR)
            return

    with (
        scripted_upstream(tmp_dir / "up.sock", upgrades) as path,
        dev_server(lambda: [path]) as dev,
        socket.create_connection(("127.0.0.1", dev.port), timeout=10) as sock,
    ):
        sock.sendall(build_request("GET", "/"))
        assert read_response(sock).body == b"plain"
        sock.sendall(b"GET /ws HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nframe1")
        data = b""
        while not data.endswith(b"FRAME1"):
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"connection: upgrade" in data, "the switch is passed through as it came"
        sock.sendall(b"not http at all\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest == b"NOT HTTP AT ALL\r\n\r\n"


def test_a_response_that_ends_at_close_and_unparsable_bytes(tmp_dir: Path) -> None:
    def until_close(conn: socket.socket) -> None:
        request = read_request(conn, bytearray())
        if request is not None and request.startswith(b"GET"):
            conn.sendall(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        elif request is not None:
            conn.sendall(request)  # an echo server: not HTTP
        conn.close()

    with (
        scripted_upstream(tmp_dir / "up.sock", until_close) as path,
        dev_server(lambda: [path]) as dev,
        socket.create_connection(("127.0.0.1", dev.port), timeout=10) as sock,
    ):
        sock.sendall(build_request("GET", "/"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.endswith(b"\r\n\r\nall of it") and b"connection: close" in data
        with socket.create_connection(("127.0.0.1", dev.port), timeout=10) as raw:
            raw.sendall(b"HELLO THERE\r\n\r\n")
            assert raw.recv(100) == b"HELLO THERE\r\n\r\n", "what it cannot parse is piped as it was"


def test_no_worker_published_is_a_502(tmp_dir: Path) -> None:
    with dev_server(lambda: [tmp_dir / "app.0.sock"]) as dev, http_connection(dev.port) as conn:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 502 and response.read() == b"no worker is online\n"
