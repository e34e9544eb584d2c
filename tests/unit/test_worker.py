"""The worker library against a fake daemon.

Each scenario runs the library in a fresh interpreter (``sys.executable -c``), because
the module reads its environment once at import and keeps process-wide state. The fake
daemon is a plain threaded AF_UNIX server that decodes frames with the real codec.
Scripts block on stdin until the test closes it, so nothing here waits on a timer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockherd import protocol
from sockherd.worker import DEFAULT_SOCKET_MODE, Environment, read_environment
from support.fake_daemon import FakeDaemon

TIMEOUT = 10.0


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[FakeDaemon]]:
    started: list[FakeDaemon] = []
    yield started
    for daemon in started:
        daemon.close()


@pytest.fixture
def daemon(tmp_path: Path, daemons: list[FakeDaemon]) -> FakeDaemon:
    daemons.append(FakeDaemon(tmp_path / "ipc"))
    return daemons[-1]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(script: str, **env: str) -> subprocess.Popen[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SOCKHERD_") and k != "NOTIFY_SOCKET"}
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=clean | env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def worker_env(daemon: FakeDaemon, **extra: str) -> dict[str, str]:
    return {"SOCKHERD_WORKER_ID": "w-1", "SOCKHERD_INDEX": "0", "SOCKHERD_IPC": str(daemon.path)} | extra


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Close the script's stdin (it exits), and check that it exited cleanly."""
    out, err = proc.communicate(input="", timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return out, err


def test_public_api_is_what_it_claims() -> None:
    from sockherd import worker

    assert set(worker.__all__) == {
        *("socket_path", "id", "index", "ipc_path", "suspended", "socket_mode", "backlog"),
        *("report_online", "report_broken", "on_shutdown", "run_shutdown_hooks", "run_shutdown_hooks_async"),
        *("set_shutdown_handler", "bind_socket", "Environment", "read_environment"),
        *("resumed", "wait_resumed", "wait_resumed_async", "on_resume"),
        *("listeners", "listener_names"),
        *("on_message", "request_handler", "send_message", "request", "request_async", "Reply", "RequestFailed"),
        *("on_suspend", "set_suspend_handler"),
        "on_fork",
        "backlog_drained",
    }
    assert all(hasattr(worker, name) for name in worker.__all__)
    assert set(worker.__all__) <= set(dir(worker))  # index and suspended are live: served by __getattr__
    with pytest.raises(AttributeError, match="has no attribute 'suspendde'"):
        worker.suspendde  # type: ignore[attr-defined]  # noqa: B018


# -- the environment ----------------------------------------------------------------


def test_environment_standalone() -> None:
    env = read_environment({})
    assert (env.socket_path, env.worker_id, env.index, env.ipc_path, env.notify_socket) == (None,) * 5
    assert env.suspended is False
    assert env.socket_mode == DEFAULT_SOCKET_MODE
    assert env.backlog >= 1


def test_listen_fds_are_taken_only_by_the_process_they_name() -> None:
    environ = {"LISTEN_FDS": "2", "LISTEN_PID": "4242", "LISTEN_FDNAMES": "tcp-127.0.0.1-8000:unix-/run/a.sock"}
    env = read_environment(environ, pid=4242)
    assert (env.listen_fds, env.listen_names) == (2, ("tcp-127.0.0.1-8000", "unix-/run/a.sock"))
    # A child that inherited the variables (a server's own worker, a subprocess) takes nothing.
    assert read_environment(environ, pid=4243).listen_fds == 0
    # Names missing or miscounted: systemd's "unknown" for each, never a misattribution.
    assert read_environment({"LISTEN_FDS": "2", "LISTEN_PID": "7"}, pid=7).listen_names == ("unknown", "unknown")


def test_a_malformed_listen_fds_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        read_environment({"LISTEN_FDS": "two", "LISTEN_PID": "7"}, pid=7)


def test_environment_from_the_daemon() -> None:
    env = read_environment(
        {
            "SOCKHERD_SOCKET": "/run/app/w.sock",
            "SOCKHERD_WORKER_ID": "a1",
            "SOCKHERD_INDEX": "3",
            "SOCKHERD_IPC": "/run/app/sockherd.ipc",
            "SOCKHERD_SUSPENDED": "1",
            "SOCKHERD_SOCKET_MODE": "640",
            "SOCKHERD_BACKLOG": "77",
            "NOTIFY_SOCKET": "@notify",
        }
    )
    assert env == Environment("/run/app/w.sock", "a1", 3, "/run/app/sockherd.ipc", True, 0o640, 77, "@notify")
    assert read_environment({"SOCKHERD_INDEX": "standby"}).index is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SOCKHERD_INDEX", "one"),
        ("SOCKHERD_INDEX", "-1"),
        ("SOCKHERD_SOCKET_MODE", "rw-rw----"),
        ("SOCKHERD_SOCKET_MODE", "1777"),
        ("SOCKHERD_BACKLOG", "0"),
        ("SOCKHERD_SUSPENDED", "yes"),
    ],
)
def test_environment_refuses_malformed_values(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        read_environment({name: value})


def test_environment_needs_a_worker_id_to_talk() -> None:
    with pytest.raises(ValueError, match="SOCKHERD_WORKER_ID"):
        read_environment({"SOCKHERD_IPC": "/run/app/sockherd.ipc"})


@given(st.integers(0, 0o777))
def test_socket_mode_is_octal(mode: int) -> None:
    assert read_environment({"SOCKHERD_SOCKET_MODE": format(mode, "o")}).socket_mode == mode


# -- standalone ----------------------------------------------------------------------


def test_standalone_everything_is_a_no_op(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    proc = spawn(
        """
        import threading
        from sockherd import worker
        print(worker.socket_path, worker.id, worker.index, worker.ipc_path, worker.suspended)
        worker.report_online()
        worker.report_broken("never sent")
        worker.set_shutdown_handler(lambda: None)
        print([t.name for t in threading.enumerate() if t.name.startswith("sockherd")])
        try:
            worker.bind_socket()
        except RuntimeError as exc:
            print("bind_socket:", exc)
        """
    )
    out, _ = finish(proc)
    lines = out.splitlines()
    assert lines[0] == "None None None None False"
    assert lines[1] == "[]"
    assert lines[2].startswith("bind_socket: sockherd.worker.bind_socket(): SOCKHERD_SOCKET is not set")


def test_report_online_under_plain_systemd(spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        proc = spawn(
            "from sockherd import worker\nworker.report_online()\nworker.report_online()",
            NOTIFY_SOCKET=str(tmp_path / "notify"),
        )
        finish(proc)
        notify.setblocking(False)
        assert notify.recv(100) == b"READY=1"
        with pytest.raises(BlockingIOError):  # idempotent: one datagram only
            notify.recv(100)


# -- talking to the daemon -------------------------------------------------------------


def test_hello_and_online_from_a_thread(spawn: Callable[..., subprocess.Popen[str]], daemon: FakeDaemon) -> None:
    proc = spawn(
        """
        import sys, threading
        from sockherd import worker
        reporter = threading.Thread(target=worker.report_online)
        reporter.start()
        reporter.join()
        worker.report_online()
        sys.stdin.read()
        """,
        **worker_env(daemon),
    )
    hello = daemon.wait_message("hello")
    assert hello.id == 1
    assert hello.data == {"role": "worker", "id": "w-1", "pid": proc.pid, "version": protocol.PROTOCOL_VERSION}
    daemon.wait_message("online")
    finish(proc)
    daemon.wait_for(lambda d: 1 in d.closed, "the worker to hang up")
    assert daemon.types() == ["hello", "online"]


def test_online_and_broken_from_a_coroutine(spawn: Callable[..., subprocess.Popen[str]], daemon: FakeDaemon) -> None:
    proc = spawn(
        """
        import asyncio
        from sockherd import worker

        async def main() -> None:
            worker.report_online()
            worker.report_broken("out of disk")

        asyncio.run(main())
        """,
        **worker_env(daemon),
    )
    finish(proc)  # exits at once: the frames are flushed at exit
    daemon.wait_for(lambda d: 1 in d.closed, "the worker to hang up")
    assert daemon.types() == ["hello", "online", "broken"]
    assert daemon.received[-1][1].data == {"reason": "out of disk"}


def test_shutdown_message_calls_the_handler_once(
    spawn: Callable[..., subprocess.Popen[str]], daemon: FakeDaemon
) -> None:
    proc = spawn(
        """
        import threading
        from sockherd import worker
        called = threading.Event()

        def handler() -> None:
            print("handler on", threading.current_thread().name, flush=True)
            called.set()

        worker.set_shutdown_handler(handler)
        worker.report_online()
        assert called.wait(10)
        """,
        **worker_env(daemon),
    )
    daemon.wait_message("online")
    daemon.send(protocol.message("from-the-future", {"x": 1}))  # unknown message: ignored
    daemon.send(protocol.message("frobnicate", id=7))  # unknown request: answered with an error
    daemon.send(protocol.message("shutdown"))
    daemon.send(protocol.message("shutdown"))
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert out == "handler on sockherd-ipc\n"
    reply = daemon.wait_message("reply")
    assert (reply.request_id, reply.errors, reply.done) == (7, ("unknown request type frobnicate",), True)


def test_default_shutdown_handler_sends_sigterm(
    spawn: Callable[..., subprocess.Popen[str]], daemon: FakeDaemon
) -> None:
    proc = spawn(
        "import sys\nfrom sockherd import worker\nworker.report_online()\nsys.stdin.read()", **worker_env(daemon)
    )
    daemon.wait_message("online")
    daemon.send(protocol.message("shutdown"))
    assert proc.wait(TIMEOUT) == -signal.SIGTERM


def test_reconnects_and_reports_online_again(
    spawn: Callable[..., subprocess.Popen[str]], daemon: FakeDaemon, daemons: list[FakeDaemon]
) -> None:
    proc = spawn(
        "import sys\nfrom sockherd import worker\nworker.report_online()\nsys.stdin.read()", **worker_env(daemon)
    )
    daemon.wait_message("online", conn=1)
    daemon.drop()  # the connection breaks, the daemon lives on
    daemon.wait_message("online", conn=2)
    assert daemon.types(conn=2) == ["hello", "online"]

    daemon.close()  # the daemon goes away altogether, then a new one (a re-exec) listens again
    daemons.append(FakeDaemon(daemon.path))
    successor = daemons[-1]
    successor.wait_message("online", conn=1)
    assert successor.types() == ["hello", "online"]
    assert successor.received[0][1].data["pid"] == proc.pid
    # The app went on regardless; the successor can stop it.
    successor.send(protocol.message("shutdown"))
    assert proc.wait(TIMEOUT) == -signal.SIGTERM


def test_refused_hello_leaves_the_app_running(
    spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path, daemons: list[FakeDaemon]
) -> None:
    daemons.append(FakeDaemon(tmp_path / "ipc", hello_errors=["unknown worker id 'w-1'"]))
    proc = spawn(
        """
        import sys
        from sockherd import worker
        sys.stdin.readline()
        worker.report_online()
        worker.report_broken("ignored")
        print("still serving", flush=True)
        """,
        **worker_env(daemons[0]),
    )
    daemons[0].wait_message("hello")
    out, err = finish(proc)
    assert out == "still serving\n"
    assert "refused this worker (unknown worker id 'w-1'); continuing without IPC" in err


# -- shutdown hooks -------------------------------------------------------------------

HOOKS = """
    import asyncio
    from sockherd import worker

    @worker.on_shutdown
    def first() -> None:
        print("sync hook", flush=True)

    @worker.on_shutdown
    async def second() -> None:
        await asyncio.sleep(0)
        print("async hook", flush=True)

    @worker.on_shutdown
    def failing() -> None:
        raise RuntimeError("boom")

    @worker.on_shutdown
    def last() -> None:
        print("hook after the failure", flush=True)
"""


@pytest.mark.parametrize(
    "run",
    [
        "worker.run_shutdown_hooks()\nworker.run_shutdown_hooks()",
        "asyncio.run(worker.run_shutdown_hooks_async())\nasyncio.run(worker.run_shutdown_hooks_async())",
        "async def main() -> None:\n    worker.run_shutdown_hooks()\nasyncio.run(main())",  # sync call inside a loop
        "pass  # left to atexit",
    ],
)
def test_hooks_run_once_each(spawn: Callable[..., subprocess.Popen[str]], run: str) -> None:
    script = (
        textwrap.dedent(HOOKS)
        + run
        + "\n@worker.on_shutdown\ndef late() -> None:\n    print('late hook', flush=True)\n"
    )
    out, err = finish(spawn(script))
    assert out.splitlines() == ["sync hook", "async hook", "hook after the failure", "late hook"]
    assert err.count("RuntimeError: boom") == 1
    assert "shutdown hook failing failed" in err


def test_hooks_do_not_run_in_a_forked_child(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    script = """
        import os
        from sockherd import worker
        worker.on_shutdown(lambda: print("hook in", "child" if pid == 0 else "parent", flush=True))
        pid = os.fork()
        if pid:
            os.waitpid(pid, 0)
    """
    out, _ = finish(spawn(script))
    assert out == "hook in parent\n"


# -- the socket -----------------------------------------------------------------------

BIND = """
    import os, socket
    from sockherd import worker
    os.umask(int(os.environ["TEST_UMASK"], 8))
    sock = worker.bind_socket()
    print(oct(os.stat(worker.socket_path).st_mode & 0o777))
    pending = []
    while True:  # fill the backlog: a non-blocking connect fails with EAGAIN once it is full
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(worker.socket_path)
        except BlockingIOError:
            break
        pending.append(client)
    print(len(pending))
"""


@pytest.mark.parametrize(("mode", "umask"), [("600", "022"), ("660", "022"), ("660", "077"), ("666", "000")])
def test_bind_socket_mode_and_backlog(
    spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path, mode: str, umask: str
) -> None:
    path = tmp_path / "w.sock"
    env = {"SOCKHERD_SOCKET": str(path), "SOCKHERD_SOCKET_MODE": mode, "SOCKHERD_BACKLOG": "4", "TEST_UMASK": umask}
    out, _ = finish(spawn(BIND, **env))
    shown_mode, pending = out.split()
    assert shown_mode == oct(int(mode, 8))
    assert 4 <= int(pending) <= 5  # Linux queues backlog + 1


def test_bind_socket_refuses_an_existing_path(spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    path.write_text("not a socket")
    proc = spawn("from sockherd import worker\nworker.bind_socket()", SOCKHERD_SOCKET=str(path))
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1
    assert f"OSError: [Errno 98] cannot bind the worker socket {path}: Address already in use" in err


def test_on_fork_refuses_async_hooks_and_runs_plain_ones_once_per_process() -> None:
    from sockherd import worker

    async def pool() -> None:
        pass

    with pytest.raises(TypeError, match="on_fork hooks run before the server's event loop exists"):
        worker.on_fork(pool)
    calls: list[int] = []
    worker.on_fork(lambda: calls.append(os.getpid()))
    worker._run_fork_hooks()
    worker._run_fork_hooks()  # the runner calls it again once the app is loaded: nothing twice
    assert calls == [os.getpid()]
