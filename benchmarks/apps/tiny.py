"""A minimal sockherd worker for the benchmarks: stdlib only, one thread, no asyncio.

    python -S -I tiny.py [--start-delay SECONDS] [--socket PATH | --tcp HOST:PORT] [--fail-if-file PATH]

Starts in about the time of a bare interpreter (`-S -I` skips site and the user's
environment; nothing heavier than socket and selectors is imported), then sleeps
``--start-delay`` seconds to stand for an application's imports. Binds
``$SOCKHERD_SOCKET`` (mode ``$SOCKHERD_SOCKET_MODE``, backlog ``$SOCKHERD_BACKLOG``), or
``--socket``/``--tcp`` when run on its own, and reports ``READY=1`` through sd_notify
when ``$NOTIFY_SOCKET`` is set. Every request gets ``200 pid=N METHOD BODY-LENGTH``;
HTTP/1.1 keep-alive and pipelining work.

SIGTERM drains: responses say ``Connection: close``, the listener keeps accepting until
its backlog has stayed empty for 50 ms (the daemon lingers after moving the symlink,
so the backlog only drains), then closes; in-flight requests are answered; an idle
keep-alive connection is closed once it has been idle for 0.5 s (nginx may be writing
into it from its pool right now); then the process exits. A second SIGTERM, or 10 s,
cuts the drain short.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time

BACKLOG_QUIET = 0.05
BACKLOG_TIMEOUT = 2.0
IDLE_GRACE = 0.5
DRAIN_TIMEOUT = 10.0
MAX_HEAD = 65536


class Connection:
    __slots__ = ("closing", "idle_since", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.idle_since = now
        self.closing = False  # answered with connection: close; close once it is sent

    @property
    def busy(self) -> bool:
        return bool(self.inbuf or self.outbuf)


def parse_args(argv: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    known = ("--start-delay", "--socket", "--tcp", "--fail-if-file")
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in known:
            sys.exit(f"tiny.py: unknown argument {argv[i]!r}; usage: tiny.py " + " ".join(f"[{k} X]" for k in known))
        if not eq:
            i += 1
            if i == len(argv):
                sys.exit(f"tiny.py: {name} needs a value")
            value = argv[i]
        options[name] = value
        i += 1
    return options


def listen(options: dict[str, str]) -> socket.socket:
    backlog = int(os.environ.get("SOCKHERD_BACKLOG") or socket.SOMAXCONN)
    if "--tcp" in options:
        host, _, port = options["--tcp"].rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "127.0.0.1", int(port)))
    else:
        path = options.get("--socket") or os.environ.get("SOCKHERD_SOCKET")
        if not path:
            sys.exit("tiny.py: no socket: run under sockherd, or give --socket PATH or --tcp HOST:PORT")
        mode = int(os.environ.get("SOCKHERD_SOCKET_MODE") or "660", 8)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.fchmod(sock.fileno(), mode)  # Linux: the socket file is created with this mode
        sock.bind(path)
        os.chmod(path, mode)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def sd_notify(state: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), path)


class Server:
    def __init__(self, listener: socket.socket) -> None:
        self.listener: socket.socket | None = listener
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.connections: dict[int, Connection] = {}
        self.draining = False
        self.hurry = False
        self.pid = os.getpid()
        # signals arrive as bytes on a socketpair the selector watches: no polling loop
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")

    def on_term(self, signum: int, frame: object) -> None:
        if self.draining:
            self.hurry = True
        self.draining = True

    def close(self, conn: Connection) -> None:
        self.selector.unregister(conn.sock)
        del self.connections[conn.sock.fileno()]
        conn.sock.close()

    def accept(self, now: float) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: try again on the next wakeup
                return
            sock.setblocking(False)
            conn = Connection(sock, now)
            self.connections[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def respond(self, conn: Connection, now: float) -> bool:
        """Answer every complete request in the buffer; False when the connection must close."""
        close = False
        while b"\r\n\r\n" in conn.inbuf:
            head, _, rest = conn.inbuf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                return False
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip() or "0")
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if len(rest) < length:
                return True  # the body is still on its way
            conn.inbuf = rest[length:]
            close = close or self.draining or parts[2] != "HTTP/1.1"
            body = f"pid={self.pid} {parts[0]} {length}\n".encode()
            conn.outbuf += (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
                + str(len(body)).encode()
                + (b"\r\nconnection: close\r\n\r\n" if close else b"\r\n\r\n")
                + body
            )
            if close:
                conn.inbuf = b""
                conn.closing = True
                break
        if len(conn.inbuf) > MAX_HEAD:
            return False
        if not self.flush(conn):
            return False
        if not conn.busy:
            conn.idle_since = now
        return not (conn.closing and not conn.outbuf)

    def flush(self, conn: Connection) -> bool:
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                conn.outbuf = conn.outbuf[sent:]
        except (BlockingIOError, InterruptedError):
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            return True
        except OSError:
            return False
        self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
        return True

    def on_event(self, conn: Connection, events: int, now: float) -> None:
        if events & selectors.EVENT_WRITE:
            if not self.flush(conn):
                self.close(conn)
                return
            if conn.closing and not conn.outbuf:
                self.close(conn)  # the connection: close answer is out
                return
        if events & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close(conn)
                return
            if conn.closing:
                return  # nothing more is read once connection: close is answered
            conn.inbuf += data
            if not self.respond(conn, now):
                self.close(conn)

    def serve(self) -> None:
        drain_started = last_pending = 0.0
        while True:
            timeout: float | None = None
            now = time.monotonic()
            if self.draining:
                if not drain_started:
                    drain_started = last_pending = now
                if self.hurry or now - drain_started > DRAIN_TIMEOUT:
                    return
                if self.listener is not None:
                    quiet_at = last_pending + BACKLOG_QUIET
                    if now >= quiet_at or now - drain_started > BACKLOG_TIMEOUT:
                        self.selector.unregister(self.listener)
                        self.listener.close()
                        self.listener = None
                    else:
                        timeout = quiet_at - now
                if self.listener is None:
                    for conn in list(self.connections.values()):
                        if not conn.busy and now - conn.idle_since >= IDLE_GRACE:
                            self.close(conn)
                    if not self.connections:
                        return
                    idle = [c.idle_since + IDLE_GRACE - now for c in self.connections.values() if not c.busy]
                    timeout = max(0.0, min(idle)) if idle else 0.05
            for key, events in self.selector.select(timeout):
                now = time.monotonic()
                if key.data is None:
                    last_pending = now
                    if self.listener is not None:
                        self.accept(now)
                elif key.data == "wake":
                    try:
                        while self.wake_r.recv(512):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                else:
                    self.on_event(key.data, events, now)


def main() -> None:
    options = parse_args(sys.argv[1:])
    delay = float(options.get("--start-delay", "0"))
    if delay > 0:
        time.sleep(delay)  # stands for the application's imports
    if "--fail-if-file" in options and os.path.exists(options["--fail-if-file"]):
        print("tiny.py: failing at start-up on purpose (the marker file exists)", file=sys.stderr, flush=True)
        sys.exit(1)
    listener = listen(options)
    path = listener.getsockname() if listener.family == socket.AF_UNIX else None
    server = Server(listener)
    sd_notify("READY=1\nSTATUS=serving")
    try:
        server.serve()
    finally:
        if isinstance(path, str) and path:
            try:  # noqa: SIM105 (contextlib is one import more at start-up)
                os.unlink(path)  # the daemon sweeps too; a standalone run leaves nothing behind
            except OSError:
                pass


if __name__ == "__main__":
    main()
