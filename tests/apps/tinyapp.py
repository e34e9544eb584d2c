"""A small, dependency-free HTTP/1.1 worker for the daemon's tests.

It binds the socket sockherd chose and misbehaves on request, so each test can provoke
one failure mode with a real process: crash before ready, ignore SIGTERM, hang in
shutdown, report ready through sd_notify or not at all.

    python tinyapp.py SOCKET [--ready sdnotify|library|none] [--crash-before-ready]
                             [--ignore-term] [--hang-on-shutdown] [--fail-if-file PATH]
                             [--start-delay SECONDS] [--own-socket]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

BALLAST: list[bytearray] = []  # /grow keeps memory here, for max_memory tests


def sd_notify(state: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), path)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, bool]) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if target.startswith("/slow"):
                await asyncio.sleep(int(target.partition("ms=")[2] or "200") / 1000)
            if target.startswith("/crash"):
                os._exit(3)
            if target.startswith("/broken"):
                sd_notify("BROKEN=asked to by " + target)
            if target.startswith("/grow"):
                BALLAST.append(bytearray(int(target.partition("mb=")[2] or "10") << 20))
            reply = f"pid={os.getpid()} id={os.environ.get('SOCKHERD_WORKER_ID')} {method} {len(body)}\n".encode()
            close = state["draining"] or headers.get("connection", "").lower() == "close"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                + f"content-length: {len(reply)}\r\n".encode()
                + (b"connection: close\r\n" if close else b"")
                + b"\r\n"
                + reply
            )
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--ready", default="sdnotify", choices=["sdnotify", "library", "none"])
    parser.add_argument("--crash-before-ready", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--hang-on-shutdown", action="store_true")
    parser.add_argument("--fail-if-file", metavar="PATH", help="exit 1 at start if this file exists (a bad deploy)")
    parser.add_argument("--fail-if-env", metavar="NAME", help="exit 1 at start if $NAME lists this worker's index")
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds of 'imports' before binding")
    parser.add_argument(
        "--own-socket", action="store_true", help="chown the socket to this process's uid:gid, mode 0600 (as gunicorn)"
    )
    args = parser.parse_args()
    if args.start_delay:
        await asyncio.sleep(args.start_delay)
    failing_indexes = os.environ.get(args.fail_if_env or "", "").split(",")
    if (
        args.crash_before_ready
        or (args.fail_if_file and os.path.exists(args.fail_if_file))  # noqa: ASYNC240
        or os.environ.get("SOCKHERD_INDEX") in failing_indexes
    ):
        print("tinyapp: crashing at start-up on purpose", file=sys.stderr, flush=True)
        sys.exit(1)
    state = {"draining": False}
    backlog = int(os.environ.get("SOCKHERD_BACKLOG", "100"))  # the daemon's, as a well-behaved server takes it
    server = await asyncio.start_unix_server(lambda r, w: handle(r, w, state), args.socket, backlog=backlog)
    if args.own_socket:  # what gunicorn does: its socket, its owner and group, whatever the directory says
        os.chown(args.socket, os.getuid(), os.getgid())
        os.chmod(args.socket, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.ready == "sdnotify":
        sd_notify("READY=1\nSTATUS=serving")
    elif args.ready == "library":
        from sockherd import worker

        def on_shutdown_message() -> None:
            drained = worker.backlog_drained()
            print(f"tinyapp {os.getpid()}: shutdown message, backlog drained: {drained}", file=sys.stderr, flush=True)
            loop.call_soon_threadsafe(stop.set)

        worker.set_shutdown_handler(on_shutdown_message)
        worker.report_online()
    await stop.wait()
    if args.hang_on_shutdown:
        await asyncio.Event().wait()
    state["draining"] = True
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5)


if __name__ == "__main__":
    asyncio.run(main())
