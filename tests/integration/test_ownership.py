"""One owner for the herd, seen from outside: real daemon, real processes, real signals.

Nothing the daemon started may outlive the state that owned it: not a wrapper's child
when its leader is SIGKILLed, not a spawn queued when a stop arrives, not a generation
whose restart was interrupted by a quit. The state file names every live worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import psutil

from conftest import DaemonFactory
from support.daemon import REPO, tinyapp_command, wait_for, write_config


def group_of(pid: int) -> set[int]:
    members = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pid and proc.status() != psutil.STATUS_ZOMBIE:
                members.add(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def test_a_sigkilled_leaders_children_die_with_it(start_daemon: DaemonFactory) -> None:
    wrapper = f"sleep 300 & exec {sys.executable} {REPO}/tests/apps/tinyapp.py {{socket}}"
    daemon = start_daemon({"command": ["sh", "-c", wrapper], "ready": "socket", "kill_timeout": 2})
    leader = daemon.wait_ready(1)["workers"][0]["pid"]
    family = group_of(leader)
    assert len(family) == 2, family  # the server and the backgrounded sleep
    os.kill(leader, signal.SIGKILL)
    wait_for(lambda: not group_of(leader), 2, "the leader's whole group to be gone")
    status = daemon.wait_ready(1)
    assert status["workers"][0]["pid"] != leader
    assert daemon.cli("stop").returncode == 0
    wait_for(lambda: not daemon.worker_pids(), 5, "every process to be gone after stop")


def test_a_stop_right_after_a_large_start_leaves_no_process(start_daemon: DaemonFactory) -> None:
    # 96 workers that never report ready: the start is still spawning (the executor
    # queues most of them) when the stop arrives, and every spawn must be undone.
    daemon = start_daemon({"command": ["sleep", "300"], "workers": 96, "online_timeout": 60}, "--no-start")
    wait_for(daemon.ipc.exists, 10, "the IPC socket")
    starter = threading.Thread(target=daemon.cli, args=("start",), daemon=True)
    starter.start()
    daemon.wait_log(r"starting generation 1: 96 worker")
    daemon.wait_log(r"spawned")
    result = daemon.cli("stop")
    assert result.returncode == 0, result.stderr
    starter.join(30)
    assert daemon.worker_pids() == set()
    assert daemon.status()["workers"] == []


def test_sigterm_right_before_a_restart_command_leaves_no_process(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    restart = daemon.cli_background("restart")
    daemon.proc.send_signal(signal.SIGTERM)
    _, err = restart.communicate(timeout=30)
    assert daemon.proc.wait(30) == 0
    # Refused ("shutting down"), interrupted, or too late to connect: whichever it was,
    # no generation is left running.
    assert restart.returncode in (1, 3), err
    assert daemon.worker_pids() == set()


def test_sigterm_in_the_middle_of_a_restart_leaves_no_process_of_either_generation(
    start_daemon: DaemonFactory,
) -> None:
    daemon = start_daemon({"command": tinyapp_command("--start-delay", "1"), "workers": 2, "online_timeout": 20})
    daemon.wait_ready(2, timeout=30)
    mark = daemon.mark()
    restart = daemon.cli_background("restart")
    daemon.wait_log(r"spawned \(generation 2\)", start=mark)
    daemon.proc.send_signal(signal.SIGTERM)
    _, err = restart.communicate(timeout=30)
    assert restart.returncode == 1 and "interrupted" in err, err
    assert daemon.proc.wait(30) == 0
    assert daemon.worker_pids() == set()
    assert not (daemon.tmp_dir / "sockherd.ipc.state.json").exists()  # nothing left to tell


def test_the_state_file_names_every_live_worker(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2, "standby": 1})
    daemon.wait_ready(2)
    wait_for(lambda: len(daemon.status()["workers"]) == 3, 10, "the standby")

    def named() -> set[int]:
        return {w["pid"] for w in daemon.state_file()["workers"]}

    assert named() == daemon.worker_pids()
    state = daemon.state_file()
    assert state["daemon"]["pid"] == daemon.proc.pid and state["desired"]["standby"] == 1
    assert all(w["start_time"] for w in state["workers"])
    assert daemon.cli("restart").returncode == 0
    wait_for(lambda: len(daemon.worker_pids()) == 3, 10, "the old generation to exit")
    wait_for(lambda: named() == daemon.worker_pids(), 2, "the state file to catch up")
    assert daemon.state_file()["generations"]["current"] == 2


def test_status_of_a_dead_daemon_lists_the_workers_still_running(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    pids = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    daemon.proc.kill()
    daemon.proc.wait(10)
    result = daemon.cli("status")
    assert result.returncode == 3
    assert f"daemon not running (pid {daemon.proc.pid} is gone)" in result.stderr
    assert "2 worker(s) it started are still running" in result.stdout
    for pid in pids:
        assert str(pid) in result.stdout
    as_json = json.loads(daemon.cli("status", "--json").stdout)
    assert as_json["daemon"]["state"] == "dead"
    assert {w["pid"] for w in as_json["workers"]} == pids


def test_a_restart_while_a_stop_runs_is_busy_and_nothing_runs_after(start_daemon: DaemonFactory) -> None:
    # A worker that ignores SIGTERM keeps the stop busy for its whole ladder (0.6 s).
    daemon = start_daemon(
        {"command": tinyapp_command("--ignore-term"), "workers": 1, "shutdown_timeout": 0.3, "kill_timeout": 0.3}
    )
    daemon.wait_ready(1)
    mark = daemon.mark()
    stop = daemon.cli_background("stop")
    daemon.wait_log(r"stopping: sent SIGTERM", start=mark)
    restart = daemon.cli("restart")
    assert restart.returncode == 1 and "busy: a stop is in progress" in restart.stderr, restart.stderr
    stop.communicate(timeout=10)
    assert stop.returncode == 0
    assert daemon.worker_pids() == set() and daemon.status()["daemon"]["state"] == "stopped"


def test_a_reload_while_stopped_is_what_the_next_start_runs(start_daemon: DaemonFactory) -> None:
    settings: dict[str, Any] = {"command": tinyapp_command(), "workers": 1}
    daemon = start_daemon(settings)
    daemon.wait_ready(1)
    assert daemon.cli("stop").returncode == 0
    write_config(daemon.config_path, {**settings, "tmp_dir": str(daemon.tmp_dir), "workers": 3, "standby": 1})
    reload = daemon.cli("reload")
    assert reload.returncode == 0 and "`sockherd start` runs the new config" in reload.stdout, reload.stdout
    assert daemon.worker_pids() == set()
    assert daemon.cli("start").returncode == 0
    status = daemon.wait_ready(3)
    assert status["daemon"]["workers"] == 3 and status["daemon"]["standby"] == 1
