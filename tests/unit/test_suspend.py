"""Suspended workers: ``resumed``, ``wait_resumed``, ``on_resume``, a standby's index, the ASGI middleware.

As in test_worker.py, each scenario is a fresh interpreter (the library reads its
environment once, at import) talking to a fake daemon. The scripts print what they
see, one line at a time; the test reads those lines with a deadline, and asserts that a
waiter is still waiting by a bounded "nothing arrives within QUIET seconds" check.
When a script must look at its state after the daemon said something, the test sends
it as a request, waits for the worker's reply (proof that the IPC thread handled it),
and only then tells the script to go on through its stdin.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.types import StartResponse, WSGIEnvironment

import pytest

from sockherd import asgi, protocol, wsgi
from sockherd._worker_ipc import resume_index
from support.fake_daemon import FakeDaemon

TIMEOUT = 10.0
QUIET = 0.3  # a waiter that is still silent after this long is taken to be waiting
# Scripts print with say(): one write per line, so lines from several threads never interleave.
SAY = "import sys\ndef say(*args):\n    sys.stdout.write(' '.join(map(str, args)) + '\\n')\n    sys.stdout.flush()\n"


@dataclass
class Script:
    """A worker script whose stdout is read line by line, with deadlines."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    reader: threading.Thread | None = None

    def read_lines(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self) -> str:
        try:
            return self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"the script printed nothing for {TIMEOUT} s") from None

    def take(self, count: int) -> set[str]:
        """The next ``count`` lines, in any order (they come from several threads)."""
        return {self.line() for _ in range(count)}

    def assert_silent(self) -> None:
        with pytest.raises(queue.Empty):
            unexpected = self.lines.get(timeout=QUIET)
            raise AssertionError(f"expected nothing yet, got {unexpected!r}")

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> str:
        """Close stdin, wait for a clean exit; returns stderr."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        assert self.proc.wait(TIMEOUT) == 0
        err = self.proc.stderr.read()
        assert self.reader is not None
        self.reader.join(TIMEOUT)
        assert self.lines.empty(), f"unexpected output: {list(self.lines.queue)}"
        return err


@pytest.fixture
def run() -> Iterator[Callable[..., Script]]:
    scripts: list[Script] = []

    def start(code: str, **env: str) -> Script:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SOCKHERD_") and k != "NOTIFY_SOCKET"}
        proc = subprocess.Popen(
            [sys.executable, "-c", SAY + textwrap.dedent(code)],
            env=clean | env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        script = Script(proc)
        script.reader = threading.Thread(target=script.read_lines, daemon=True)
        script.reader.start()
        scripts.append(script)
        return script

    yield start
    for script in scripts:
        if script.proc.poll() is None:
            script.proc.kill()
        script.proc.wait()
        assert script.reader is not None
        script.reader.join(TIMEOUT)
        for stream in (script.proc.stdin, script.proc.stdout, script.proc.stderr):
            with contextlib.suppress(OSError):  # stdin with unread lines: a broken pipe
                assert stream is not None
                stream.close()


def suspended_env(fake_daemon: FakeDaemon, index: str = "0", suspended: str = "1") -> dict[str, str]:
    return {
        "SOCKHERD_WORKER_ID": "w-1",
        "SOCKHERD_INDEX": index,
        "SOCKHERD_IPC": str(fake_daemon.path),
        "SOCKHERD_SUSPENDED": suspended,
    }


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, (None, None)),  # no data: a plain resume
        ({}, (None, None)),
        ({"index": None}, (None, None)),
        ({"index": 0}, (0, None)),
        ({"index": 7, "future": "ignored"}, (7, None)),
        ({"index": True}, (None, "resume index must be a non-negative integer, got True")),
        ({"index": -1}, (None, "resume index must be a non-negative integer, got -1")),
        ({"index": 1.0}, (None, "resume index must be a non-negative integer, got 1.0")),
        ("3", (None, "resume data must be an object, got str")),
    ],
)
def test_resume_index(data: object, expected: tuple[int | None, str | None]) -> None:
    assert resume_index(data) == expected


def test_resumed_waits_for_the_daemon_in_every_thread_and_loop(
    run: Callable[..., Script], fake_daemon: FakeDaemon
) -> None:
    script = run(
        """
        import asyncio, threading
        from sockherd import worker

        say("suspended", worker.suspended, worker.index, worker.resumed)

        def in_a_thread() -> None:
            say("thread waiting")
            say("thread resumed", worker.wait_resumed())

        async def in_a_loop(name: str) -> None:
            say(name, "waiting")
            await worker.resumed
            say(name, "resumed", worker.suspended)

        threads = [
            threading.Thread(target=in_a_thread),
            threading.Thread(target=asyncio.run, args=(in_a_loop("other loop"),)),
        ]

        async def main() -> None:
            say("timeouts", worker.wait_resumed(0.01), await worker.wait_resumed_async(0.01))
            try:
                await asyncio.wait_for(worker.resumed, 0.01)
            except TimeoutError:
                say("wait_for timed out")
            task = asyncio.create_task(in_a_loop("main loop"))
            for thread in threads:
                thread.start()
            worker.report_online()
            await task
            await worker.resumed  # done: returns at once, however often
            say("after", worker.suspended, await worker.wait_resumed_async(0), worker.resumed)

        asyncio.run(main())
        for thread in threads:
            thread.join()
        """,
        **suspended_env(fake_daemon),
    )
    assert script.line() == "suspended True 0 <sockherd.worker.resumed: pending>"
    assert script.line() == "timeouts False False"
    assert script.line() == "wait_for timed out"
    assert script.take(3) == {"main loop waiting", "thread waiting", "other loop waiting"}
    fake_daemon.wait_message("online")
    script.assert_silent()

    fake_daemon.resume()
    assert script.take(4) == {
        "main loop resumed False",
        "thread resumed True",
        "other loop resumed False",
        "after False True <sockherd.worker.resumed: done>",
    }
    script.finish()


def test_a_standby_learns_its_index(run: Callable[..., Script], fake_daemon: FakeDaemon) -> None:
    script = run(
        """
        import sys
        from sockherd import worker
        say(worker.index, worker.suspended)
        worker.report_online()
        worker.wait_resumed()
        say(worker.index, worker.suspended)
        for line in sys.stdin:
            say(worker.index, worker.suspended)
        """,
        **suspended_env(fake_daemon, index="standby"),
    )
    assert script.line() == "None True"
    fake_daemon.wait_message("online")
    script.assert_silent()
    fake_daemon.resume({"index": 3})  # promoted into slot 3
    assert script.line() == "3 False"

    fake_daemon.resume({"index": 5}, id=9)  # moved again: harmless, the index follows
    assert fake_daemon.wait_reply(9).errors == ()
    script.go_on()
    assert script.line() == "5 False"

    fake_daemon.resume({"index": "six"}, id=10)  # malformed: reported, the index stays
    assert fake_daemon.wait_reply(10).errors == ("resume index must be a non-negative integer, got 'six'",)
    fake_daemon.resume([], id=11)
    assert fake_daemon.wait_reply(11).errors == ("resume data must be an object, got list",)
    script.go_on()
    assert script.line() == "5 False"
    err = script.finish()
    assert "resume index must be a non-negative integer, got 'six'; resuming without it" in err


def test_a_malformed_resume_still_resumes(run: Callable[..., Script], fake_daemon: FakeDaemon) -> None:
    """Holding every request because of a bad index would be the worse failure."""
    script = run(
        "from sockherd import worker\nworker.report_online()\nprint(worker.wait_resumed(), worker.index)",
        **suspended_env(fake_daemon, index="standby"),
    )
    fake_daemon.wait_message("online")
    fake_daemon.resume({"index": -1})
    assert script.line() == "True None"
    script.finish()


def test_resume_to_a_running_worker_is_harmless(run: Callable[..., Script], fake_daemon: FakeDaemon) -> None:
    script = run(
        """
        import sys
        from sockherd import worker
        worker.on_resume(lambda: say("hook ran at once"))
        say(worker.index, worker.suspended)
        worker.report_online()
        sys.stdin.readline()
        say(worker.index, worker.suspended)
        """,
        **suspended_env(fake_daemon, suspended="0"),
    )
    assert script.line() == "hook ran at once"
    assert script.line() == "0 False"
    fake_daemon.wait_message("online")
    fake_daemon.resume({"index": 2}, id=4)
    fake_daemon.resume(None, id=5)  # no data: a plain resume, the index stays
    fake_daemon.wait_reply(5)
    script.go_on()
    assert script.line() == "2 False"
    script.finish()  # and the hook did not run again


def test_on_resume_hooks_run_once_each_where_they_belong(run: Callable[..., Script], fake_daemon: FakeDaemon) -> None:
    script = run(
        """
        import asyncio, sys, threading
        from sockherd import worker

        @worker.on_resume
        def plain() -> None:
            say("plain hook on", threading.current_thread().name)

        @worker.on_resume
        def failing() -> None:
            raise RuntimeError("boom")

        @worker.on_resume
        async def detached() -> None:
            await asyncio.sleep(0)
            say("async hook on", threading.current_thread().name)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            ran = asyncio.Event()

            @worker.on_resume
            async def on_the_loop() -> None:  # registered inside a loop: runs there, as a task
                say("loop hook on", threading.current_thread().name, asyncio.get_running_loop() is loop)
                ran.set()

            @worker.on_resume
            def sync_on_the_loop() -> None:
                say("sync loop hook on", threading.current_thread().name)

            worker.report_online()
            await ran.wait()

        asyncio.run(main())
        for line in sys.stdin:
            worker.on_resume(lambda: say("late hook ran at once"))
        """,
        **suspended_env(fake_daemon),
    )
    fake_daemon.wait_message("online")
    script.assert_silent()
    fake_daemon.resume()
    assert script.take(4) == {
        "plain hook on sockherd-ipc",
        "async hook on sockherd-resume-hook",
        "loop hook on MainThread True",
        "sync loop hook on MainThread",
    }
    fake_daemon.resume(id=2)  # again: no hook runs twice
    fake_daemon.wait_reply(2)
    script.go_on()
    assert script.line() == "late hook ran at once"
    err = script.finish()
    assert err.count("RuntimeError: boom") == 1
    assert "sockherd: resume hook failing failed" in err


@pytest.mark.parametrize(
    ("env", "warning"),
    [
        ({}, ""),
        (
            {"SOCKHERD_SUSPENDED": "1"},  # nobody could ever resume it: not suspended, and said so
            "SOCKHERD_SUSPENDED=1 without SOCKHERD_IPC: nothing could resume this worker",
        ),
    ],
)
def test_standalone_is_never_suspended(run: Callable[..., Script], env: dict[str, str], warning: str) -> None:
    script = run(
        """
        import asyncio, threading
        from sockherd import worker

        worker.on_resume(lambda: say("hook ran at once"))
        say(worker.suspended, worker.index, worker.wait_resumed(0), worker.resumed)

        async def main() -> None:
            await worker.resumed
            say("awaited", await worker.wait_resumed_async(0))

            @worker.on_resume
            async def started() -> None:
                say("async hook ran on the loop")

            await asyncio.sleep(0)  # the hook's task runs in the next iteration

        asyncio.run(main())
        say([t.name for t in threading.enumerate() if t.name.startswith("sockherd")])
        """,
        **env,
    )
    assert script.line() == "hook ran at once"
    assert script.line() == "False None True <sockherd.worker.resumed: done>"
    assert script.line() == "awaited True"
    assert script.line() == "async hook ran on the loop"
    assert script.line() == "[]"
    err = script.finish()
    assert warning in err
    if not warning:
        assert err == ""


def test_shutdown_while_suspended_resumes_first(run: Callable[..., Script], fake_daemon: FakeDaemon) -> None:
    script = run(
        """
        import threading
        from sockherd import worker

        handled = threading.Event()

        @worker.on_resume
        def hook() -> None:
            say("resume hook; suspended:", worker.suspended)

        def handler() -> None:
            say("shutdown handler; suspended:", worker.suspended)
            handled.set()

        worker.set_shutdown_handler(handler)
        worker.report_online()
        say("held work released:", worker.wait_resumed())
        assert handled.wait(10)
        """,
        **suspended_env(fake_daemon),
    )
    fake_daemon.wait_message("online")
    script.assert_silent()
    fake_daemon.send(protocol.message("shutdown"))
    lines = [script.line() for _ in range(3)]
    ipc_thread = [line for line in lines if not line.startswith("held")]
    assert ipc_thread == ["resume hook; suspended: False", "shutdown handler; suspended: False"]
    assert "held work released: True" in lines
    script.finish()


def test_a_reconnect_changes_nothing(run: Callable[..., Script], fake_daemon: FakeDaemon) -> None:
    script = run(
        """
        import sys
        from sockherd import worker
        worker.report_online()
        sys.stdin.readline()
        say("suspended", worker.suspended)
        say("resumed", worker.wait_resumed())
        """,
        **suspended_env(fake_daemon),
    )
    fake_daemon.wait_message("online", conn=1)
    fake_daemon.drop()
    fake_daemon.wait_message("online", conn=2)
    script.go_on()
    assert script.line() == "suspended True"
    script.assert_silent()
    fake_daemon.resume()  # on the new connection: the daemon re-sends resume when it is due
    assert script.line() == "resumed True"
    script.finish()


# -- the ASGI middleware, called directly -----------------------------------------------

ASGI = """
    import asyncio, json, sys
    from sockherd import worker
    from sockherd.asgi import SuspendMiddleware

    calls = []

    async def app(scope, receive, send) -> None:
        calls.append(scope["type"])

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def call(middleware, scope) -> list:
        sent = []

        async def send(message) -> None:
            message = dict(message)
            if "headers" in message:
                message["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
            if "body" in message:
                message["body"] = message["body"].decode()
            sent.append(message)

        await middleware(scope, receive, send)
        return sent

    async def main() -> None:
        held = SuspendMiddleware(app)
        impatient = SuspendMiddleware(app, timeout=0.01, retry_after=7)
        await call(held, {"type": "lifespan"})  # passes straight through while suspended
        say(json.dumps(calls))
        say(json.dumps(await call(impatient, {"type": "http"})))
        denial = {"type": "websocket", "extensions": {"websocket.http.response": {}}}
        say(json.dumps(await call(impatient, denial)))
        say(json.dumps(await call(impatient, {"type": "websocket"})))
        requests = [asyncio.create_task(call(held, {"type": kind})) for kind in ("http", "websocket")]
        worker.report_online()
        await asyncio.gather(*requests)
        say(json.dumps(calls))

    asyncio.run(main())
"""


def test_asgi_middleware_holds_until_resumed(run: Callable[..., Script], fake_daemon: FakeDaemon) -> None:
    script = run(ASGI, **suspended_env(fake_daemon))
    assert json.loads(script.line()) == ["lifespan"]
    headers = {
        "content-type": "text/plain; charset=utf-8",
        "content-length": "65",
        "retry-after": "7",
    }
    body = "503 Service Unavailable: this worker is suspended; retry shortly\n"
    assert json.loads(script.line()) == [
        {"type": "http.response.start", "status": 503, "headers": headers},
        {"type": "http.response.body", "body": body},
    ]
    assert json.loads(script.line()) == [
        {"type": "websocket.http.response.start", "status": 503, "headers": headers},
        {"type": "websocket.http.response.body", "body": body},
    ]
    assert json.loads(script.line()) == [{"type": "websocket.close", "code": 1013}]
    fake_daemon.wait_message("online")
    script.assert_silent()
    fake_daemon.resume()
    assert json.loads(script.line()) == ["lifespan", "http", "websocket"]
    script.finish()


async def no_asgi_app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
    raise AssertionError("not called")


def no_wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    raise AssertionError("not called")


def test_middlewares_refuse_negative_settings() -> None:
    with pytest.raises(ValueError, match="timeout"):
        asgi.SuspendMiddleware(no_asgi_app, timeout=-1)
    with pytest.raises(ValueError, match="retry_after"):
        asgi.SuspendMiddleware(no_asgi_app, retry_after=-1)
    with pytest.raises(ValueError, match="timeout"):
        wsgi.SuspendMiddleware(no_wsgi_app, timeout=-1)
    with pytest.raises(ValueError, match="retry_after"):
        wsgi.SuspendMiddleware(no_wsgi_app, retry_after=-1)


def test_a_park_pauses_with_on_suspend_and_the_next_resume_runs_on_resume_again(
    run: Callable[..., Script], fake_daemon: FakeDaemon
) -> None:
    """Kept for a rollback (`suspend`), a worker is not suspended in the sense of holding
    requests: only its hooks pause and restart its background work."""
    script = run(
        """
        import sys
        from sockherd import worker
        worker.on_resume(lambda: say("start background work"))
        worker.on_suspend(lambda: say("pause background work", worker.suspended))
        worker.set_suspend_handler(lambda parked: say("shed keep-alive connections" if parked else "keep-alive again"))
        worker.report_online()
        sys.stdin.readline()
        """,
        **suspended_env(fake_daemon, suspended="0"),
    )
    assert script.line() == "start background work"
    fake_daemon.wait_message("online")
    fake_daemon.send(b'{"type":"suspend"}\n')
    assert {script.line(), script.line()} == {"shed keep-alive connections", "pause background work False"}
    fake_daemon.resume({"index": 0})
    assert {script.line(), script.line()} == {"start background work", "keep-alive again"}
    script.go_on()
    script.finish()
