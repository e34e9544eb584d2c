"""A fork server given several requests at once forks them side by side (sockherd.preload).

The test plays the daemon on the fork server's channel: it queues three fork requests
before the fork server has even finished importing the app, so that it finds them all
at once, as it does a deploy's. The forks' middle processes wait for each other (the
app's FORK_BARRIER), which they can only do if all were started before the first pid
was read. Each answer must be the pid of the worker asked for, in order, and each worker
must hold its own descriptors only: the log files and pipes of the workers forked next
to it are closed in it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sockherd.daemon.forkserver import PRELOAD_FD_VAR
from support.fake_daemon import FakeDaemon
from support.lines import worker_env
from support.preloaded import APPS

WORKERS = 3


def hellos(daemon: FakeDaemon) -> list[dict[str, Any]]:
    return [m.data for _, m in daemon.received if m.type == "hello" and isinstance(m.data, dict)]


@pytest.fixture
def fork_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKHERD_")}
    env[PRELOAD_FD_VAR] = str(theirs.fileno())
    env["SOCKHERD_PRELOAD_SPARE"] = ""
    (tmp_path / "barrier").mkdir()
    env["FORK_BARRIER"] = f"{tmp_path / 'barrier'}:{WORKERS}"  # tests/apps/preload_app.py
    with open(tmp_path / "fork-server.log", "wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sockherd.uvicorn", "preload_app:app"],
            cwd=APPS,
            env=env,
            pass_fds=[theirs.fileno()],
            stdout=subprocess.DEVNULL,
            stderr=output,
            start_new_session=True,
        )
    theirs.close()
    ours.settimeout(30)
    yield proc, ours
    ours.close()  # the fork server exits when its channel closes
    proc.wait(10)


def test_requests_that_arrive_together_are_forked_together_each_worker_with_its_own_descriptors(
    tmp_path: Path, fake_daemon: FakeDaemon, fork_server: tuple[subprocess.Popen[bytes], socket.socket]
) -> None:
    _, channel = fork_server
    logs = []
    for i in range(WORKERS):  # queued before the fork server reads any
        log = tmp_path / f"worker-{i}.log"
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        contract = worker_env(str(fake_daemon.path), str(tmp_path / f"w{i}.sock"), SOCKHERD_WORKER_ID=f"w{i}")
        contract = {k: v for k, v in contract.items() if k.startswith("SOCKHERD_")}
        request = {"env": contract, "outputs": ["stdout", "stderr"], "listen": 0}
        socket.send_fds(channel, [json.dumps(request).encode()], [out, out])
        os.close(out)
        logs.append(str(log))
    assert json.loads(channel.recv(65536))["ready"] is True
    pids = [json.loads(channel.recv(65536))["pid"] for _ in range(WORKERS)]
    try:
        # Each fork's middle process waited for the others': all were started before any pid
        # was read. Forked one after another, each would have waited alone (5 s, then on).
        assert not [name for name in os.listdir(tmp_path / "barrier") if name.startswith("alone-")]
        fake_daemon.wait_for(lambda d: len(hellos(d)) == WORKERS, "every worker's hello")
        said = {hello["pid"]: hello["id"] for hello in hellos(fake_daemon)}
        assert [said[pid] for pid in pids] == [f"w{i}" for i in range(WORKERS)]  # answered in the order asked
        for i, pid in enumerate(pids):
            held = {int(fd.name): os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
            assert {fd for fd, target in held.items() if target in logs} == {1, 2}, held
            assert held[1] == logs[i]
            assert not [target for target in held.values() if target.startswith("pipe:")], held
    finally:
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)
