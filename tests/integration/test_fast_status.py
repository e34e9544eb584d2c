"""The fast path against a real daemon: the full CLI's output, without the full CLI's imports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import DaemonFactory
from support.cli import fast_path_imports, sockherd_argv
from support.daemon import RunningDaemon, tinyapp_command


def run(daemon: RunningDaemon, *args: str, full: bool = False) -> subprocess.CompletedProcess[str]:
    """``sockherd ARGS -c CONFIG`` through the console script's path, or straight through the full CLI."""
    return subprocess.run(
        sockherd_argv(*args, "-c", str(daemon.config_path), full=full),
        cwd=daemon.workdir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def steady(text: str) -> str:
    """Uptimes, CPU and memory figures move between two calls."""
    return re.sub(r"\d+(\.\d+)?", "N", text)


def test_status_and_health_answer_as_the_full_cli_does(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    for args in (["status"], ["status", "--json"], ["health"]):
        fast, full = run(daemon, *args), run(daemon, *args, full=True)
        assert fast.returncode == full.returncode == 0, (fast.stderr, full.stderr)
        assert steady(fast.stdout) == steady(full.stdout), args
        assert fast.stderr == full.stderr == ""
    status = json.loads(run(daemon, "status", "--json").stdout)
    assert [w["index"] for w in status["workers"]] == [0, 1]


def test_an_unhealthy_herd_is_reported_as_the_full_cli_does(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    assert daemon.cli("stop").returncode == 0
    fast, full = run(daemon, "health"), run(daemon, "health", full=True)
    assert fast.returncode == full.returncode == 1
    assert fast.stdout == full.stdout
    assert fast.stdout.startswith("unhealthy: the daemon is stopped"), fast.stdout


def test_the_fast_path_imports_none_of_the_full_clis_modules(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    assert fast_path_imports("status", "--json", "-c", str(daemon.config_path)) == "0 []"


def test_without_a_daemon_the_full_cli_answers(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    daemon.stop()
    fast, full = run(daemon, "status"), run(daemon, "status", full=True)
    assert fast.returncode == full.returncode == 3
    assert fast.stdout == full.stdout and fast.stderr == full.stderr
    assert "no sockherd daemon" in fast.stderr + fast.stdout
