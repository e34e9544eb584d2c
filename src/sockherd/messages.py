"""The answer to a ``send-req``, as items: shared by the CLI's client and the worker library.

Light on purpose (no asyncio): the CLI imports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sockherd import protocol

__all__ = ["Reply", "RequestFailed", "replies_of"]


class RequestFailed(Exception):
    """The daemon refused the request as a whole (a bad selector, no worker selected)."""


class Reply:
    """One item of an answer: ``worker`` (id, index, pid) and its ``data``, or its ``error``."""

    __slots__ = ("data", "error", "worker")

    def __init__(self, worker: dict[str, Any], data: Any = None, error: str | None = None) -> None:
        self.worker = worker
        self.data = data
        self.error = error

    def __repr__(self) -> str:
        what = f"error={self.error!r}" if self.error is not None else f"data={self.data!r}"
        return f"Reply(worker={self.worker.get('id')!r}, {what})"


def replies_of(messages: Iterator[protocol.Message], outcome: list[dict[str, Any]] | None = None) -> Iterator[Reply]:
    """The items of a ``send-req`` answer, as the daemon streams them; ``outcome`` receives
    the final summary (every selected worker, ``ok``, ``replies``, ``error``)."""
    for msg in messages:
        data = msg.data if isinstance(msg.data, dict) else {}
        if not msg.done:
            worker = data.get("worker")
            if not isinstance(worker, dict) or data.get("done"):
                continue
            if "error" in data:
                yield Reply(worker, error=str(data["error"]))
            elif "data" in data:
                yield Reply(worker, data["data"])
            continue
        if msg.errors and "workers" not in data:
            raise RequestFailed("; ".join(msg.errors))
        if outcome is not None and isinstance(data.get("workers"), list):
            outcome.extend(w for w in data["workers"] if isinstance(w, dict))
        return
