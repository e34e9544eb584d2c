r"""The fork server's loop: fork requests in, workers forked, their pids answered (sockherd.preload).

The protocol on the channel (a SOCK_SEQPACKET pair the daemon made, one JSON message per
packet, descriptors as SCM_RIGHTS): a request names the worker's environment (``env``),
which of its descriptors are its ``outputs`` (stdout, stderr) and how many are
``listen``\ ers after them, and whether it exits through the interpreter's ``teardown``;
the answer is ``{"pid": N}`` or ``{"error": "..."}``, in the order asked. Why the worker
is a grandchild, and what it starts with, is :mod:`sockherd.preload`'s docstring; this
module is the mechanics: :func:`serve` returns only in a forked worker.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["close_all", "exit_quietly", "flush_stdio", "receive", "send", "serve"]

MAX_REQUEST = 64 * 1024
MAX_FDS = 64
_SD_LISTEN_FDS_START = 3

SetUp = Callable[[dict[str, Any]], None]  # in the forked worker: become what the request says


def serve(channel: socket.socket, set_up: SetUp) -> None:
    """Answer fork requests until the daemon closes the channel (then exit); return in
    each forked worker, its descriptors in place and ``set_up(request)`` done."""
    while True:
        batch = _receive_batch(channel)
        if not batch:
            exit_quietly()  # the daemon closed the channel: this generation is retired
        try:
            forks = _start_forks(channel, batch, set_up)
        except _InWorker:
            return  # this is the worker (its set-up closed the received fds): serve
        _answer(channel, batch, forks)


def _receive_batch(channel: socket.socket) -> list[tuple[dict[str, Any], list[int]]]:
    """The next request (waiting for it), and every request queued behind it: a deploy's
    forks arrive together, and starting them all before waiting for the first to answer
    lets the workers start side by side. Empty once the daemon closed the channel."""
    batch = []
    request, fds = receive(channel)
    while request is not None:
        batch.append((request, fds))
        try:
            request, fds = receive(channel, wait=False)
        except BlockingIOError:
            return batch
    if batch:  # the daemon closed the channel with requests unanswered: it is gone
        close_all([fd for _, received in batch for fd in received])
        return []
    return batch


_Fork = tuple[int, int] | OSError  # (the pipe the worker's pid comes on, the middle process), or why not


def _start_forks(channel: socket.socket, batch: list[tuple[dict[str, Any], list[int]]], set_up: SetUp) -> list[_Fork]:
    """Start a fork for each request; raises :class:`_InWorker` in each worker."""
    forks: list[_Fork] = []
    for index, (request, fds) in enumerate(batch):
        # What the worker must not keep: the other requests' descriptors, the other pipes.
        others = [fd for other, (_, received) in enumerate(batch) if other != index for fd in received]
        others += [fork[0] for fork in forks if not isinstance(fork, OSError)]
        try:
            forks.append(_start_fork(channel, request, fds, others, set_up))
        except OSError as exc:
            forks.append(exc)
    return forks


def _answer(channel: socket.socket, batch: list[tuple[dict[str, Any], list[int]]], forks: list[_Fork]) -> None:
    """Each worker's pid, or why there is none, in the order asked."""
    for fds in (received for _, received in batch):
        close_all(fds)
    for index, fork in enumerate(forks):
        pid = None
        if isinstance(fork, OSError):
            answer: dict[str, Any] = {"error": f"fork failed: {fork.strerror or fork}"}
        elif (pid := _finish_fork(*fork)) is None:
            answer = {"error": "fork failed: the worker could not be forked (see the output above)"}
        else:
            answer = {"pid": pid}
        try:
            send(channel, answer)
        except OSError:  # the daemon is gone (or gave up on us): nobody would manage these workers
            unanswered = [pid] + [_finish_fork(*f) for f in forks[index + 1 :] if not isinstance(f, OSError)]
            for orphan in unanswered:
                if orphan is not None:
                    with contextlib.suppress(OSError):
                        os.killpg(orphan, 9)
            exit_quietly()


class _InWorker(Exception):
    """Raised in the forked worker, after it set itself up, to unwind into :func:`fork_point`'s caller."""


def _start_fork(
    channel: socket.socket, request: dict[str, Any], fds: list[int], others: list[int], set_up: SetUp
) -> tuple[int, int]:
    """Fork, and in the child fork again and exit: the worker is the grandchild, set up
    and raising :class:`_InWorker`. In the fork server: (the read end of the pipe the
    worker's pid comes on, the middle process's pid), for :func:`_finish_fork`.

    Anything that goes wrong in the middle process or in the worker's set-up ends that
    process with status 70 (EX_SOFTWARE) after printing why: it must never fall back
    into the fork server's loop. ``others``: descriptors the worker closes; ``set_up``
    runs in the worker once its own descriptors are in place.
    """
    flush_stdio()  # what the app printed at import: not once per worker
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if middle == 0:
        try:
            os.close(read_end)
            if os.fork() == 0:
                # The pid goes out only once the worker leads its own process group: the
                # daemon may kill that group the moment it has the pid (a launch given up).
                os.setsid()
                os.write(write_end, str(os.getpid()).encode())
                os.close(write_end)
                close_all(others)
                _place_descriptors(channel, request, fds)
                set_up(request)
                raise _InWorker
        except _InWorker:
            raise
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(70)
        os._exit(0)  # the middle process: nothing of its own to flush
    os.close(write_end)
    return read_end, middle


def _finish_fork(read_end: int, middle: int) -> int | None:
    """The worker's pid once it leads its group, and the middle process reaped; None if
    there is no worker (the middle process or its set-up failed: its output says why)."""
    try:
        data = _read_all(read_end)
    finally:
        os.close(read_end)
    os.waitpid(middle, 0)
    return int(data) if data else None


def _place_descriptors(channel: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """In the forked worker: its log files on stdout/stderr, its listeners at 3.. (the
    systemd convention), the channel and the received copies closed."""
    channel.close()
    outputs: list[str] = request.get("outputs", [])
    listen_count = int(request.get("listen", 0))
    received = list(fds)
    # Outputs first (they name stdout/stderr), then the listeners to 3..: each source is
    # first duplicated above every target, so no dup2 overwrites a source still to come.
    high = _SD_LISTEN_FDS_START + listen_count
    moved = [_dup_above(fd, high) for fd in received]  # a plain dup could land on a target
    for fd in received:
        _close(fd)
    position = 0
    for name in outputs:
        os.dup2(moved[position], 1 if name == "stdout" else 2)
        position += 1
    for i in range(listen_count):
        os.dup2(moved[position + i], _SD_LISTEN_FDS_START + i)
    for fd in moved:
        _close(fd)


def _dup_above(fd: int, minimum: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 64):
        chunks.append(chunk)
    return b"".join(chunks)


def send(channel: socket.socket, message: dict[str, Any]) -> None:
    channel.sendall(json.dumps(message).encode())


def receive(channel: socket.socket, *, wait: bool = True) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and its descriptors; (None, []) at EOF. Without ``wait``, raises
    BlockingIOError when nothing is queued. (``socket.recv_fds`` would do, but it drops
    its ``flags`` argument, up to Python 3.13 at least: MSG_DONTWAIT would block.)"""
    fds = array.array("i")
    try:
        data, ancillary, _flags, _addr = channel.recvmsg(
            MAX_REQUEST, socket.CMSG_LEN(MAX_FDS * fds.itemsize), 0 if wait else socket.MSG_DONTWAIT
        )
    except ConnectionResetError:
        return None, []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        close_all(list(fds))
        return None, []
    return json.loads(data), list(fds)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        _close(fd)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def exit_quietly(status: int = 0) -> NoReturn:
    """Without atexit: the app's shutdown hooks belong to its workers, not to the fork server."""
    flush_stdio()
    os._exit(status)


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
