"""What an operator reads: per-worker metrics, the low-backlog warning, `health`, and the
daemon as a container's PID 1."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import psutil

from conftest import DaemonFactory
from support.daemon import REPO, tinyapp_command, wait_for, write_config

APPS = REPO / "tests" / "apps"


def test_status_json_has_metrics_for_every_worker(start_daemon: DaemonFactory) -> None:
    runner = [sys.executable, "-m", "sockherd.uvicorn", "asgi_app:app"]
    daemon = start_daemon({"command": runner, "cwd": str(APPS), "workers": 2, "backlog": 512})
    status = daemon.wait_ready(2)
    assert status["daemon"]["rss"] > 0
    for row in status["workers"]:
        assert row["rss"] > 0 and row["cpu"] >= 0 and 0 < row["uptime"] < 60
        assert (row["queued"], row["backlog"]) == (0, 512)
        assert row["warning"] is None


def test_a_worker_listening_with_a_tiny_backlog_is_flagged_with_the_fix(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon(
        {"command": [sys.executable, "small_backlog.py"], "cwd": str(APPS), "ready": "socket", "workers": 1}
    )
    status = daemon.wait_ready(1)
    (row,) = status["workers"]
    assert row["backlog"] == 5
    assert "listens with a backlog of 5, far below backlog = " in row["warning"]
    assert "uvicorn --backlog $SOCKHERD_BACKLOG" in row["warning"]
    daemon.wait_log(r"WARNING worker #0 .* listens with a backlog of 5")


def test_health_is_nonzero_until_a_restart_has_published_its_generation(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command("--start-delay", "1.5"), "workers": 2})
    daemon.wait_ready(2, timeout=30)
    healthy = daemon.cli("health")
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "healthy")
    restart = daemon.cli_background("restart")
    wait_for(lambda: daemon.status()["daemon"]["operation"] == "restart", 10, "the restart to begin")
    during = daemon.cli("health")
    assert during.returncode == 1 and "unhealthy: a restart is in progress" in during.stdout
    restart.communicate(timeout=60)
    assert restart.returncode == 0
    assert daemon.cli("health").returncode == 0
    daemon.cli("stop")
    stopped = daemon.cli("health")
    assert stopped.returncode == 1 and "the daemon is stopped" in stopped.stdout


def test_as_pid_1_the_daemon_reaps_orphaned_grandchildren(tmp_path: Path, tmp_dir: Path) -> None:
    """In a fresh PID namespace the daemon is init: orphans of its workers come to it."""
    orphan_maker = f"(sleep 1 &); exec {sys.executable} {APPS / 'tinyapp.py'} {{socket}}"
    config = write_config(
        tmp_path / "sockherd.toml", {"command": ["sh", "-c", orphan_maker], "tmp_dir": str(tmp_dir), "workers": 2}
    )
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "sockherd", "daemon", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        init = wait_for(lambda: next(iter(psutil.Process(unshare.pid).children()), None), 10, "the namespace's init")

        def orphans() -> list[psutil.Process]:
            return [p for p in init.children() if p.name() == "sleep"]

        wait_for(lambda: len(orphans()) == 2, 10, "the workers' orphans, reparented to the daemon")
        # They exit after a second; reaped, they leave init's children. Zombies would stay.
        wait_for(lambda: not orphans(), 10, "the orphans to be reaped")
    finally:
        init_pid = next((p.pid for p in psutil.Process(unshare.pid).children()), None)
        if init_pid is not None:
            psutil.Process(init_pid).terminate()  # the daemon, as the namespace's init
        unshare.communicate(timeout=30)


def test_status_watch_redraws_in_place_on_a_terminal_and_quits_cleanly(start_daemon: DaemonFactory) -> None:
    import os
    import pty
    import re

    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    argv = [sys.executable, "-m", "sockherd", "status", "--watch", "0.2", "-c", str(daemon.config_path)]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a pseudo-terminal, as in a user's terminal
        os.execv(sys.executable, argv)
    screen = b""
    try:
        while screen.count(b"\x1b[H") < 3:  # three rounds drawn
            screen += os.read(fd, 65536)
        os.write(fd, b"\x03")  # Ctrl-C, through the terminal's line discipline: SIGINT
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    rounds = screen.split(b"\x1b[H")[1:]
    last = rounds[-2].decode()  # a complete round
    assert "ID" in last and "RSS" in last and "CPU" in last and "QUEUE" in last
    assert len(re.findall(r"\d+\.\dMiB", last)) == 3  # the daemon's and each worker's memory, in human units
    assert "\x1b[32m" in last  # online, in colour on a terminal
    assert last.rstrip().endswith("\x1b[J")  # what the previous round left below is cleared


def test_status_watch_without_a_terminal_prints_plain_tables(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    watching = daemon.cli_background("status", "--watch", "0.1")
    try:
        assert watching.stdout is not None
        lines = [watching.stdout.readline() for _ in range(8)]
    finally:
        watching.terminate()
        watching.communicate(timeout=10)
    text = "".join(lines)
    assert "\x1b" not in text  # no escapes into a pipe
    assert text.count("ID  ") >= 2


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    """What ``argv`` writes to a pseudo-terminal, until it exits."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a pseudo-terminal, as in a user's terminal
        os.execve(argv[0], argv, env)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child exited and the terminal closed
                break
            if not chunk:
                break
            screen += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, screen
    return screen.decode()


def test_plain_status_lists_memory_cpu_and_warnings_in_colour_only_on_a_terminal(
    start_daemon: DaemonFactory,
) -> None:
    daemon = start_daemon(
        {"command": [sys.executable, "small_backlog.py"], "cwd": str(APPS), "ready": "socket", "workers": 1}
    )
    daemon.wait_ready(1)
    piped = daemon.cli("status")
    assert piped.returncode == 0, piped.stderr
    assert "\x1b" not in piped.stdout  # no escapes into a pipe
    _, header, row, warning = piped.stdout.splitlines()
    assert header.split() == ["ID", "PID", "INDEX", "STATE", "GEN", "UPTIME", "RESTARTS", "SYMLINK", "RSS", "CPU"]
    assert re.fullmatch(r"\d+\.\dMiB", row.split()[-2]) and re.fullmatch(r"\d+\.\d%", row.split()[-1])
    assert warning.startswith("! worker #0 (") and "listens with a backlog of 5, far below backlog" in warning

    argv = [sys.executable, "-m", "sockherd", "status", "-c", str(daemon.config_path)]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    screen = _on_a_terminal(argv, env)
    assert "\x1b[32monline\x1b[0m" in screen and "\x1b[33m! worker #0 (" in screen  # colour on a terminal
    assert "\x1b" not in _on_a_terminal(argv, {**env, "NO_COLOR": "1"})
