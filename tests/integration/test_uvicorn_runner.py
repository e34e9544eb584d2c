"""``python -m sockherd.uvicorn`` on the example app, driven by a fake daemon.

The worker is a real process with the environment the daemon would give it; the test
plays the daemon (a threaded AF_UNIX server speaking the real protocol) and nginx (raw
HTTP/1.1 over the worker's socket). Every wait is on an event with a deadline: the
daemon's ``online``, a line in the worker's log, a response, the exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sockherd import protocol
from support.daemon import wait_for
from support.fake_daemon import FakeDaemon
from support.lines import Worker, start_worker_process, stop_worker_process, worker_env

TIMEOUT = 10.0
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"


@pytest.fixture
def start_worker(tmp_path: Path, fake_daemon: FakeDaemon) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(*args: str, command: tuple[str, ...] = ("-m", "sockherd.uvicorn")) -> Worker:
        env = worker_env(
            str(fake_daemon.path), str(tmp_path / "w.sock"), SOCKHERD_SOCKET_MODE="660", SOCKHERD_BACKLOG="64"
        )
        worker = start_worker_process([sys.executable, *command, "hello:app", *args], env, EXAMPLE, merge_output=False)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        stop_worker_process(worker)


class HTTPConnection:
    """Raw HTTP/1.1 over the worker's UNIX socket, as nginx would speak it."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def send(self, method: str, target: str, body: bytes = b"") -> None:
        head = f"{method} {target} HTTP/1.1\r\nhost: worker\r\ncontent-length: {len(body)}\r\n\r\n"
        self.sock.sendall(head.encode() + body)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.reader.readline()
        assert status_line, "connection closed instead of a response"
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers.get("content-length", "0")))
        return status, headers, body

    def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.send(method, target, body)
        return self.response()

    def at_eof(self) -> bool:
        return self.reader.read(1) == b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[[str], HTTPConnection]]:
    opened: list[HTTPConnection] = []

    def open_connection(path: str) -> HTTPConnection:
        opened.append(HTTPConnection(path))
        return opened[-1]

    yield open_connection
    for conn in opened:
        conn.close()


def test_serves_the_example_and_reports_online(
    start_worker: Callable[..., Worker], fake_daemon: FakeDaemon, connect: Callable[[str], HTTPConnection]
) -> None:
    worker = start_worker()
    hello = fake_daemon.wait_message("hello")
    assert hello.data["pid"] == worker.proc.pid
    fake_daemon.wait_message("online")
    assert os.stat(worker.socket_path).st_mode & 0o777 == 0o660

    conn = connect(worker.socket_path)
    status, headers, body = conn.request("GET", "/")
    assert (status, body) == (200, f"hello from worker hello-1 (index 0, pid {worker.proc.pid})\n".encode())
    assert "close" not in headers.get("connection", "")
    status, _, body = conn.request("POST", "/echo", b"ping \x00 pong")
    assert (status, body) == (200, b"ping \x00 pong")
    assert conn.request("GET", "/pid")[2] == f"{worker.proc.pid}\n".encode()
    assert conn.request("GET", "/slow?ms=1")[0] == 200

    # The backlog is the daemon's (SOCKHERD_BACKLOG=64), not uvicorn's 2048: with the
    # worker frozen, connections queue until the kernel refuses with EAGAIN.
    os.kill(worker.proc.pid, signal.SIGSTOP)
    queued: list[socket.socket] = []
    try:
        while len(queued) < 200:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(worker.socket_path)
            except BlockingIOError:
                client.close()
                break
            queued.append(client)
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
        for client in queued:
            client.close()
    assert len(queued) in (64, 65)  # Linux queues backlog + 1


def test_shutdown_drains_without_losing_a_request(
    start_worker: Callable[..., Worker], fake_daemon: FakeDaemon, connect: Callable[[str], HTTPConnection]
) -> None:
    worker = start_worker()
    fake_daemon.wait_message("online")
    pid = worker.proc.pid

    idle = connect(worker.socket_path)  # a keep-alive connection from nginx's pool, now idle
    status, headers, _ = idle.request("GET", "/pid")
    assert status == 200
    assert headers.get("connection") != "close"
    in_flight = connect(worker.socket_path)
    in_flight.send("GET", "/slow?ms=300")

    # Freeze the worker so that the next connection is still in its listen backlog
    # when it acts on the shutdown: nginx connected just before the symlink moved.
    os.kill(pid, signal.SIGSTOP)
    fake_daemon.send(protocol.message("shutdown"))
    queued = connect(worker.socket_path)
    queued.send("GET", "/")
    os.kill(pid, signal.SIGCONT)

    worker.wait_line("Shutting down: draining connections")
    # nginx picks the idle pooled connection for a new request right as the drain starts.
    status, headers, body = idle.request("GET", "/pid")
    assert (status, headers.get("connection"), body) == (200, "close", f"{pid}\n".encode())
    assert idle.at_eof()

    status, headers, body = in_flight.response()
    assert (status, headers.get("connection"), body) == (200, "close", f"slept 300 ms in pid {pid}\n".encode())
    assert in_flight.at_eof()

    status, _, body = queued.response()
    assert status == 200
    assert body.startswith(b"hello from worker hello-1")

    assert worker.proc.wait(TIMEOUT) == 0
    worker.wait_line("shutdown hook ran")
    assert not any("Traceback" in line for line in worker.lines), "\n".join(worker.lines)


def test_keeps_accepting_until_the_backlog_is_quiet(
    start_worker: Callable[..., Worker], fake_daemon: FakeDaemon, connect: Callable[[str], HTTPConnection]
) -> None:
    """A connection that lands in the backlog after the drain began is still served.

    That is nginx connecting just before the daemon moved the symlink away. The quiet
    period is stretched to a second so that the test can act inside it at leisure.
    """
    patched = "import sockherd.uvicorn as m; m.BACKLOG_QUIET = 1.0; m.main()"
    worker = start_worker(command=("-c", patched))
    fake_daemon.wait_message("online")
    fake_daemon.send(protocol.message("shutdown"))
    worker.wait_line("Shutting down: draining connections")

    os.kill(worker.proc.pid, signal.SIGSTOP)  # the connection waits in the backlog, unaccepted
    late = connect(worker.socket_path)
    late.send("GET", "/pid")
    os.kill(worker.proc.pid, signal.SIGCONT)

    status, headers, body = late.response()
    assert (status, headers.get("connection"), body) == (200, "close", f"{worker.proc.pid}\n".encode())
    assert worker.proc.wait(TIMEOUT) == 0


def test_a_drained_shutdown_does_not_wait_for_a_quiet_backlog(
    start_worker: Callable[..., Worker], fake_daemon: FakeDaemon
) -> None:
    """When the daemon's shutdown says it saw the queue empty after the swap
    (`backlog_drained`), nothing more can arrive: the runner closes its listener at once.
    The quiet period and its cap are a minute here, so a runner that waited would not
    exit within the test's timeout."""
    patched = "import sockherd.uvicorn as m; m.BACKLOG_QUIET = m.BACKLOG_TIMEOUT = 60.0; m.main()"
    worker = start_worker(command=("-c", patched))
    fake_daemon.wait_message("online")
    fake_daemon.send(protocol.message("shutdown", {"backlog_drained": True}))
    assert worker.proc.wait(TIMEOUT) == 0


def test_the_drain_ends_when_the_last_connection_closes(
    start_worker: Callable[..., Worker], fake_daemon: FakeDaemon, connect: Callable[[str], HTTPConnection]
) -> None:
    """nginx sends a request on a pooled connection that was idle when the drain began:
    the answer says `Connection: close`, the connection goes, and that wakes the drain.
    Its next look at the connections is a minute away here (`DRAIN_POLL`), so a runner
    that waited for it would not exit in time."""
    patched = "import sockherd.uvicorn as m; m.DRAIN_POLL = 60.0; m.main()"
    worker = start_worker(command=("-c", patched))
    fake_daemon.wait_message("online")
    pooled = connect(worker.socket_path)
    assert pooled.request("GET", "/pid")[0] == 200
    fake_daemon.send(protocol.message("shutdown", {"backlog_drained": True}))
    wait_for(lambda: _refused(worker.socket_path), TIMEOUT, "the listener closed: the drain is waiting")
    status, headers, _ = pooled.request("GET", "/pid")
    assert (status, headers.get("connection")) == (200, "close")
    assert pooled.at_eof()
    assert worker.proc.wait(TIMEOUT) == 0


def _refused(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
    return False


# The runner's tick and uvicorn's (its main loop sleeps 0.1 s through the module's
# `asyncio`, replaced in uvicorn.server only) stretched to a minute.
SLOW_TICKS = (
    "import asyncio, types, uvicorn.server as s, sockherd.uvicorn as m\n"
    "async def sleep(delay, *args, **kwargs):\n"
    "    await asyncio.sleep(60.0 if delay == 0.1 else delay, *args, **kwargs)\n"
    "proxy = types.ModuleType('asyncio'); proxy.__dict__.update(vars(asyncio)); proxy.sleep = sleep\n"
    "s.asyncio = proxy; m.TICK = 60.0; m.main()\n"
)


def test_a_shutdown_wakes_the_main_loop(start_worker: Callable[..., Worker], fake_daemon: FakeDaemon) -> None:
    """uvicorn's main loop looks at its exit flag once per tick; the runner's is woken by
    the shutdown itself. Both ticks are a minute here (uvicorn's own 0.1 s sleep too), so
    a runner that waited for a tick, its own or uvicorn's, would not exit within the
    test's timeout."""
    patched = SLOW_TICKS
    worker = start_worker(command=("-c", patched))
    fake_daemon.wait_message("online")
    fake_daemon.send(protocol.message("shutdown", {"backlog_drained": True}))
    assert worker.proc.wait(TIMEOUT) == 0


def test_a_sigterm_wakes_the_main_loop(start_worker: Callable[..., Worker], fake_daemon: FakeDaemon) -> None:
    patched = SLOW_TICKS
    worker = start_worker(command=("-c", patched))
    fake_daemon.wait_message("online")
    worker.proc.send_signal(signal.SIGTERM)
    worker.wait_line("Shutting down: draining connections")
    assert worker.proc.wait(TIMEOUT) == -signal.SIGTERM  # drained, then uvicorn raises the signal again


def test_a_clear_error_without_uvicorn() -> None:
    script = "import sys; sys.modules['uvicorn'] = None; import sockherd.uvicorn"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 1
    assert "ImportError: sockherd.uvicorn needs uvicorn, which is not installed: pip install 'sockherd[uvicorn]'" in (
        proc.stderr
    )
