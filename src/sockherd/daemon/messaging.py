"""Messages and requests to workers: chosen by selector, answered in streams, never hoarded.

A client (the CLI, a user's tool) or a worker asks; the daemon picks the workers
(worker_selector.py), sends each a ``message`` or a ``request`` frame on its IPC
connection, and forwards every reply frame a worker sends back to the asker the moment
it arrives, tagged with the worker. Nothing is accumulated: a worker that streams
without end is cut at the request's timeout, and an asker that stops reading is
dropped by its connection's own limit (ipc.py), so a request costs the daemon a few
hundred bytes per worker whatever the workers send.

Each worker's part ends on its own: its last reply (``done``), an error reply, its
connection closing (it exited, or it was stopped by a restart running meanwhile), or
the timeout. One worker's failure never fails the others' answers; the final reply
lists every worker's outcome, with errors for those that did not answer.

Messaging reads the herd and changes nothing in it, so it needs no operation slot: it
runs beside restarts and scaling, and a worker that is stopped mid-request is just a
worker whose connection closed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sockherd import protocol
from sockherd.daemon.process import FrameSink, Worker
from sockherd.protocol import Message, ProtocolError
from sockherd.worker_selector import Candidate, SelectorError, parse_selector

if TYPE_CHECKING:
    from sockherd.daemon.herd import Herd

log = logging.getLogger("sockherd")

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 3600.0
MAX_NAME = 200

Emit = Callable[[dict[str, Any]], None]
Writable = Callable[[float], Awaitable[bool]]
ASKER_STALL = 10.0  # seconds an asker may leave 64 KiB of replies unread before it is dropped


class MessagingError(Exception):
    """The request as a whole cannot be served (bad selector, nothing selected)."""


def worker_ref(worker: Worker, index: int | None) -> dict[str, Any]:
    return {"id": worker.id, "index": index, "pid": worker.pid}


def describe(ref: dict[str, Any]) -> str:
    slot = "standby" if ref["index"] is None and ref["id"].startswith("s-") else f"#{ref['index']}"
    if ref["index"] is None and not ref["id"].startswith("s-"):
        slot = "unpublished"
    return f"worker {slot} ({ref['id']}, pid {ref['pid']})"


@dataclass(eq=False)
class _Route:
    """One worker's part in one request."""

    worker: Worker
    ref: dict[str, Any]
    link: FrameSink
    emit: Emit
    writable: Writable
    done: asyncio.Future[str | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    replies: int = 0

    def finish(self, error: str | None) -> None:
        """This worker's part is over; an error is told to the asker at once."""
        if self.done.done():
            return
        self.done.set_result(error)
        if error is not None:
            self.emit({"worker": self.ref, "error": error})


class Router:
    def __init__(self, herd: Herd) -> None:
        self._herd = herd
        self._ids = itertools.count(1)
        self._routes: dict[int, _Route] = {}

    # -- selection -----------------------------------------------------------------------

    def select(self, text: str | None, self_id: str | None) -> list[tuple[Worker, dict[str, Any]]]:
        herd = self._herd
        published = {w.id: i for i, w in herd.slots.items()}
        live = [w for w in herd.workers.values() if w.alive and not w.stopping]
        try:
            selector = parse_selector(text)
            picked = selector.pick((Candidate(w.id, published.get(w.id), w.pid) for w in live), self_id=self_id)
        except SelectorError as exc:
            raise MessagingError(str(exc)) from None
        if not picked:
            raise MessagingError(f"no worker matches -w {text!r}" if text else "no worker is published")
        by_id = {w.id: w for w in live}
        return [(by_id[c.id], worker_ref(by_id[c.id], c.index)) for c in picked]

    # -- messages ------------------------------------------------------------------------

    def send_message(
        self, selector: str | None, name: str, data: Any, origin: dict[str, Any], self_id: str | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """(the workers it was delivered to, errors for those it could not be)."""
        sent, errors = [], []
        chosen = self.select(selector, self_id)
        try:  # one frame for every worker: the same bytes go to each
            frame = protocol.message("message", {"name": name, "data": data, "from": origin})
        except ProtocolError as exc:
            raise MessagingError(str(exc)) from None
        for worker, ref in chosen:
            link = worker.link
            if link is None or not link.is_open:
                errors.append(f"{describe(ref)}: {_NOT_INTEGRATED}")
                continue
            link.send(frame)
            sent.append(ref)
        return sent, errors

    # -- requests ------------------------------------------------------------------------

    async def request(
        self,
        selector: str | None,
        name: str,
        data: Any,
        *,
        timeout: float,  # noqa: ASYNC109 - each worker's deadline, answered per worker, not raised
        origin: dict[str, Any],
        emit: Emit,
        writable: Writable,
        self_id: str | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Ask every selected worker; ``emit`` gets each reply as it comes. Returns
        (every worker's outcome, errors for those that did not answer)."""
        routes: list[_Route] = []
        outcomes: list[dict[str, Any]] = []
        errors: list[str] = []
        for worker, ref in self.select(selector, self_id):
            link = worker.link
            if link is None or not link.is_open:
                outcomes.append({**ref, "ok": False, "replies": 0, "error": _NOT_INTEGRATED})
                emit({"worker": ref, "error": _NOT_INTEGRATED})
                errors.append(f"{describe(ref)}: {_NOT_INTEGRATED}")
                continue
            request_id = next(self._ids)
            try:
                frame = protocol.message("request", {"name": name, "data": data, "from": origin}, id=request_id)
            except ProtocolError as exc:
                raise MessagingError(str(exc)) from None
            route = _Route(worker, ref, link, emit, writable)
            self._routes[request_id] = route
            routes.append(route)
            link.send(frame)
        try:
            if routes:
                await asyncio.wait([r.done for r in routes], timeout=timeout)
        finally:
            for request_id in [rid for rid, r in self._routes.items() if r in routes]:
                del self._routes[request_id]
            for route in routes:
                route.finish(f"no complete answer within {timeout:g}s")
        for route in routes:
            error = route.done.result()
            outcomes.append({**route.ref, "ok": error is None, "replies": route.replies, "error": error})
            if error is not None:
                errors.append(f"{describe(route.ref)}: {error}")
        return outcomes, errors

    async def on_reply(self, link: FrameSink, msg: Message) -> None:
        """A reply frame from a worker: forwarded if it answers a request sent to that very worker.

        Then it waits while the asker has too much unread: the worker's frames are read one
        at a time, so a worker that streams faster than its asker reads is slowed down to
        the asker's pace instead of filling the daemon's memory.
        """
        assert msg.request_id is not None
        route = self._routes.get(msg.request_id) if isinstance(msg.request_id, int) else None
        if route is None or route.link is not link or route.done.done():
            return  # late (timed out), or not an answer to anything this worker was asked
        if msg.errors:
            route.finish("; ".join(msg.errors)[:2000])
            return
        if "data" in msg.raw:
            route.replies += 1
            route.emit({"worker": route.ref, "data": msg.data})
        if msg.done:
            route.emit({"worker": route.ref, "done": True})
            route.finish(None)
        elif not await route.writable(ASKER_STALL):
            route.finish("the asker stopped reading the replies")

    def on_disconnect(self, link: FrameSink) -> None:
        for route in list(self._routes.values()):
            if route.link is link:
                route.finish("its connection closed before its last reply (the worker exited or was stopped)")


_NOT_INTEGRATED = "it has no IPC connection (it does not use the sockherd library or the protocol)"


def request_fields(data: Any, *, request: bool) -> tuple[str | None, str, Any, float]:
    """(selector, name, payload, timeout) from a ``send-msg``/``send-req`` request's data."""
    what = "send-req" if request else "send-msg"
    if not isinstance(data, dict):
        raise MessagingError(f"{what}: data must be an object")
    selector = data.get("workers")
    if selector is not None and (not isinstance(selector, str) or len(selector) > 4096):
        raise MessagingError(f"{what}: 'workers' must be a selector string")
    name = data.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise MessagingError(f"{what}: 'name' must be a non-empty string of at most {MAX_NAME} characters")
    timeout = data.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT:
        raise MessagingError(f"{what}: 'timeout' must be a number of seconds from 0 to {MAX_TIMEOUT:g}")
    return selector, name, data.get("data"), float(timeout)


__all__ = ["DEFAULT_TIMEOUT", "MessagingError", "Router", "describe", "request_fields"]
