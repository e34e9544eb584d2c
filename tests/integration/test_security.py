"""Hostile neighbours and hostile clients: nothing followed, nothing exhausted, nothing readable.

Issue 8's findings, each reproduced against a real daemon. This machine runs the tests
as root with ``fs.protected_symlinks=0``, as containers often do: nothing here relies
on the kernel refusing to follow a planted link.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import DaemonFactory
from sockherd import protocol
from sockherd.daemon.ipc import MAX_CONNECTIONS
from support.daemon import REPO, run_daemon_once, tinyapp_command, wait_for, write_config


def test_the_daemon_is_not_dumpable(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    status = daemon.wait_ready(1)
    assert status["daemon"]["dumpable"] is False


def test_non_dumpable_keeps_a_same_uid_worker_out_of_the_environment(tmp_path: Path) -> None:
    # The finding: a worker (same uid as the daemon) read SECRET from /proc/<daemon>.
    # As the same unprivileged uid, on both sides (root keeps the kernel's override).
    probe = f"""
import os, subprocess, sys
sys.path.insert(0, {str(REPO / "src")!r})
if sys.argv[1] == "hardened":
    from sockherd.daemon.hardening import make_undumpable
    make_undumpable()
worker = subprocess.run(["cat", f"/proc/{{os.getpid()}}/environ"], capture_output=True)
print(worker.returncode, b"hunter2" in worker.stdout)
"""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", probe]
    env = {"PATH": "/usr/bin:/bin", "SECRET": "hunter2"}
    plain = subprocess.run([*as_nobody, "plain"], capture_output=True, text=True, check=True, cwd="/", env=env)
    hardened = subprocess.run([*as_nobody, "hardened"], capture_output=True, text=True, check=True, cwd="/", env=env)
    assert plain.stdout.split() == ["0", "True"]  # the control: a dumpable process is readable
    assert hardened.stdout.split()[1] == "False" and hardened.stdout.split()[0] != "0"


def test_a_log_file_replaced_by_a_symlink_is_never_followed(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log = tmp_path / "app.log"
    log.symlink_to(victim)
    daemon = start_daemon({"command": tinyapp_command(), "stdout": str(log)}, "--no-start")
    wait_for(daemon.ipc.exists, 10, "the IPC socket")
    result = daemon.cli("start")
    assert result.returncode == 1
    assert f"cannot open its log file {log}: it is a symlink (never followed)" in result.stderr
    assert victim.read_text() == "precious\n"
    assert daemon.worker_processes() == []


def test_a_directory_planted_at_a_slot_name_refuses_the_start_and_leaves_nothing(
    start_daemon: DaemonFactory,
) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2}, "--no-start")
    wait_for(daemon.ipc.exists, 10, "the IPC socket")
    (daemon.tmp_dir / "app.1.sock").mkdir()
    for _ in range(2):  # every start, not only the first
        result = daemon.cli("start")
        assert result.returncode == 1, result.stderr
        assert "app.1.sock is a directory, not a symlink sockherd made; remove it" in result.stderr
        assert "internal error" not in result.stderr
    assert daemon.worker_processes() == [] and daemon.status()["workers"] == []
    (daemon.tmp_dir / "app.1.sock").rmdir()
    assert daemon.cli("start").returncode == 0


def test_the_sweep_removes_a_two_hop_chain_out_of_tmp_dir(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    outside = tmp_path / "evil.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(outside))
    listener.listen()
    try:
        daemon = start_daemon({"command": tinyapp_command(), "workers": 1}, "--no-start")
        wait_for(daemon.ipc.exists, 10, "the IPC socket")
        daemon.proc.terminate()
        daemon.proc.wait(10)
        (daemon.tmp_dir / "app.5-c0ffee.sock").symlink_to(outside)
        (daemon.tmp_dir / "app.5.sock").symlink_to("app.5-c0ffee.sock")
        again = start_daemon({"command": tinyapp_command(), "workers": 1, "tmp_dir": str(daemon.tmp_dir)})
        again.wait_ready(1)
        assert not os.path.lexists(daemon.tmp_dir / "app.5.sock")
        assert outside.exists()  # nothing outside tmp_dir is touched
    finally:
        listener.close()


def raw_connection(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    return sock


def test_silent_connections_are_dropped_and_never_lock_status_out(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    # Past the daemon's connection limit, never saying hello: status must still get in.
    idle = [raw_connection(daemon.ipc) for _ in range(MAX_CONNECTIONS + 76)]
    try:
        started = time.monotonic()
        assert daemon.status()["workers"]  # answered despite the flood
        assert time.monotonic() - started < 1.0
        assert daemon.cli("restart").returncode == 0
        # Each silent connection is closed: evicted for a newer one, or after the hello deadline.
        for sock in idle:
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()


def test_request_ids_that_cannot_be_echoed_close_only_that_connection(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 3})
    daemon.wait_ready(3)
    hello = protocol.message("hello", {"role": "client"}, id=1)
    for bad_id in ('"\\ud800"', '"' + "x" * 300 + '"', "9" * 5000, str(1 << 60)):
        sock = raw_connection(daemon.ipc)
        sock.sendall(hello)
        sock.sendall(b'{"type": "set-workers", "data": {"count": 1}, "id": ' + bad_id.encode() + b"}\n")
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        sock.close()
        assert b"set-workers" not in received  # closed before anything ran
    status: dict[str, Any] = daemon.wait_ready(3)
    assert len(status["workers"]) == 3  # no operation started, none stopped halfway


def test_a_client_that_stops_reading_is_dropped_and_its_memory_freed(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    rss_before = psutil.Process(daemon.proc.pid).memory_info().rss
    hogs = []
    for _ in range(64):
        sock = raw_connection(daemon.ipc)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(protocol.message("hello", {"role": "client"}, id=0))
        hogs.append(sock)
    request = protocol.message("status", id=1)
    for _ in range(40):  # asks and asks, never reads; in rounds under the in-flight cap
        for sock in hogs:
            with contextlib.suppress(OSError):  # dropped already: what the test waits for
                sock.sendall(request * 20)
        time.sleep(0.01)  # pacing the flood, not waiting for anything
    try:
        daemon.wait_log(r"does not read its replies; dropping the connection")
        assert daemon.status()["daemon"]["state"] == "running"
        rss = psutil.Process(daemon.proc.pid).memory_info().rss
        assert rss - rss_before < 100 << 20, (rss_before >> 20, rss >> 20)
    finally:
        for sock in hogs:
            sock.close()


def test_the_ipc_socket_and_worker_sockets_keep_their_modes(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1, "socket_mode": 0o660})
    worker = daemon.wait_ready(1)["workers"][0]
    assert stat.S_IMODE(os.lstat(daemon.ipc).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(worker["socket"]).st_mode) == 0o660


def refusal(tmp_path: Path, tmp_dir: Path) -> str:
    config = write_config(tmp_path / "sockherd.toml", {"command": ["true"], "tmp_dir": str(tmp_dir)})
    result = run_daemon_once(config)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_a_tmp_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))
    link = Path(tempfile.mktemp(prefix="sh-", dir="/tmp"))
    link.symlink_to(real)
    try:
        assert "is a symlink, which whoever owns it could repoint" in refusal(tmp_path, link)
        assert list(real.iterdir()) == []  # nothing was created through it
    finally:
        link.unlink()
        real.rmdir()


def test_a_group_writable_tmp_dir_is_refused(tmp_path: Path) -> None:
    tmp_dir = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))
    try:
        tmp_dir.chmod(0o2770)
        assert "writable by its group (mode 2770)" in refusal(tmp_path, tmp_dir)
    finally:
        tmp_dir.rmdir()


@pytest.mark.parametrize("danger", ["owned by another uid", "group-writable, not sticky"])
def test_a_tmp_dir_under_a_directory_others_control_is_refused(tmp_path: Path, danger: str) -> None:
    parent = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))
    try:
        if danger == "owned by another uid":
            os.chown(parent, 12345, 12345)  # whoever that is could rename tmp_dir away
            expected = f"{parent} above it belongs to uid 12345"
        else:
            parent.chmod(0o775)
            expected = f"{parent} above it is writable by others (mode 775, not sticky)"
        assert expected in refusal(tmp_path, parent / "run")
    finally:
        shutil.rmtree(parent)


def test_a_redirected_published_symlink_is_put_back(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    worker = daemon.wait_ready(1)["workers"][0]
    thief = tmp_path / "thief.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(thief))
    listener.listen()
    try:
        link = daemon.tmp_dir / "app.0.sock"
        planted = daemon.tmp_dir / ".planted"
        planted.symlink_to(thief)
        mark = daemon.mark()
        os.rename(planted, link)  # what a member of a group-writable tmp_dir could do
        daemon.wait_log(
            r"app\.0\.sock points at .*thief\.sock.*: something else changed it; putting it back", start=mark
        )
        wait_for(lambda: os.readlink(link) == Path(worker["socket"]).name, 5, "the symlink to be put back")
    finally:
        listener.close()


def test_a_tmp_dir_replaced_under_the_daemon_is_never_published_into(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    moved = daemon.tmp_dir.with_name(daemon.tmp_dir.name + ".moved")
    os.rename(daemon.tmp_dir, moved)  # renamed away, and another directory put in its place
    daemon.tmp_dir.mkdir(mode=0o750)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sockherd", "restart", "-i", str(moved / "sockherd.ipc")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert "is no longer the directory this daemon checked at start" in result.stderr
        assert list(daemon.tmp_dir.iterdir()) == []  # nothing published into the impostor
    finally:
        daemon.tmp_dir.rmdir()
        os.rename(moved, daemon.tmp_dir)
