"""Run an ASGI app with uvicorn under sockherd, draining without losing a request.

    python -m sockherd.uvicorn MODULE:APP [--timeout-keep-alive N] [--log-level L] [--factory]

or ``sockherd.uvicorn.run(app, **uvicorn_config_kwargs)`` from a script. Under sockherd
the worker binds ``SOCKHERD_SOCKET`` (mode and backlog as the daemon says) or serves on
the daemon's shared listeners (``listen``, handed over as ``LISTEN_FDS``), reports
online once uvicorn has started, and turns the daemon's ``shutdown`` into a staged
drain (see :meth:`SockherdServer.shutdown`). Without sockherd it is plain
``uvicorn.run(app, host="127.0.0.1", port=8000, ...)``.

``timeout_keep_alive`` defaults to 75 s instead of uvicorn's 5 s. nginx keeps idle
upstream connections for ``keepalive_timeout`` (60 s by default) and reuses them; when
the server closes an idle connection first, nginx can be writing a request into it at
that very moment and the request fails. The server's timeout must therefore outlast
nginx's, so that nginx is always the side that closes idle connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType
from typing import Any

try:
    import uvicorn
except ImportError as exc:  # an optional dependency
    raise ImportError(
        "sockherd.uvicorn needs uvicorn, which is not installed: pip install 'sockherd[uvicorn]'"
    ) from exc
from uvicorn.importer import import_from_string

from sockherd import drain, preload, worker

__all__ = ["DEFAULT_TIMEOUT_KEEP_ALIVE", "SockherdServer", "main", "run"]

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

DEFAULT_TIMEOUT_KEEP_ALIVE = 75  # > nginx's default upstream keepalive_timeout of 60 s
BACKLOG_QUIET = 0.05  # the backlog must stay empty this long before the listener closes
BACKLOG_TIMEOUT = 2.0  # ... but a steady stream of new connections cannot hold shutdown up longer
IDLE_GRACE = 0.5  # an idle keep-alive connection is closed once seen idle this long while draining
DRAIN_POLL = 0.05  # how often the drain looks at idle connections (a request ending or a connection closing wakes it)
TICK = 0.1  # uvicorn's main loop interval (Date header, limit_max_requests); a shutdown does not wait for it
CLOSE_HEADER = (b"connection", b"close")

logger = logging.getLogger("uvicorn.error")


class _Connections(set[Any]):
    """uvicorn's set of open connections (``server_state.connections``), telling the drain
    when one leaves it: every protocol class adds itself on ``connection_made`` and
    discards (or removes) itself on ``connection_lost``, in the loop's thread. Without
    it the drain would notice the last busy connection close only at its next look."""

    def __init__(self) -> None:
        super().__init__()
        self.on_leave: Callable[[], None] | None = None

    def discard(self, connection: Any) -> None:
        super().discard(connection)
        self._left()

    def remove(self, connection: Any) -> None:
        super().remove(connection)
        self._left()

    def _left(self) -> None:
        if self.on_leave is not None:
            self.on_leave()


class SockherdServer(uvicorn.Server):
    """A uvicorn server that reports online and drains in stages.

    Overrides only ``startup`` (to report online), ``main_loop`` (woken by a shutdown
    request instead of looking every 0.1 s), ``handle_exit`` (a SIGTERM during the drain
    means "hurry") and ``shutdown``; it relies on the parts of uvicorn's protocol
    classes that every HTTP implementation shares: ``server_state.connections`` and
    ``.tasks``, a protocol's ``.cycle`` (``response_started``, ``response_complete``,
    ``default_headers``) and ``.transport``, and ``shutdown()``.
    """

    def __init__(self, config: uvicorn.Config, *, shared: bool = False) -> None:
        super().__init__(config)
        self.server_state.connections = self._connections = _Connections()  # before any connection is made
        # Serving on the daemon's shared listeners: their queue belongs to every worker,
        # so a drain stops accepting at once and leaves what waits to the others.
        self.shared = shared
        self._draining = False
        self._hurry = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shedding: asyncio.Task[bool] | None = None
        self._parked = False  # kept for a rollback: shedding keep-alive connections
        self._exit_wanted: asyncio.Future[None] | None = None  # main_loop's wake-up

    def request_exit(self) -> None:
        """Start the graceful shutdown; safe from any thread (wakes the main loop).

        ``Connection: close`` is switched on at once rather than when the main loop
        next polls (up to 0.1 s later), so that nginx learns sooner. It matters for a
        worker shut down while suspended: the library resumes it just before calling
        this, and the requests it held would otherwise be answered before the poll, as
        keep-alive, by a worker that is going away. Queued right behind their release,
        the switch runs before any of them writes its response.
        """
        self.should_exit = True
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
                self._loop.call_soon_threadsafe(self._respond_with_close)
                self._loop.call_soon_threadsafe(self._wake_main_loop)

    def _wake_main_loop(self) -> None:
        if self._exit_wanted is not None and not self._exit_wanted.done():
            self._exit_wanted.set_result(None)

    async def main_loop(self) -> None:
        """uvicorn's, but a shutdown request wakes it: uvicorn's sleeps 0.1 s between two
        looks at ``should_exit``, which made every drain, and so every deploy, start
        50 ms late on average (100 ms at worst). Ticks (the ``Date`` header refresh,
        ``limit_max_requests``) still come every 0.1 s."""
        self._exit_wanted = asyncio.get_running_loop().create_future()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            if not self._exit_wanted.done():
                await asyncio.wait([self._exit_wanted], timeout=TICK)
            should_exit = await self.on_tick(counter)

    def on_park(self, parked: bool) -> None:
        """The daemon keeps this worker for a rollback (``suspend``): close its keep-alive
        connections gracefully (``Connection: close`` on every response, idle ones after
        a grace), so that nginx stops reusing them; a rollback takes it back (keep-alive
        again). Safe from any thread."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._shed if parked else self._end_shed)

    def _shed(self) -> None:
        if self._draining:
            return
        self._parked = True
        self._respond_with_close()
        if self._shedding is None or self._shedding.done():
            self._shedding = asyncio.ensure_future(self._drain_connections(None))

    def _end_shed(self) -> None:
        """Back in service (a rollback resumed it): keep-alive again. Only after a park,
        and never once the server is shutting down (its ``Connection: close`` stays)."""
        if not self._parked:
            return
        self._parked = False
        if self._shedding is not None:
            self._shedding.cancel()
            self._shedding = None
        if not self._draining and not self.should_exit:
            headers = self.server_state.default_headers
            while CLOSE_HEADER in headers:
                headers.remove(CLOSE_HEADER)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        worker._run_fork_hooks()  # the app is loaded: its on_fork hooks, unless a fork ran them
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            where = ", ".join(worker.listener_names()) if self.shared else worker.socket_path
            logger.info("sockherd worker %s serving on %s", worker.id, where)
            worker.report_online()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining and sig == signal.SIGTERM:
            self._hurry = True  # the daemon's shutdown_timeout ran out: finish now
        super().handle_exit(sig, frame)
        if self._loop is not None:  # a signal handler: call_soon_threadsafe is the safe way in
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake_main_loop)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Drain: nothing accepted is dropped, nothing in the backlog is reset.

        1. Every response from now on says ``Connection: close``, so nginx stops reusing
           this worker's connections (done first: the sooner nginx learns, the fewer idle
           connections are left to close).
        2. Keep accepting until the listen backlog has stayed empty for a moment (the
           daemon lingers after moving the symlink, so the backlog only drains). Not on
           shared listeners: the other workers accept what waits there; not when the
           daemon's ``shutdown`` says it already saw the queue empty after the symlink
           moved (``worker.backlog_drained()``): then nothing more can arrive.
        3. Stop accepting, let accepted connections attach, close the listeners.
        4. Wait for in-flight requests. An idle keep-alive connection is closed only after
           it has been seen idle for ``IDLE_GRACE``: nginx may be writing a request into
           it from its pool right now, and closing at once would race with that.
        5. Lifespan shutdown, then the ``worker.on_shutdown`` hooks.
        ``timeout_graceful_shutdown`` (or a SIGTERM during the drain) cuts step 4 short.
        """
        self._draining = True
        if self._shedding is not None:
            self._shedding.cancel()
        loop = asyncio.get_running_loop()
        timeout = self.config.timeout_graceful_shutdown
        deadline = None if timeout is None else loop.time() + timeout
        self._respond_with_close()
        logger.info("Shutting down: draining connections")

        if not self.shared and not worker.backlog_drained():  # the daemon saw it empty: nothing can come
            backlog_timeout = min(BACKLOG_TIMEOUT, _remaining(deadline, loop))
            await asyncio.gather(
                *(drain.wait_backlog_quiet(s, BACKLOG_QUIET, timeout=backlog_timeout) for s in self.servers)
            )
        await asyncio.gather(*(drain.close_after_attach(s) for s in self.servers))
        for sock in sockets or []:
            sock.close()

        if not await self._drain_connections(deadline):
            state = self.server_state
            logger.error(
                "Graceful shutdown cut short: closing %d connection(s), cancelling %d task(s)",
                len(state.connections),
                len(state.tasks),
            )
            for connection in list(state.connections):
                connection.shutdown()
            for task in list(state.tasks):
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")

        if not self.force_exit:
            await self.lifespan.shutdown()
        await worker.run_shutdown_hooks_async()

    def _respond_with_close(self) -> None:
        # In place: every request cycle created since uvicorn's last once-a-second
        # refresh holds this very list. Cycles holding an older list are patched below.
        headers = self.server_state.default_headers
        if CLOSE_HEADER not in headers:
            headers.append(CLOSE_HEADER)
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            if cycle is not None and _busy(cycle) and not getattr(cycle, "response_started", True):
                old = getattr(cycle, "default_headers", None)
                if isinstance(old, list) and CLOSE_HEADER not in old:
                    cycle.default_headers = [*old, CLOSE_HEADER]

    async def _drain_connections(self, deadline: float | None) -> bool:
        """Wait until no connection and no request task is left. False if cut short."""
        loop = asyncio.get_running_loop()
        state = self.server_state
        idle_since: dict[object, tuple[object, float]] = {}  # connection -> (cycle seen idle, when)
        while (state.connections or state.tasks) and not self.force_exit:
            now = loop.time()
            if self._hurry or (deadline is not None and now >= deadline):
                return False
            for connection in list(state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None and transport.is_closing():
                    continue
                cycle = getattr(connection, "cycle", None)
                if _busy(cycle):
                    connection.shutdown()  # busy: close once the response is complete
                    idle_since.pop(connection, None)
                    continue
                seen = idle_since.get(connection)
                if seen is None or seen[0] is not cycle:  # new, or served a request since
                    idle_since[connection] = (cycle, now)
                elif now - seen[1] >= IDLE_GRACE:
                    connection.shutdown()  # idle: closes it
            # Wake as soon as a request ends or a connection closes (a busy one told to
            # close does so once its response is out), else look again after DRAIN_POLL.
            left: asyncio.Future[None] = loop.create_future()

            def wake(left: asyncio.Future[None] = left) -> None:
                if not left.done():
                    left.set_result(None)

            self._connections.on_leave = wake
            try:
                await asyncio.wait({left, *state.tasks}, timeout=min(DRAIN_POLL, _remaining(deadline, loop)))
            finally:
                self._connections.on_leave = None
                left.cancel()
        return True


def _remaining(deadline: float | None, loop: asyncio.AbstractEventLoop) -> float:
    return math.inf if deadline is None else max(0.0, deadline - loop.time())


def _busy(cycle: object) -> bool:
    return cycle is not None and not getattr(cycle, "response_complete", True)


def run(app: str | ASGIApp, **kwargs: Any) -> None:
    """Serve ``app`` ("module:attribute" or the ASGI callable) with uvicorn.

    Keyword arguments go to ``uvicorn.Config``. Under sockherd, ``host``, ``port``,
    ``uds`` and ``fd`` are ignored (the worker binds ``SOCKHERD_SOCKET``, or serves on
    the daemon's shared listeners), ``backlog``
    defaults to the daemon's, and ``reload``/``workers`` are refused: the daemon owns
    the processes. Standalone, this is ``uvicorn.run`` on 127.0.0.1:8000.
    """
    kwargs.setdefault("timeout_keep_alive", DEFAULT_TIMEOUT_KEEP_ALIVE)
    shared = worker.listeners()
    if worker.socket_path is None and not shared:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 8000)
        uvicorn.run(app, **kwargs)
        return
    if kwargs.get("reload") or (kwargs.get("workers") or 1) > 1:
        raise ValueError("reload and workers are not available under sockherd: set `workers` in sockherd.toml")
    ignored = sorted(key for key in ("host", "port", "uds", "fd") if kwargs.pop(key, None) is not None)
    if ignored:
        where = ", ".join(worker.listener_names()) if shared else worker.socket_path
        logger.warning("sockherd: ignoring %s: the worker serves on %s", ", ".join(ignored), where)
    app_dir = kwargs.pop("app_dir", None)
    if app_dir is not None:
        sys.path.insert(0, app_dir)
    kwargs.setdefault("backlog", worker.backlog)  # else create_server re-listens with uvicorn's 2048

    server = SockherdServer(uvicorn.Config(app, **kwargs), shared=bool(shared))
    sockets = shared or [worker.bind_socket()]
    worker.set_shutdown_handler(server.request_exit)
    worker.set_suspend_handler(server.on_park)
    try:
        server.run(sockets=sockets)
    finally:
        worker.set_shutdown_handler(None)
        worker.set_suspend_handler(None)
        for sock in sockets:
            sock.close()


def _import_serving_modules() -> None:
    """In the fork server: what uvicorn imports as a worker starts serving (the HTTP and
    WebSocket protocol, lifespan and event loop classes it picks for "auto", as the
    runner leaves them), imported once here instead of in every forked worker, where it
    would delay each worker's start (measured: h11 and its protocol, ~12 ms idle)."""
    from uvicorn import config as uvicorn_config

    for table in ("HTTP_PROTOCOLS", "WS_PROTOCOLS", "LIFESPAN", "LOOP_FACTORIES", "LOOP_SETUPS"):
        target = getattr(uvicorn_config, table, {}).get("auto")
        if isinstance(target, str):
            with contextlib.suppress(Exception):  # whatever fails here fails again, reported, in the worker
                import_from_string(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sockherd.uvicorn",
        description="Serve an ASGI app with uvicorn as a sockherd worker (plain uvicorn on :8000 without sockherd).",
    )
    parser.add_argument("app", help="the ASGI app, as MODULE:ATTRIBUTE")
    parser.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=DEFAULT_TIMEOUT_KEEP_ALIVE,
        metavar="N",
        help="seconds an idle connection is kept; keep it above nginx's keepalive_timeout (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout-graceful-shutdown",
        type=int,
        default=None,
        metavar="N",
        help="seconds to wait for in-flight requests at shutdown (default: until the daemon escalates)",
    )
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--factory", action="store_true", help="APP is a factory returning the app")
    args = parser.parse_args(argv)
    app: str | ASGIApp = args.app
    if preload.preloading():  # `preload = true`: import once here, fork the workers from this process
        _import_serving_modules()
        preload.warm_point()  # a spare waits here for the next deploy, the app not yet imported
        app = import_from_string(args.app)
    preload.fork_point()
    run(
        app,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        log_level=args.log_level,
        factory=args.factory,
    )
    preload.exit_forked_worker()  # a forked worker ends here, without the interpreter's teardown


if __name__ == "__main__":
    main()
