"""send-msg and send-req: real daemons, real workers with handlers, the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import psutil

from conftest import DaemonFactory
from support.daemon import REPO, RunningDaemon, tinyapp_command, wait_for
from support.nginx import free_port

APPS = REPO / "tests" / "apps"
MESSAGING = {"command": [sys.executable, "messaging_app.py"], "cwd": str(APPS), "workers": 3}


def replies(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def started(start_daemon: DaemonFactory, **settings: Any) -> RunningDaemon:
    daemon = start_daemon({**MESSAGING, **settings})
    daemon.wait_ready(settings.get("workers", 3))
    wait_for(lambda: all(w["integrated"] for w in daemon.status()["workers"]), 10, "IPC links")
    return daemon


def test_a_request_to_all_workers_gets_one_reply_from_each(start_daemon: DaemonFactory) -> None:
    daemon = started(start_daemon)
    pids = {w["index"]: w["pid"] for w in daemon.status()["workers"]}
    result = daemon.cli("send-req", "pid", '{"n": 1}')
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())  # printed as they arrive
    assert len(lines) == 3
    for index, line in enumerate(lines):  # each naming its worker
        assert line.startswith(f"#{index} (pid {pids[index]}): ")
        assert json.loads(line.split(": ", 1)[1]) == {"pid": pids[index], "index": index, "echo": {"n": 1}}
    assert "3 of 3 worker(s) answered" in result.stderr


def test_generators_stream_their_replies_in_order(start_daemon: DaemonFactory) -> None:
    daemon = started(start_daemon, workers=2)
    for name in ("count", "acount"):
        result = daemon.cli("send-req", "--json", name)
        assert result.returncode == 0, result.stderr
        items = replies(result)
        for index in (0, 1):
            assert [i["data"] for i in items if i["worker"]["index"] == index] == [1, 2, 3]


def test_send_msg_not_0_reaches_exactly_the_others(start_daemon: DaemonFactory) -> None:
    daemon = started(start_daemon)
    result = daemon.cli("send-msg", "-w", "!0", "cache-clear", '{"keys": ["a"]}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sent to 2 worker(s): #1 (pid")

    def got() -> dict[int, Any]:
        return {i["worker"]["index"]: i["data"] for i in replies(daemon.cli("send-req", "--json", "messages"))}

    wait_for(lambda: got()[1] and got()[2], 5, "the message to be handled")
    received = got()
    assert received[0] == []
    assert received[1] == received[2] == [["cache-clear", {"keys": ["a"]}]]


def test_a_worker_killed_mid_stream_is_an_error_for_it_and_the_command_returns(start_daemon: DaemonFactory) -> None:
    daemon = started(start_daemon, workers=2)
    began = time.monotonic()
    asking = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sockherd",
            "send-req",
            "-w",
            "0",
            "--timeout",
            "30",
            "linger",
            "-c",
            str(daemon.config_path),
        ],
        cwd=daemon.workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert asking.stdout is not None
    first = asking.stdout.readline()  # the handler's first reply: its pid; then it waits
    victim = int(first.split(": ", 1)[1])
    os.kill(victim, signal.SIGKILL)
    out, err = asking.communicate(timeout=20)
    assert asking.returncode == 1
    assert time.monotonic() - began < 15, "it did not wait for the timeout"
    assert f"#0 (pid {victim}): error: its connection closed before its last reply" in out
    assert "0 of 1 worker(s) answered" in err


def test_handler_failures_are_error_replies_and_the_worker_carries_on(start_daemon: DaemonFactory) -> None:
    daemon = started(start_daemon, workers=1)
    pid = daemon.status()["workers"][0]["pid"]
    expected = {
        "boom": "the handler for 'boom' raised RuntimeError: as asked",
        "not-json": "the handler for 'not-json' answered with something that cannot be sent",
        "huge": "over the 1048576-byte limit",
        "nope": "no handler for request 'nope' (this worker handles: 'acount', 'ask-others', 'boom'",
    }
    for name, error in expected.items():
        result = daemon.cli("send-req", name)
        assert result.returncode == 1, (name, result.stdout)
        assert error in result.stdout, (name, result.stdout)
    assert daemon.status()["workers"][0]["pid"] == pid
    assert daemon.cli("send-req", "pid").returncode == 0


def test_workers_ask_each_other_through_the_daemon(start_daemon: DaemonFactory) -> None:
    daemon = started(start_daemon)
    pids = {w["index"]: w["pid"] for w in daemon.status()["workers"]}
    result = daemon.cli("send-req", "--json", "-w", "0", "ask-others")
    assert result.returncode == 0, result.stdout + result.stderr
    (item,) = replies(result)
    assert item["data"] == sorted([pids[1], pids[2]])


def test_bad_input_is_named_and_costs_nothing(start_daemon: DaemonFactory) -> None:
    daemon = started(start_daemon, workers=1)
    bad_json = daemon.cli("send-req", "pid", "{nope")
    assert bad_json.returncode == 2 and "the data is not JSON" in bad_json.stderr
    bad_selector = daemon.cli("send-msg", "-w", "x", "hello")
    assert bad_selector.returncode == 2 and "'x' is not a selector term" in bad_selector.stderr
    nobody = daemon.cli("send-req", "-w", "7", "pid")
    assert nobody.returncode == 1 and "no worker matches -w '7'" in nobody.stderr
    from_cli_self = daemon.cli("send-req", "-w", "self", "pid")
    assert (
        from_cli_self.returncode == 1
        and "'self' only means something in a message from a worker" in from_cli_self.stderr
    )


def test_workers_without_the_library_are_named_not_waited_for(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    result = daemon.cli("send-req", "--timeout", "30", "pid")
    assert result.returncode == 1
    assert result.stdout.count("error: it has no IPC connection") == 2
    sent = daemon.cli("send-msg", "hello")
    assert sent.returncode == 1 and "it has no IPC connection" in sent.stderr


def test_a_rogue_worker_cannot_exhaust_or_stall_the_daemon(start_daemon: DaemonFactory) -> None:
    """A worker that floods replies (half for ids it was never given) and sends garbage on
    a second connection, answering a client that never reads: the daemon stays small and
    answers everyone else at once."""
    daemon = start_daemon(
        {
            "command": [sys.executable, "rogue_worker.py"],
            "cwd": str(APPS),
            "workers": 1,
            "listen": [f"tcp://127.0.0.1:{free_port()}"],
        }
    )
    daemon.wait_ready(1)
    wait_for(lambda: daemon.status()["workers"][0]["integrated"], 10, "the rogue's hello")
    daemon.wait_log(r"IPC: closing the connection of pid \d+: frame is not JSON")  # the garbage connection
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(str(daemon.ipc))
    silent.sendall(b'{"type":"hello","id":1,"data":{"role":"client"}}\n')
    request = {"type": "send-req", "id": 2, "data": {"name": "anything", "timeout": 20}}
    silent.sendall(json.dumps(request).encode() + b"\n")  # ... and never reads a reply
    daemon.wait_log(r"does not read its replies; dropping the connection", timeout=30)
    peak = 0
    for _ in range(20):
        started_at = time.monotonic()
        assert daemon.status()["workers"]
        assert time.monotonic() - started_at < 1.0
        peak = max(peak, psutil.Process(daemon.proc.pid).memory_info().rss)
    assert peak < 100 << 20, f"daemon RSS {peak >> 20} MiB"
    silent.close()
    # A reader slower than the rogue streams: the daemon must slow the rogue down to its
    # pace (backpressure) rather than buffer, and never drop it for reading slowly.
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(str(daemon.ipc))
    slow.sendall(b'{"type":"hello","id":1,"data":{"role":"client"}}\n')
    slow.sendall(json.dumps({**request, "id": 3}).encode() + b"\n")
    frames: list[dict[str, Any]] = []
    buffered, done = b"", False
    while not done:
        chunk = slow.recv(128 << 10)
        assert chunk, f"dropped after {len(frames)} frames: the daemon buffered instead of slowing the rogue down"
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            frame = json.loads(line)
            if frame.get("request_id") == 3:
                frames.append(frame)
                done = done or frame["done"]
        time.sleep(0.02)  # the slow reader (a deliberate pace, not a wait for an event)
    slow.close()
    worker_id = daemon.status()["workers"][0]["id"]
    items = [f["data"] for f in frames if not f["done"]]
    assert all(item["worker"]["id"] == worker_id for item in items)
    assert len([i for i in items if "data" in i]) == 10000  # only the replies to its own request


def test_the_client_libraries_sync_and_asyncio(start_daemon: DaemonFactory) -> None:
    from sockherd.client import AsyncClient, Client, RequestFailed

    daemon = started(start_daemon, workers=2)
    pids = {w["pid"] for w in daemon.status()["workers"]}
    with Client(daemon.ipc) as client:
        assert {w["pid"] for w in client.send_message("hello", workers="0-")} == pids
        assert sorted(r.data for r in client.send_request("count", workers="0")) == [1, 2, 3]
        assert [w["ok"] for w in client.last_outcome] == [True]
        try:
            list(client.send_request("pid", workers="9"))
        except RequestFailed as exc:
            assert "no worker matches" in str(exc)
        else:
            raise AssertionError("RequestFailed expected")

    async def main() -> None:
        async with AsyncClient(daemon.ipc) as client:
            # Requests on one connection run side by side: a status while a stream is open.
            stream = client.send_request("acount")
            first = await anext(stream)
            status = await client.call("status")
            rest = [reply async for reply in stream]
            assert {r.worker["pid"] for r in [first, *rest]} == pids == {w["pid"] for w in status["workers"]}
            assert len([first, *rest]) == 6
            progress: list[str] = []
            await client.call("restart", on_progress=progress.append)
            assert any("generation 2 is serving" in line for line in progress)

    asyncio.run(main())
