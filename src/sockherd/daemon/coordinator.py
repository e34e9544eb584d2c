"""One owner for every change of the herd: operations run one at a time.

Three kinds of operation, and what each does to the one that holds the coordinator:

- **exclusive** (start, restart, resume, scale, reload): refused with :class:`Busy`
  while another operation runs, except a yielding one, which it cancels;
- **preempting** (stop, terminate, quit): cancels whatever runs (but waits for another
  preempting one), then holds the coordinator until it is done;
- **yielding** (healing that replaces live workers: broken, max_age, max_memory): waits
  until nothing runs, and gives way to any command that arrives meanwhile.

Once the daemon is quitting, everything but a preempting operation is refused with
:class:`ShuttingDown`. An operation is a task of its own: a client that disconnects does
not cancel it, and a cancelled operation kills what it started (a spawn that is
cancelled leaves nothing running, see processes.py) before its cancellation completes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

log = logging.getLogger("sockherd")

T = TypeVar("T")
Kind = Literal["exclusive", "preempting", "yielding"]


class Busy(Exception):
    """Another operation holds the coordinator; the message names it."""


class ShuttingDown(Exception):
    """The daemon is quitting: no operation starts any more."""


@dataclass(frozen=True, slots=True)
class _Holder:
    name: str
    kind: Kind
    task: asyncio.Future[Any]


class Coordinator:
    def __init__(self) -> None:
        self._holder: _Holder | None = None
        self.quitting = False
        # Commands waiting for a cancelled holder to finish: a yielding operation must
        # not slip in before them (it would be cancelled again, and again).
        self._commands_waiting = 0
        self._no_command_waiting = asyncio.Event()
        self._no_command_waiting.set()
        self._preempting_waiting: list[str] = []  # stops waiting for a cancelled holder

    @property
    def operation(self) -> str | None:
        """The name of the operation in progress, if any (status shows it)."""
        holder = self._holding()
        return holder.name if holder is not None else None

    def _holding(self) -> _Holder | None:
        if self._holder is not None and self._holder.task.done():
            self._holder = None
        return self._holder

    def begin_quit(self) -> None:
        """From now on only stop, terminate and quit may run."""
        self.quitting = True

    def _refuse_if_quitting(self, name: str, kind: Kind) -> None:
        if self.quitting and kind != "preempting":
            raise ShuttingDown(f"shutting down: the daemon is quitting; {name} refused")

    async def run(self, name: str, work: Callable[[], Awaitable[T]], *, kind: Kind = "exclusive") -> T:
        """Run ``work`` as the one operation in progress, by the rules of its kind."""
        self._refuse_if_quitting(name, kind)
        if kind == "yielding":
            await self._wait_until_idle()
        else:
            await self._take_over(name, kind)
        self._refuse_if_quitting(name, kind)
        task: asyncio.Future[T] = asyncio.ensure_future(work())
        self._holder = _Holder(name, kind, task)
        # Shielded: the caller (a client's connection) may go away; the operation goes on.
        return await asyncio.shield(task)

    async def _take_over(self, name: str, kind: Kind) -> None:
        if kind == "exclusive" and self._preempting_waiting:
            # A stop is taking over (its predecessor is still cancelling): not a gap to slip into.
            raise Busy(f"busy: a {self._preempting_waiting[-1]} is in progress; try again when it is done")
        self._commands_waiting += 1
        self._no_command_waiting.clear()
        if kind == "preempting":
            self._preempting_waiting.append(name)
        try:
            while (holder := self._holding()) is not None:
                if kind == "exclusive" and holder.kind != "yielding":
                    raise Busy(f"busy: a {holder.name} is in progress; try again when it is done")
                if holder.kind == "yielding" or (kind == "preempting" and holder.kind != "preempting"):
                    log.info("%s interrupted by %s", holder.name, name)
                    holder.task.cancel()
                await asyncio.wait({holder.task})  # never raises: the holder's fate is its own caller's
                self._refuse_if_quitting(name, kind)
        finally:
            if kind == "preempting":
                self._preempting_waiting.remove(name)
            self._commands_waiting -= 1
            if self._commands_waiting == 0:
                self._no_command_waiting.set()

    async def _wait_until_idle(self) -> None:
        while True:
            if (holder := self._holding()) is not None:
                await asyncio.wait({holder.task})
            elif self._commands_waiting:
                await self._no_command_waiting.wait()
            else:
                return
