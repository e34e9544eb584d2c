"""What trips a newcomer: every error says what to do next."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import DaemonFactory
from support.daemon import tinyapp_command, wait_for, write_config


def test_a_server_that_never_reports_ready_gets_the_ready_socket_hint(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command("--ready", "none"), "online_timeout": 1}, "--no-start")
    wait_for(daemon.ipc.exists, 10, "the IPC socket")
    result = daemon.cli("start")
    assert result.returncode == 1
    assert "did not report ready within online_timeout (1.0s)" in result.stderr
    assert 'its socket accepts connections but it never reported ready: set `ready = "socket"`' in result.stderr
    assert "see the daemon's log or journal" in result.stderr  # output is not in a file


def test_start_after_fixing_the_config_runs_the_fixed_config(start_daemon: DaemonFactory) -> None:
    broken: dict[str, Any] = {"command": [sys.executable, "-c", "raise SystemExit(3)"], "workers": 2}
    daemon = start_daemon(broken)
    daemon.wait_log(r"fix the app, then run `sockherd start`")
    write_config(daemon.config_path, {**broken, "command": tinyapp_command(), "tmp_dir": str(daemon.tmp_dir)})
    result = daemon.cli("start")  # no reload needed
    assert result.returncode == 0, result.stderr
    assert "the config file changed since it was loaded (command): starting with it" in result.stderr
    assert len(daemon.wait_ready(2)["workers"]) == 2


def test_no_config_suggests_init(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sockherd", "status"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "run `sockherd init` to write one, or pass -c PATH" in result.stderr
