"""The dev server on input that breaks HTTP/1.x framing once forwarding has begun, and
on clients that leave in the middle of a request body: no crash, no worker left waiting."""

from __future__ import annotations

import socket
from pathlib import Path

from support.daemon import wait_for
from support.devserver import Recorder, dev_server, scripted_upstream
from support.http import build_request, read_response

UPLOAD = b"POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n"


def test_a_client_that_leaves_mid_upload_ends_the_workers_connection(tmp_dir: Path) -> None:
    worker = Recorder()
    with (
        scripted_upstream(tmp_dir / "up.sock", worker) as path,
        dev_server(lambda: [path], buffer_limit=1000) as dev,
    ):
        with socket.create_connection(("127.0.0.1", dev.port), timeout=10) as sock:
            sock.sendall(UPLOAD + b"x" * 5000)  # above the buffer limit: streamed
            wait_for(lambda: worker.received[-1:] == [UPLOAD + b"x" * 5000], 5, "the upload at the worker")
        # The worker would otherwise wait for the other 95,000 bytes, and the dev server with it.
        assert worker.closed.acquire(timeout=5), "the worker's connection was closed"
        wait_for(lambda: dev.clients == 0, 5, "the client's connection to be gone")


def test_a_malformed_chunked_request_body_is_a_400(tmp_dir: Path) -> None:
    worker = Recorder()
    head = b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
    streamed = b"7d0\r\n" + b"a" * 2000 + b"\r\n"  # above the buffer limit

    def assert_400(sock: socket.socket) -> None:
        response = read_response(sock)
        assert (response.status, response.body) == (400, b"malformed request body\n")
        assert sock.recv(1) == b"", "and the client connection closed"

    with (
        scripted_upstream(tmp_dir / "up.sock", worker) as path,
        dev_server(lambda: [path], buffer_limit=1000) as dev,
    ):
        with socket.create_connection(("127.0.0.1", dev.port), timeout=10) as sock:
            sock.sendall(head + b"zz\r\n")  # found while buffering: no worker sees it
            assert_400(sock)
        with socket.create_connection(("127.0.0.1", dev.port), timeout=10) as sock:
            sock.sendall(head + streamed)
            wait_for(lambda: worker.received == [head + streamed], 5, "the request on its way to the worker")
            sock.sendall(b"zz\r\n")
            assert_400(sock)
        assert worker.closed.acquire(timeout=5), "the worker's connection was closed"


def test_malformed_input_from_either_side_is_no_crash(tmp_dir: Path) -> None:
    """The reviewer's inputs: a Content-Length of a non-ASCII digit, and a worker whose
    chunked body breaks its framing after the response head went out."""
    bad_chunks = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"
    received: list[bytes] = []

    def answers_bad_chunks(conn: socket.socket) -> None:
        received.append(conn.recv(65536))
        conn.sendall(bad_chunks)
        conn.close()

    with (
        scripted_upstream(tmp_dir / "up.sock", answers_bad_chunks) as path,
        dev_server(lambda: [path]) as dev,
    ):
        odd_length = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: \xb2\r\n\r\nab"  # '²'.isdigit()
        head_only = bad_chunks[: bad_chunks.index(b"\r\n\r\n") + 4]
        # The first is not HTTP as the dev server understands it: piped as it came, both
        # ways. In the second the head had gone out: the client connection just closes.
        for request, expected in ((odd_length, bad_chunks), (build_request("GET", "/"), head_only)):
            with socket.create_connection(("127.0.0.1", dev.port), timeout=10) as sock:
                sock.sendall(request)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                assert data == expected
        assert received[0] == odd_length
