"""Plain HTTP/1.1 over UNIX and TCP sockets, and a concurrent load generator.

The load generator counts every failure exactly (a status other than 200, a reset, an
EOF before the whole response): what a real client would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

_PID = re.compile(rb"pid[= ](\d+)")
_TORN = re.compile(r"IncompleteReadError: \d+ bytes read on a total of \d+ expected bytes")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def pid(self) -> int | None:
        match = _PID.search(self.body)
        return int(match.group(1)) if match else None


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return status, headers


def read_response(sock: socket.socket) -> Response:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF in the response body")
        body += chunk
    return Response(status, headers, body)


def build_request(method: str, path: str, body: bytes = b"", *, close: bool = False) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {len(body)}\r\n".encode()
        + (b"connection: close\r\n" if close else b"")
        + b"\r\n"
        + body
    )


def unix_get(path: str, target: str = "/", timeout: float = 5.0) -> Response:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(build_request("GET", target, close=True))
        return read_response(sock)


def tcp_get(port: int, target: str = "/", timeout: float = 5.0) -> Response:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(build_request("GET", target, close=True))
        return read_response(sock)


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    pids: Counter[int] = field(default_factory=Counter)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start time, seconds)
    status_times: list[tuple[float, int]] = field(default_factory=list)  # (start time, status; 0 = no response)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def failures_except_torn(self) -> list[str]:
        """Failures other than responses cut off after their head had arrived.

        A worker killed with SIGKILL between writing a response's head and its body
        tears that response; nginx has already forwarded the head and cannot retry.
        No manager can save those. Every other request must succeed.
        """
        return [f for f in self.failures if not _TORN.search(f)]


async def _read_response(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers = parse_head(head[:-4])
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Response(status, headers, body)


async def _client(port: int, stop: asyncio.Event, result: LoadResult, n: int, post_every: int) -> None:
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    i = 0
    while not stop.is_set():
        i += 1
        method = "POST" if post_every and (i + n) % post_every == 0 else "GET"
        body = b"x" * 1000 if method == "POST" else b""
        start = time.monotonic()
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            writer.write(build_request(method, "/echo" if method == "POST" else "/", body))
            await writer.drain()
            response = await asyncio.wait_for(_read_response(reader), 30)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            result.failures.append(f"{method}: {type(exc).__name__}: {exc}")
            result.status_times.append((start, 0))
            if conn is not None:
                conn[1].close()
            conn = None
            continue
        elapsed = time.monotonic() - start
        result.latencies.append((start, elapsed))
        result.status_times.append((start, response.status))
        result.statuses[response.status] += 1
        result.methods[method] += 1
        if response.status == 200:
            result.ok += 1
            if response.pid is not None:
                result.pids[response.pid] += 1
        else:
            result.failures.append(f"{method}: HTTP {response.status}: {response.body[:200]!r}")
        if response.headers.get("connection", "").lower() == "close":
            conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()


class LoadGenerator:
    """``concurrency`` keep-alive clients hammering 127.0.0.1:port from a thread."""

    def __init__(self, port: int, concurrency: int = 16, post_every: int = 4) -> None:
        self.port = port
        self.concurrency = concurrency
        self.post_every = post_every
        self.result = LoadResult()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            await asyncio.gather(
                *(_client(self.port, self._stop, self.result, n, self.post_every) for n in range(self.concurrency))
            )

        self._loop.run_until_complete(main())
        self._loop.close()

    def __enter__(self) -> LoadGenerator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(60)
        return self.result

    def wait_requests(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        target = self.result.total + count
        while self.result.total < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load made fewer than {count} requests in {timeout}s")
            time.sleep(0.01)
