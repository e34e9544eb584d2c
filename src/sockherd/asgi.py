"""ASGI middleware that holds requests while the worker is suspended.

A worker started suspended (``sockherd restart --suspended``: a deploy that waits for
a database migration; or a standby waiting for promotion) binds, reports online and
accepts connections, but must not run new code against the old schema. Wrapping the
app holds every HTTP request and WebSocket handshake until the daemon resumes the
worker, then lets it through: the client sees a slow response, not an error.

    from sockherd.asgi import SuspendMiddleware
    app = SuspendMiddleware(app)

Lifespan passes straight through: startup must complete while suspended, because the
server reports online only after it, and the daemon resumes only workers that are
online. Without sockherd (or once resumed) the middleware costs one flag check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sockherd import worker
from sockherd._hold import DEFAULT_RETRY_AFTER, UNAVAILABLE_BODY, check_hold

__all__ = ["DEFAULT_RETRY_AFTER", "SuspendMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HELD_SCOPES = frozenset({"http", "websocket"})
WS_TRY_AGAIN_LATER = 1013  # RFC 6455 close code, for servers without the denial-response extension


class SuspendMiddleware:
    """Hold ``http`` and ``websocket`` scopes until the worker is resumed.

    ``timeout``: seconds a request may be held; past it, the request is answered
    ``503`` with ``Retry-After: retry_after`` (a WebSocket handshake is refused the
    same way, or closed with code 1013 by servers that cannot send a denial response).
    The default, None, holds until resumed: a held request is one nginx already sent
    to this worker, and when the daemon gives up on a suspended worker it shuts it
    down, which resumes it first, so held requests are served either way. Set a
    timeout shorter than nginx's ``proxy_read_timeout`` when a migration may outlast
    it, so the client gets a clear answer instead of nginx's 504.
    """

    def __init__(self, app: ASGIApp, *, timeout: float | None = None, retry_after: int = DEFAULT_RETRY_AFTER) -> None:
        check_hold(timeout, retry_after)
        self.app = app
        self.timeout = timeout
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in HELD_SCOPES and not await worker.wait_resumed_async(self.timeout):
            await self._unavailable(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _unavailable(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(UNAVAILABLE_BODY)).encode()),
            (b"retry-after", str(self.retry_after).encode()),
        ]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": UNAVAILABLE_BODY})
            return
        # A WebSocket app must take the handshake's connect message before answering it.
        if (await receive())["type"] != "websocket.connect":
            return  # the client went away while held
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": 503, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": UNAVAILABLE_BODY})
        else:
            await send({"type": "websocket.close", "code": WS_TRY_AGAIN_LATER})
