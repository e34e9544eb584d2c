"""What the ASGI and WSGI suspend middlewares share: their limits and their 503."""

from __future__ import annotations

DEFAULT_RETRY_AFTER = 5  # seconds, for the Retry-After of a request that waited too long
UNAVAILABLE_BODY = b"503 Service Unavailable: this worker is suspended; retry shortly\n"


def check_hold(timeout: float | None, retry_after: int) -> None:
    """Refuse settings that would make a held request's answer meaningless."""
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must not be negative, got {timeout!r}")
    if retry_after < 0:
        raise ValueError(f"retry_after must not be negative, got {retry_after!r}")
