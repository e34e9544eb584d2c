"""The worker's end of the IPC conversation with the daemon, run by one background thread.

The public functions in :mod:`sockherd.worker` only record state and queue frames; this
thread owns the socket: it connects, says hello, sends what was queued, reads what the
daemon sends, and reconnects with capped backoff when the daemon goes away (it died,
or it is re-executing itself for an upgrade). Nothing here may block or break the app:
the app's threads never touch the socket, and every failure ends in a log line and a
reconnect, or, when the daemon refuses the hello, in giving up on IPC altogether.

State that must survive a reconnect (``online``, ``broken``) is kept as state and
re-sent after every successful hello, because a re-executed daemon needs it again;
everything else queued for a connection dies with it. What the daemon says (``shutdown``,
``resume``) goes to the callbacks given to :class:`IpcLink`; a suspension is not
announced again after a reconnect: the daemon knows it, and re-sends ``resume`` if due.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sockherd import protocol

log = logging.getLogger("sockherd.worker")

HELLO_ID = 1
INITIAL_BACKOFF = 0.05  # seconds before the first reconnect; doubles up to MAX_BACKOFF
MAX_BACKOFF = 2.0
HELLO_TIMEOUT = 10.0  # a daemon that does not answer the hello in this time is treated as gone
IO_TIMEOUT = 10.0  # a send that stalls this long (daemon not reading) drops the connection
RECV_SIZE = 65536


class IpcLink:
    """One worker's link to the daemon at ``path``. Thread-safe; the thread starts on start()."""

    def __init__(
        self,
        path: str,
        worker_id: str,
        on_shutdown: Callable[[bool], None],
        on_resume: Callable[[int | None], None],
        *,
        on_message: Callable[[str, Any, Any], None] | None = None,
        on_request: Callable[[int | str, str, Any, Any], None] | None = None,
        on_suspend: Callable[[], None] | None = None,
    ) -> None:
        self._path = path
        self._worker_id = worker_id
        self._on_shutdown = on_shutdown
        self._on_resume = on_resume
        self._on_message = on_message
        self._on_request = on_request
        self._on_suspend = on_suspend
        self._lock = threading.Lock()
        self._flushed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Guarded by _lock:
        self._connected: socket.socket | None = None  # set once the hello was answered
        self._outbox: list[bytes] = []
        self._sending = False
        # Reports are numbered so that flush() can tell whether the latest one went out.
        self._reported = 0  # number of the latest report
        self._queued = 0  # ... of the latest report in the outbox
        self._sent = 0  # ... of the latest report written to a connection
        self._online = False
        self._broken_reason: str | None = None
        self._gave_up = False
        # Requests this worker sent (send-msg, send-req): request id -> where replies go.
        self._asked: dict[int, queue.SimpleQueue[protocol.Message | None]] = {}
        self._ask_ids = itertools.count(HELLO_ID + 1)

    # -- called from any thread -------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._gave_up:
                return
            self._thread = threading.Thread(target=self._run, name="sockherd-ipc", daemon=True)
            self._thread.start()

    def report_online(self) -> None:
        with self._lock:
            if self._online:
                return
            self._online = True
            self._reported += 1
            self._queue_locked(protocol.message("online"), report=True)

    def report_broken(self, reason: str) -> None:
        with self._lock:
            self._broken_reason = reason
            self._reported += 1
            self._queue_locked(protocol.message("broken", {"reason": reason}), report=True)

    def send_frame(self, frame: bytes) -> None:
        """Queue a frame for the current connection (a reply of a handler); dropped without one."""
        with self._lock:
            self._queue_locked(frame)

    def ask(self, type_: str, data: Any) -> queue.SimpleQueue[protocol.Message | None]:
        """Send a request to the daemon; its replies arrive on the returned queue, and None
        if the connection is lost first. ConnectionError when there is no connection."""
        replies: queue.SimpleQueue[protocol.Message | None] = queue.SimpleQueue()
        with self._lock:
            if self._connected is None:
                raise ConnectionError("not connected to the sockherd daemon")
            request_id = next(self._ask_ids)
            self._asked[request_id] = replies
            self._queue_locked(protocol.message(type_, data, id=request_id))
        return replies

    def forget(self, replies: queue.SimpleQueue[protocol.Message | None]) -> None:
        with self._lock:
            for request_id, queued in list(self._asked.items()):
                if queued is replies:
                    del self._asked[request_id]

    def flush(self, timeout: float) -> bool:
        """Wait until every report so far and every queued frame was sent, or IPC was given up.

        Used at exit: a worker that reports broken and exits at once still gets the
        report through, if the daemon answers within ``timeout``.
        """
        with self._flushed:
            return self._flushed.wait_for(self._idle_locked, timeout)

    def close(self) -> None:
        """Stop the thread (for tests and embedding); reports become no-ops."""
        self._stop.set()
        self._wake()

    def after_fork_in_child(self) -> None:
        """A forked child is not the worker the daemon spawned: it must stay silent.

        Its copies of the descriptors are closed without shutdown(), so the parent's
        connection is untouched and the daemon still sees EOF when the parent dies.
        """
        self._lock = threading.Lock()
        self._flushed = threading.Condition(self._lock)
        self._gave_up = True
        self._outbox.clear()
        self._thread = None
        for sock in (self._connected, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._connected = None

    # -- helpers, _lock held ----------------------------------------------------------

    def _queue_locked(self, frame: bytes, *, report: bool = False) -> None:
        # Without a connection the frame is dropped: reports are re-sent as state after
        # the next hello, and anything else belonged to the connection that went away.
        if self._connected is not None:
            self._outbox.append(frame)
            if report:
                self._queued = self._reported
            self._wake()

    def _idle_locked(self) -> bool:
        if self._gave_up or self._stop.is_set() or self._thread is None:
            return True
        return self._sent == self._reported and not (self._outbox or self._sending)

    def _state_frames_locked(self) -> list[bytes]:
        frames = []
        if self._online:
            frames.append(protocol.message("online"))
        if self._broken_reason is not None:
            frames.append(protocol.message("broken", {"reason": self._broken_reason}))
        return frames

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: already awake; closed: stopping
            self._wake_w.send(b"\0")

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = INITIAL_BACKOFF
        while not self._stop.is_set():
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError as exc:  # out of descriptors: try again later
                log.warning("sockherd: cannot create the IPC socket: %s", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            try:
                sock.settimeout(IO_TIMEOUT)
                sock.connect(self._path)
                greeted = self._converse(sock)
            except OSError as exc:
                log.debug("sockherd: IPC connection to %s failed: %s", self._path, exc)
                greeted = False
            except _GiveUp as exc:
                log.error("sockherd: the daemon refused this worker (%s); continuing without IPC", exc)
                with self._flushed:
                    self._gave_up = True
                    self._flushed.notify_all()
                return
            finally:
                with self._flushed:
                    self._connected = None
                    self._outbox.clear()
                    lost, self._asked = self._asked, {}
                    self._flushed.notify_all()
                for replies in lost.values():
                    replies.put(None)  # the asker learns that its answer will not come
                sock.close()
            if self._stop.is_set():
                return
            if greeted:
                backoff = INITIAL_BACKOFF
                log.info("sockherd: lost the IPC connection to the daemon; reconnecting")
            self._stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _converse(self, sock: socket.socket) -> bool:
        """Hello, then exchange frames until the connection drops. True if the hello succeeded."""
        hello = {
            "role": protocol.ROLE_WORKER,
            "id": self._worker_id,
            "pid": os.getpid(),
            "version": protocol.PROTOCOL_VERSION,
        }
        sock.sendall(protocol.message("hello", hello, id=HELLO_ID))
        frames = protocol.FrameBuffer()
        hello_deadline = time.monotonic() + HELLO_TIMEOUT
        greeted = False
        while not self._stop.is_set():
            timeout = None if greeted else hello_deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                log.warning("sockherd: the daemon did not answer the hello in %.0f s", HELLO_TIMEOUT)
                return False
            readable, _, _ = select.select([sock, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(RECV_SIZE)
            if sock in readable:
                data = sock.recv(RECV_SIZE)
                if not data:
                    return greeted
                try:
                    for frame in frames.feed(data):
                        greeted = self._handle(sock, protocol.decode(frame), greeted)
                except protocol.ProtocolError as exc:
                    log.warning("sockherd: bad frame from the daemon (%s); reconnecting", exc)
                    return greeted
            self._send_queued(sock)
        return greeted

    def _handle(self, sock: socket.socket, msg: protocol.Message, greeted: bool) -> bool:
        if msg.is_reply:
            if not greeted and msg.request_id == HELLO_ID:
                if msg.errors:
                    raise _GiveUp("; ".join(msg.errors))
                with self._lock:
                    self._connected = sock
                    self._outbox[:0] = self._state_frames_locked()
                    self._queued = self._reported
                return True
            with self._lock:
                replies = self._asked.get(msg.request_id) if isinstance(msg.request_id, int) else None
                if replies is not None and msg.done:
                    del self._asked[msg.request_id]  # type: ignore[arg-type]
            if replies is not None:
                replies.put(msg)
            return greeted
        if msg.type == "shutdown":
            drained = isinstance(msg.data, dict) and msg.data.get("backlog_drained") is True
            self._call("shutdown", self._on_shutdown, drained)
            if msg.id is not None:
                self._reply(msg.id, None)
        elif msg.type == "resume":
            index, error = resume_index(msg.data)
            if error is not None:
                log.warning("sockherd: %s; resuming without it", error)
            self._call("resume", self._on_resume, index)
            if msg.id is not None:  # a one-way message by contract; a request is answered all the same
                self._reply(msg.id, None if error is None else [error])
        elif msg.type == "suspend" and self._on_suspend is not None:
            self._call("suspend", self._on_suspend)
        elif msg.type == "message" and isinstance(msg.data, dict) and self._on_message is not None:
            self._call(
                "message", self._on_message, str(msg.data.get("name", "")), msg.data.get("data"), msg.data.get("from")
            )
        elif (
            msg.type == "request" and msg.id is not None and isinstance(msg.data, dict) and self._on_request is not None
        ):
            data = msg.data
            self._call(
                "request", self._on_request, msg.id, str(data.get("name", "")), data.get("data"), data.get("from")
            )
        elif msg.id is not None:
            self._reply(msg.id, [f"unknown request type {msg.type}"])
        # else: a message type this version does not know; ignored for forward compatibility
        return greeted

    def _reply(self, request_id: int | str, errors: list[str] | None) -> None:
        with self._lock:
            self._queue_locked(protocol.reply(request_id, errors=errors))

    def _call(self, what: str, handler: Callable[..., None], *args: object) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception("sockherd: the %s handler failed", what)

    def _send_queued(self, sock: socket.socket) -> None:
        with self._lock:
            if self._connected is not sock or not self._outbox:
                return
            data = b"".join(self._outbox)
            self._outbox.clear()
            self._sending = True
            queued = self._queued
        # Sent outside the lock so that reporting never waits on a slow daemon. A failure
        # raises OSError and ends the connection; state frames go again after the hello.
        sent = False
        try:
            sock.sendall(data)
            sent = True
        finally:
            with self._flushed:
                self._sending = False
                if sent:
                    self._sent = max(self._sent, queued)
                self._flushed.notify_all()


def resume_index(data: object) -> tuple[int | None, str | None]:
    """The slot a ``resume`` promotes this worker into, if any, and what was wrong with it.

    ``data`` is absent, ``{}`` (a plain resume) or ``{"index": N}`` (a standby promoted
    into slot N). A malformed index is reported but does not stop the resume: holding
    every request because of a bad number would be the worse failure.
    """
    if data is None:
        return None, None
    if not isinstance(data, dict):
        return None, f"resume data must be an object, got {type(data).__name__}"
    index = data.get("index")
    if index is None:
        return None, None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return None, f"resume index must be a non-negative integer, got {index!r}"
    return index, None


class _GiveUp(Exception):
    """The daemon answered the hello with errors: talking again would not help."""
