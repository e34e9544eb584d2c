"""The worker's handler dispatcher: where handlers run and what the daemon gets back."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sockherd._worker_messages import Dispatcher


class Sent:
    def __init__(self) -> None:
        self.frames: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    def __call__(self, frame: bytes) -> None:
        self.frames.put(json.loads(frame))

    def until_done(self) -> list[dict[str, Any]]:
        out = []
        while True:
            frame = self.frames.get(timeout=5)
            out.append(frame)
            if frame["done"]:
                return out


def test_a_plain_return_is_one_reply_and_none_is_an_answer_too() -> None:
    sent = Sent()
    dispatcher = Dispatcher(sent)
    dispatcher.add_request_handler("double", lambda data: data * 2)
    dispatcher.add_request_handler("nothing", lambda data: None)
    dispatcher.on_request(7, "double", 21, None)
    assert sent.until_done() == [{"type": "reply", "request_id": 7, "data": 42, "done": True}]
    dispatcher.on_request(8, "nothing", None, None)
    assert sent.until_done() == [{"type": "reply", "request_id": 8, "data": None, "done": True}]


def test_a_generator_streams_and_runs_off_the_calling_thread() -> None:
    sent = Sent()
    dispatcher = Dispatcher(sent)
    caller = threading.current_thread()
    seen: list[threading.Thread] = []

    def stream(data: Any) -> Iterator[int]:
        seen.append(threading.current_thread())
        yield from (1, 2, 3)

    dispatcher.add_request_handler("stream", stream)
    dispatcher.on_request(1, "stream", None, None)
    frames = sent.until_done()
    assert [f.get("data") for f in frames] == [1, 2, 3, None]
    assert [f["done"] for f in frames] == [False, False, False, True]
    assert seen and seen[0] is not caller


def test_async_handlers_run_on_the_loop_they_were_registered_on() -> None:
    sent = Sent()
    dispatcher = Dispatcher(sent)
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        async def astream(data: Any) -> AsyncIterator[int]:
            loops.append(asyncio.get_running_loop())
            for i in range(2):
                await asyncio.sleep(0)
                yield i

        dispatcher.add_request_handler("astream", astream)
        # The IPC thread hands the request over from another thread.
        threading.Thread(target=dispatcher.on_request, args=(3, "astream", None, None)).start()
        frames = await asyncio.to_thread(sent.until_done)
        assert [f.get("data") for f in frames] == [0, 1, None]
        assert loops == [asyncio.get_running_loop()]

    asyncio.run(main())


def test_failures_are_error_replies() -> None:
    sent = Sent()
    dispatcher = Dispatcher(sent)

    def broken(data: Any) -> None:
        raise KeyError("x")

    dispatcher.add_request_handler("broken", broken)
    dispatcher.add_request_handler("a-set", lambda data: {1})
    dispatcher.on_request(1, "broken", None, None)
    assert sent.until_done()[0]["errors"] == ["the handler for 'broken' raised KeyError: 'x'"]
    dispatcher.on_request(2, "a-set", None, None)
    (frame,) = sent.until_done()
    assert "answered with something that cannot be sent" in frame["errors"][0]
    dispatcher.on_request(3, "missing", None, None)
    (frame,) = sent.until_done()
    assert frame["errors"] == ["no handler for request 'missing' (this worker handles: 'a-set', 'broken')"]


def test_message_handlers_all_run_and_a_failing_one_does_not_stop_the_others() -> None:
    dispatcher = Dispatcher(Sent())
    got: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def failing(message: str, data: Any) -> None:
        raise RuntimeError("no")

    dispatcher.add_message_handler(failing)
    dispatcher.add_message_handler(lambda message, data: got.put((message, data)))
    dispatcher.on_message("hello", {"a": 1}, None)
    assert got.get(timeout=5) == ("hello", {"a": 1})
