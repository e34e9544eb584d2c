"""Suspended workers hold real requests: uvicorn with the example app, and a WSGI server.

The worker is a real process started with ``SOCKHERD_SUSPENDED=1``; the test plays the
daemon (a fake one speaking the real protocol) and nginx (raw HTTP/1.1). A request is
known to be held, not merely queued, when the server has handed it to the app: uvicorn
at ``--log-level trace`` logs ``Started scope=`` as it calls the app, the WSGI script
prints a line as the request reaches its middleware. Then no byte may arrive within
QUIET seconds; then the fake daemon sends ``resume`` and the response must come.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sockherd import protocol
from support.fake_daemon import FakeDaemon
from support.http import build_request, read_response
from support.lines import Worker, start_worker_process, stop_worker_process, worker_env

TIMEOUT = 10.0
QUIET = 0.3  # a request that got no byte in this long is taken to be held
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
HTTP_APP_CALLED = "Started scope={'type': 'http'"  # uvicorn's trace line as it calls the app

# A WSGI worker under the stdlib's threaded wsgiref server, on two TCP ports: one holds
# until resumed, one gives up after 50 ms. A line is printed when a request reaches the
# middleware, so that the test knows it is held there.
WSGI_WORKER = """
import sys, threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from sockherd import worker
from sockherd.wsgi import SuspendMiddleware

def hello(environ, start_response):
    body = f"hello from index {worker.index}\\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

def announced(app):
    def middleware(environ, start_response):
        print("request reached the middleware", flush=True)
        return app(environ, start_response)
    return middleware

class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass

servers = [
    make_server("127.0.0.1", 0, announced(SuspendMiddleware(hello)), Server, QuietHandler),
    make_server("127.0.0.1", 0, SuspendMiddleware(hello, timeout=0.05, retry_after=2), Server, QuietHandler),
]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ports", *(server.server_port for server in servers), flush=True)
worker.report_online()
sys.stdin.read()
"""


@pytest.fixture
def start_worker(tmp_path: Path, fake_daemon: FakeDaemon) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(*argv: str, index: str = "0") -> Worker:
        socket_path = str(tmp_path / f"w{len(workers)}.sock")
        env = worker_env(str(fake_daemon.path), socket_path, SOCKHERD_INDEX=index, SOCKHERD_SUSPENDED="1")
        worker = start_worker_process([sys.executable, *argv], env, EXAMPLE, merge_output=True)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        stop_worker_process(worker)


@pytest.fixture
def connect() -> Iterator[Callable[[str | tuple[str, int]], socket.socket]]:
    opened: list[socket.socket] = []

    def open_connection(address: str | tuple[str, int]) -> socket.socket:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        opened.append(sock)
        sock.settimeout(TIMEOUT)
        sock.connect(address)
        return sock

    yield open_connection
    for sock in opened:
        sock.close()


def assert_held(sock: socket.socket) -> None:
    sock.settimeout(QUIET)
    try:
        with pytest.raises(TimeoutError):
            unexpected = sock.recv(1)
            raise AssertionError(f"a suspended worker answered: {unexpected!r}")
    finally:
        sock.settimeout(TIMEOUT)


def uvicorn_worker(start_worker: Callable[..., Worker], *args: str, index: str = "0") -> Worker:
    return start_worker("-m", "sockherd.uvicorn", "hello:app", "--log-level", "trace", *args, index=index)


def test_uvicorn_holds_requests_until_resumed(
    start_worker: Callable[..., Worker],
    fake_daemon: FakeDaemon,
    connect: Callable[[str | tuple[str, int]], socket.socket],
) -> None:
    worker = uvicorn_worker(start_worker)
    fake_daemon.wait_message("online")  # lifespan startup ran while suspended
    held = [connect(worker.socket_path) for _ in range(2)]
    held[0].sendall(build_request("GET", "/"))
    held[1].sendall(build_request("POST", "/echo", b"held body"))
    worker.wait_line(HTTP_APP_CALLED, count=2)
    for sock in held:
        assert_held(sock)

    fake_daemon.resume()
    response = read_response(held[0])
    assert (response.status, response.pid) == (200, worker.proc.pid)
    assert response.body.startswith(b"hello from worker hello-1 (index 0,")
    response = read_response(held[1])
    assert (response.status, response.body) == (200, b"held body")
    # Resumed for good: the next request is served at once, on the same connection.
    held[0].sendall(build_request("GET", "/pid"))
    assert read_response(held[0]).body == f"{worker.proc.pid}\n".encode()


def test_a_standby_serves_as_the_slot_it_is_promoted_into(
    start_worker: Callable[..., Worker],
    fake_daemon: FakeDaemon,
    connect: Callable[[str | tuple[str, int]], socket.socket],
) -> None:
    worker = uvicorn_worker(start_worker, index="standby")
    fake_daemon.wait_message("online")
    sock = connect(worker.socket_path)
    sock.sendall(build_request("GET", "/"))
    worker.wait_line(HTTP_APP_CALLED)
    assert_held(sock)
    fake_daemon.resume({"index": 4})
    response = read_response(sock)
    assert response.status == 200
    assert response.body.startswith(b"hello from worker hello-1 (index 4,")


def test_shutdown_while_suspended_serves_the_held_requests(
    start_worker: Callable[..., Worker],
    fake_daemon: FakeDaemon,
    connect: Callable[[str | tuple[str, int]], socket.socket],
) -> None:
    """A rollback retires a generation that was never resumed: what it holds is still served."""
    worker = uvicorn_worker(start_worker)
    fake_daemon.wait_message("online")
    sock = connect(worker.socket_path)
    sock.sendall(build_request("GET", "/pid"))
    worker.wait_line(HTTP_APP_CALLED)
    assert_held(sock)

    fake_daemon.send(protocol.message("shutdown"))
    response = read_response(sock)
    assert (response.status, response.headers.get("connection"), response.body) == (
        200,
        "close",
        f"{worker.proc.pid}\n".encode(),
    )
    assert worker.proc.wait(TIMEOUT) == 0
    worker.wait_line("shutdown hook ran")
    assert not any("Traceback" in line for line in worker.lines), "\n".join(worker.lines)


def test_uvicorn_answers_503_when_held_too_long(
    start_worker: Callable[..., Worker],
    fake_daemon: FakeDaemon,
    connect: Callable[[str | tuple[str, int]], socket.socket],
) -> None:
    serve = (
        "import hello, sockherd.uvicorn\n"
        "from sockherd.asgi import SuspendMiddleware\n"
        "sockherd.uvicorn.run(SuspendMiddleware(hello.hello_app, timeout=0.05, retry_after=3))\n"
    )
    worker = start_worker("-c", serve)
    fake_daemon.wait_message("online")
    sock = connect(worker.socket_path)
    sock.sendall(build_request("GET", "/pid"))
    response = read_response(sock)
    assert (response.status, response.headers["retry-after"]) == (503, "3")
    assert response.body == b"503 Service Unavailable: this worker is suspended; retry shortly\n"

    fake_daemon.resume()
    sock = connect(worker.socket_path)  # the 503 may have ended the first connection
    sock.sendall(build_request("GET", "/pid"))
    assert read_response(sock).status == 200


def test_wsgi_holds_requests_until_resumed(
    start_worker: Callable[..., Worker],
    fake_daemon: FakeDaemon,
    connect: Callable[[str | tuple[str, int]], socket.socket],
) -> None:
    worker = start_worker("-c", WSGI_WORKER)
    held_port, impatient_port = map(int, worker.wait_line("ports").split()[1:])
    fake_daemon.wait_message("online")

    held = connect(("127.0.0.1", held_port))
    held.sendall(build_request("GET", "/"))
    worker.wait_line("request reached the middleware")
    assert_held(held)

    impatient = connect(("127.0.0.1", impatient_port))
    impatient.sendall(build_request("GET", "/"))
    response = read_response(impatient)
    assert (response.status, response.headers["retry-after"]) == (503, "2")
    assert response.body == b"503 Service Unavailable: this worker is suspended; retry shortly\n"

    fake_daemon.resume()
    response = read_response(held)
    assert (response.status, response.body) == (200, b"hello from index 0\n")
    impatient = connect(("127.0.0.1", impatient_port))
    impatient.sendall(build_request("GET", "/"))
    assert read_response(impatient).status == 200
