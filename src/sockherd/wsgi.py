"""WSGI middleware that holds requests while the worker is suspended.

The twin of :mod:`sockherd.asgi` for threaded servers: the request's thread blocks in
:func:`sockherd.worker.wait_resumed` until the daemon resumes the worker, then the app
runs as usual. A worker started suspended (a deploy waiting for a database migration,
a standby waiting for promotion) thus holds requests instead of running new code
against the old schema; the client sees a slow response, not an error.

    from sockherd.wsgi import SuspendMiddleware
    application = SuspendMiddleware(application)

Every held request holds a server thread: a server with few threads holds few
requests, and the rest wait in its accept queue, which is also holding. Without
sockherd (or once resumed) the middleware costs one flag check.
"""

from __future__ import annotations

from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from sockherd import worker
from sockherd._hold import DEFAULT_RETRY_AFTER, UNAVAILABLE_BODY, check_hold

__all__ = ["DEFAULT_RETRY_AFTER", "SuspendMiddleware"]


class SuspendMiddleware:
    """Hold every request until the worker is resumed.

    ``timeout``: seconds a request may be held; past it, the request is answered
    ``503`` with ``Retry-After: retry_after``. The default, None, holds until resumed:
    a held request is one nginx already sent to this worker, and when the daemon gives
    up on a suspended worker it shuts it down, which resumes it first, so held requests
    are served either way. Set a timeout shorter than nginx's ``proxy_read_timeout``
    when a migration may outlast it, so the client gets a clear answer instead of
    nginx's 504.
    """

    def __init__(
        self, app: WSGIApplication, *, timeout: float | None = None, retry_after: int = DEFAULT_RETRY_AFTER
    ) -> None:
        check_hold(timeout, retry_after)
        self.app = app
        self.timeout = timeout
        self.retry_after = retry_after

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if worker.wait_resumed(self.timeout):
            return self.app(environ, start_response)
        start_response(
            "503 Service Unavailable",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(UNAVAILABLE_BODY))),
                ("Retry-After", str(self.retry_after)),
            ],
        )
        return [UNAVAILABLE_BODY]
