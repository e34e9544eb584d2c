"""aiohttp as a sockherd worker, with the worker library: ``python server.py``.

* ``GET /`` names the framework and the worker that answered; ``POST /echo`` returns
  the request body.
* Readiness: the server binds the socket the daemon chose (``worker.bind_socket()``)
  and reports online once aiohttp's startup has run and it accepts.
* Shutdown: the daemon's ``shutdown`` message (or SIGTERM) starts a drain that loses no
  request behind nginx (:class:`Drain`), then the ``worker.on_shutdown`` hooks run.
* A worker of a ``sockherd restart --suspended`` deploy holds requests until
  ``sockherd resume`` (:func:`hold_while_suspended`).

Without sockherd it serves on http://127.0.0.1:8000 and the ``worker`` calls do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from sockherd import drain, worker

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDLE_GRACE = 0.5  # an idle keep-alive connection is closed once seen idle this long while draining


async def hello(request: web.Request) -> web.Response:
    return web.Response(
        text=f"hello from aiohttp {aiohttp.__version__} (worker {worker.id or 'standalone'}, pid {os.getpid()})\n"
    )


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/octet-stream")


@web.middleware
async def hold_while_suspended(request: web.Request, handler: Handler) -> web.StreamResponse:
    await worker.resumed  # at once, unless a suspended deploy waits for `sockherd resume`
    return await handler(request)


@worker.on_shutdown
def goodbye() -> None:
    print(f"aiohttp: worker {worker.id} (pid {os.getpid()}) drained; shutdown hook ran", flush=True)


class Drain:
    """Stop serving without losing a request behind nginx's pooled keep-alive connections.

    Once draining, every response says ``Connection: close``; the listener keeps
    accepting until its backlog has stayed empty for 50 ms (nginx may have connected
    just before the daemon moved the symlink), then closes; a connection is closed once
    it has been seen idle for ``IDLE_GRACE`` (nginx may be writing a request into an idle
    pooled connection at this very moment), and busy ones close after their response.
    """

    def __init__(self, app: web.Application) -> None:
        self.draining = False
        self.busy: dict[web.RequestHandler, int] = {}  # connection -> requests in progress (none: absent)
        self.last_active: dict[web.RequestHandler, float] = {}  # while draining: when a request last ended
        app.middlewares.insert(0, self.track)  # outermost: a held request counts as busy
        app.on_response_prepare.append(self.close_after_response)

    @web.middleware
    async def track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = request.protocol
        self.busy[conn] = self.busy.get(conn, 0) + 1
        try:
            return await handler(request)
        finally:
            if (left := self.busy.pop(conn) - 1) > 0:
                self.busy[conn] = left
            if self.draining:
                self.last_active[conn] = asyncio.get_running_loop().time()

    async def close_after_response(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.draining:
            response.force_close()  # close the connection after this response...
            # ...and say so: this signal runs after aiohttp chose the Connection header, and
            # without it nginx pools a connection that is about to close.
            response.headers["Connection"] = "close"

    async def run(self, server: asyncio.Server, runner: web.AppRunner) -> None:
        self.draining = True
        if not worker.backlog_drained():  # the daemon saw the queue empty after the swap: nothing can come
            await drain.wait_backlog_quiet(server, timeout=2.0)
        await drain.close_after_attach(server)
        assert runner.server is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        while runner.server.connections:
            now = loop.time()
            for conn in runner.server.connections:
                if conn not in self.busy and now - self.last_active.get(conn, started) >= IDLE_GRACE:
                    conn.close()
            await asyncio.sleep(0.05)
        await runner.cleanup()  # aiohttp's on_shutdown and on_cleanup


async def serve() -> None:
    app = web.Application(middlewares=[hold_while_suspended])
    app.add_routes([web.get("/", hello), web.post("/echo", echo)])
    graceful = Drain(app)
    runner = web.AppRunner(app)
    await runner.setup()  # runs aiohttp's on_startup
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    sock = worker.bind_socket() if worker.socket_path else socket.create_server(("127.0.0.1", 8000))
    server = await loop.create_server(runner.server, sock=sock, backlog=worker.backlog)  # it listens again

    stop = asyncio.Event()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        if stop.is_set():  # a second SIGTERM: the daemon's shutdown_timeout ran out
            task.cancel()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    def on_shutdown_message() -> None:  # on the library's thread: only trigger the drain
        loop.call_soon_threadsafe(stop.set)

    worker.set_shutdown_handler(on_shutdown_message)
    worker.report_online()
    await stop.wait()
    await graceful.run(server, runner)
    await worker.run_shutdown_hooks_async()


if __name__ == "__main__":
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(serve())
