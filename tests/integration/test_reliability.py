"""Hostile and broken surroundings: tmp_dir trouble, crash loops, stubborn workers.

Each case must end in a clear error or a safe recovery, never in a traceback, a
deletion outside tmp_dir, or a busy daemon.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import DaemonFactory
from support.daemon import REPO, run_daemon_once, short_tmp_dir, tinyapp_command, wait_for, write_config


@pytest.mark.parametrize("plant", ["symlink", "file", "directory"])
def test_something_planted_at_the_ipc_path_is_refused_not_replaced(tmp_path: Path, plant: str) -> None:
    tmp_dir = short_tmp_dir()
    try:
        target = tmp_path / "precious"
        target.write_text("keep")
        ipc = tmp_dir / "sockherd.ipc"
        if plant == "symlink":
            ipc.symlink_to(target)
        elif plant == "file":
            ipc.write_text("not a socket")
        else:
            ipc.mkdir()
        config = write_config(tmp_path / "sockherd.toml", {"command": tinyapp_command(), "tmp_dir": str(tmp_dir)})
        result = run_daemon_once(config)
        assert result.returncode == 1
        assert f"{ipc} exists and is not a socket; refusing to touch it" in result.stderr
        assert "Traceback" not in result.stderr
        assert target.read_text() == "keep" and (ipc.is_symlink() or ipc.exists())
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root's capabilities to make modes bind")
@pytest.mark.parametrize("exists", [False, True], ids=["cannot-create", "not-writable"])
def test_a_tmp_dir_the_daemon_cannot_write_is_a_clear_error(tmp_path: Path, exists: bool) -> None:
    parent = short_tmp_dir()
    try:
        tmp_dir = parent / "app"
        if exists:
            tmp_dir.mkdir(mode=0o550)
        else:
            os.chmod(parent, 0o550)
        config = write_config(tmp_path / "sockherd.toml", {"command": tinyapp_command(), "tmp_dir": str(tmp_dir)})
        result = run_daemon_once(config, without_dac_override=True)
        assert result.returncode == 1, result
        expected = "not writable by this user" if exists else "cannot create it: Permission denied"
        assert f"tmp_dir {tmp_dir}: {expected}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        os.chmod(parent, 0o700)
        shutil.rmtree(parent, ignore_errors=True)


def test_a_world_writable_tmp_dir_is_refused(tmp_path: Path) -> None:
    tmp_dir = short_tmp_dir()
    try:
        os.chmod(tmp_dir, 0o777)
        config = write_config(tmp_path / "sockherd.toml", {"command": tinyapp_command(), "tmp_dir": str(tmp_dir)})
        result = run_daemon_once(config)
        assert result.returncode == 1
        assert "writable by every user" in result.stderr
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def test_a_crash_loop_backs_off_with_the_daemon_nearly_idle(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    marker = tmp_path / "broken"
    daemon = start_daemon({"command": tinyapp_command("--fail-if-file", str(marker)), "workers": 1})
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    marker.touch()
    os.kill(pid, signal.SIGKILL)
    daemon.wait_log(r"crash loop \(5 in a row\); next attempt in 0\.8s", timeout=20)
    process = psutil.Process(daemon.proc.pid)
    before, started = process.cpu_times(), time.monotonic()
    daemon.wait_log(r"crash loop \(7 in a row\); next attempt in 3\.2s", timeout=20)
    cpu = sum(process.cpu_times()[:2]) - sum(before[:2])
    share = cpu / (time.monotonic() - started)
    assert share < 0.05, f"the daemon used {share:.1%} of a core while its worker crash-looped"
    slot = daemon.status()["slots"][0]
    assert slot["crash_loop"] >= 7 and slot["next_attempt_at"] is not None
    assert "crash loop (7 in a row), next attempt in" in daemon.cli("status").stdout
    marker.unlink()  # the fix is deployed: the loop ends on the next attempt
    daemon.wait_log(r"published worker #0", timeout=20)


def test_terminate_leaves_no_process_behind_even_from_a_wrapper_script(start_daemon: DaemonFactory) -> None:
    # `sh -c` without exec: the shell is the worker, the server is its child, and the
    # shell ignores SIGTERM while it waits. The process group takes both down.
    script = f"trap '' TERM; {sys.executable} {REPO}/tests/apps/tinyapp.py {{socket}} --ignore-term; wait"
    daemon = start_daemon(
        {"command": ["sh", "-c", script], "ready": "socket", "shutdown_timeout": 0.3, "kill_timeout": 0.3}
    )
    daemon.wait_ready(1, timeout=20)
    shell = daemon.status()["workers"][0]["pid"]
    family = [shell, *(p.pid for p in psutil.Process(shell).children(recursive=True))]
    assert len(family) >= 2
    assert daemon.cli("terminate").returncode == 0
    assert daemon.proc.wait(20) == 0
    wait_for(lambda: not any(psutil.pid_exists(p) for p in family), 5, "the whole process group to be gone")
