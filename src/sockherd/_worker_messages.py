"""A worker's message and request handlers: registered by the app, run off the IPC thread.

The IPC thread only hands a ``message`` or ``request`` over to :class:`Dispatcher`,
which runs the handler elsewhere, so that a slow handler never stalls the link (a
``shutdown`` must always get through) and never blocks the app:

- a plain function (or a generator function) runs in a small thread pool of its own;
- a coroutine function (or an async generator function) runs on the event loop that
  was running where it was registered (the app's loop, when the decorator runs at
  import under uvicorn), else on a private loop thread.

A request handler gets the request's data and returns a JSON value (one reply), or is
a generator / async generator whose every item is one reply of a stream. A handler that
raises, or returns something that is not JSON, or a reply over the frame limit, gives
an error reply: never a dead worker, never a missing answer. A message handler gets
``(message, data)``; what it returns is ignored, and what it raises is logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from typing import Any

from sockherd import protocol
from sockherd.messages import Reply, RequestFailed, replies_of

__all__ = ["Dispatcher", "Reply", "RequestFailed", "replies_of", "reply_frame", "wait_replies"]

log = logging.getLogger("sockherd.worker")

MAX_HANDLER_THREADS = 4
_NO_DATA = object()

Send = Callable[[bytes], None]


def reply_frame(request_id: int | str, data: Any = _NO_DATA, *, done: bool, errors: list[str] | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "reply", "request_id": request_id, "done": done}
    if data is not _NO_DATA:
        frame["data"] = data  # a handler's None is an answer too: sent as null
    if errors:
        frame["errors"] = errors
    return protocol.encode(frame)


class _Registered:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None


class Dispatcher:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._message_handlers: list[_Registered] = []
        self._request_handlers: dict[str, _Registered] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._private_loop: asyncio.AbstractEventLoop | None = None

    # -- registration (any thread) -----------------------------------------------------

    def add_message_handler(self, fn: Callable[..., Any]) -> None:
        with self._lock:
            self._message_handlers.append(_Registered(fn))

    def add_request_handler(self, name: str, fn: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a request handler needs a non-empty name")
        with self._lock:
            self._request_handlers[name] = _Registered(fn)

    @property
    def request_names(self) -> list[str]:
        with self._lock:
            return sorted(self._request_handlers)

    # -- called on the IPC thread: schedule only --------------------------------------

    def on_message(self, name: str, data: Any, origin: Any) -> None:
        with self._lock:
            handlers = list(self._message_handlers)
        for handler in handlers:
            self._schedule(handler, self._run_message, handler, name, data)

    def on_request(self, request_id: int | str, name: str, data: Any, origin: Any) -> None:
        with self._lock:
            handler = self._request_handlers.get(name)
            known = sorted(self._request_handlers)
        if handler is None:
            listed = ", ".join(repr(n) for n in known) or "none"
            self._reply_error(request_id, f"no handler for request {name!r} (this worker handles: {listed})")
            return
        self._schedule(handler, self._run_request, handler, request_id, name, data)

    def after_fork_in_child(self) -> None:
        """Threads and loops do not survive fork; a child starts without them."""
        self._lock = threading.Lock()
        self._executor = None
        self._private_loop = None

    # -- running ------------------------------------------------------------------------

    def _schedule(self, handler: _Registered, runner: Callable[..., Any], *args: Any) -> None:
        if handler.is_async:
            loop = handler.loop if handler.loop is not None and not handler.loop.is_closed() else self._loop()
            asyncio.run_coroutine_threadsafe(runner(*args), loop)
        else:
            self._pool().submit(runner, *args)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    MAX_HANDLER_THREADS, thread_name_prefix="sockherd-handler"
                )
            return self._executor

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._private_loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="sockherd-handlers", daemon=True).start()
                self._private_loop = loop
            return self._private_loop

    # The runners are sync or async depending on the handler; both never raise.

    def _run_message(self, handler: _Registered, name: str, data: Any) -> Any:
        if handler.is_async:
            return self._run_message_async(handler, name, data)
        try:
            handler.fn(name, data)
        except Exception:
            log.exception("sockherd: the message handler %s failed on %r", _name(handler.fn), name)
        return None

    async def _run_message_async(self, handler: _Registered, name: str, data: Any) -> None:
        try:
            await handler.fn(name, data)
        except Exception:
            log.exception("sockherd: the message handler %s failed on %r", _name(handler.fn), name)

    def _run_request(self, handler: _Registered, request_id: int | str, name: str, data: Any) -> Any:
        if handler.is_async:
            return self._run_request_async(handler, request_id, name, data)
        try:
            result = handler.fn(data)
            if inspect.isgenerator(result):
                self._stream(request_id, name, result)
            else:
                self._reply(request_id, name, result, done=True)
        except Exception as exc:
            self._reply_error(request_id, _raised(name, exc))
        return None

    async def _run_request_async(self, handler: _Registered, request_id: int | str, name: str, data: Any) -> None:
        try:
            result = handler.fn(data)
            if inspect.isasyncgen(result):
                await self._stream_async(request_id, name, result)
            else:
                self._reply(request_id, name, await result, done=True)
        except Exception as exc:
            self._reply_error(request_id, _raised(name, exc))

    def _stream(self, request_id: int | str, name: str, items: Generator[Any, Any, Any]) -> None:
        for item in items:
            if not self._reply(request_id, name, item, done=False):
                items.close()
                return
        self._send(reply_frame(request_id, done=True))

    async def _stream_async(self, request_id: int | str, name: str, items: AsyncGenerator[Any, Any]) -> None:
        async for item in items:
            if not self._reply(request_id, name, item, done=False):
                await items.aclose()
                return
        self._send(reply_frame(request_id, done=True))

    def _reply(self, request_id: int | str, name: str, value: Any, *, done: bool) -> bool:
        try:
            frame = reply_frame(request_id, value, done=done)
        except (TypeError, ValueError, protocol.ProtocolError) as exc:
            self._reply_error(
                request_id, f"the handler for {name!r} answered with something that cannot be sent: {exc}"
            )
            return False
        self._send(frame)
        return True

    def _reply_error(self, request_id: int | str, error: str) -> None:
        self._send(reply_frame(request_id, done=True, errors=[error[:2000]]))


def _raised(name: str, exc: BaseException) -> str:
    return f"the handler for {name!r} raised {type(exc).__name__}: {exc}"


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))


# -- asking other workers, through the daemon -----------------------------------------


def wait_replies(replies: queue.SimpleQueue[protocol.Message | None], timeout: float) -> Iterator[protocol.Message]:
    """The daemon's reply frames to one request, until the last; ConnectionError if the link drops."""
    while True:
        try:
            msg = replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the daemon did not answer within {timeout:g}s") from None
        if msg is None:
            raise ConnectionError("the connection to the sockherd daemon was lost before the answer")
        yield msg
        if msg.done:
            return
