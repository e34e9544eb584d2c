"""A daemon started after another died takes its workers over, and only its workers.

Real daemons, real workers; the first daemon is SIGKILLed (no chance to clean up), the
second finds the state file and adopts what still runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import DaemonFactory
from support.daemon import RunningDaemon, tinyapp_command, wait_for


def managed_pids(daemon: RunningDaemon) -> set[int]:
    return {w["pid"] for w in daemon.status()["workers"]}


def recorded_pids(daemon: RunningDaemon) -> set[int]:
    return {w["pid"] for w in daemon.state_file()["workers"] if w["pid"]}


def successor(start_daemon: DaemonFactory, first: RunningDaemon, settings: dict[str, Any]) -> RunningDaemon:
    """SIGKILL ``first``, then start a daemon on the same tmp_dir and config."""
    first.proc.kill()
    first.proc.wait(10)
    return start_daemon({**settings, "tmp_dir": str(first.tmp_dir)})


def test_a_new_daemon_adopts_the_workers_of_a_killed_one(start_daemon: DaemonFactory) -> None:
    settings: dict[str, Any] = {"command": tinyapp_command("--ready", "library"), "workers": 2, "standby": 1}
    first = start_daemon(settings)
    first.wait_ready(2)
    wait_for(lambda: len(first.status()["workers"]) == 3, 10, "the standby")
    before = {w["id"]: w["pid"] for w in first.status()["workers"]}
    published = first.published_pids()

    second = successor(start_daemon, first, settings)
    second.wait_log(r"adopting from daemon .*: adopted 3 worker\(s\)")
    status = second.wait_ready(2)
    assert {w["id"]: w["pid"] for w in status["workers"]} == before
    assert second.published_pids() == published
    # The library reconnects and says hello again; the new daemon accepts it.
    wait_for(lambda: all(w["integrated"] for w in second.status()["workers"]), 10, "the workers to reconnect")

    # Managed as if spawned here: a crash is replaced (through the standby), ...
    victim = next(w for w in status["workers"] if w["index"] == 0)
    mark = second.mark()
    os.kill(victim["pid"], signal.SIGKILL)
    second.wait_log(r"worker #0 .* crashed \(an unknown status \(adopted", start=mark)
    second.wait_log(r"published worker #0 .* as app\.0\.sock", start=mark)
    # ... a restart replaces every adopted worker, ...
    assert second.cli("restart").returncode == 0
    wait_for(lambda: not (second.worker_pids() & set(before.values())), 10, "the adopted workers to be gone")
    assert second.worker_pids() == managed_pids(second)
    # ... and a stop leaves nothing.
    assert second.cli("stop").returncode == 0
    assert second.worker_pids() == set()


def test_a_worker_that_died_meanwhile_is_replaced_and_its_symlink_fixed(start_daemon: DaemonFactory) -> None:
    settings: dict[str, Any] = {"command": tinyapp_command(), "workers": 2}
    first = start_daemon(settings)
    status = first.wait_ready(2)
    first.proc.kill()
    first.proc.wait(10)
    dead = next(w for w in status["workers"] if w["index"] == 1)
    os.kill(dead["pid"], signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(dead["pid"]) or psutil.Process(dead["pid"]).status() == "zombie", 5, "x")
    second = start_daemon({**settings, "tmp_dir": str(first.tmp_dir)})
    second.wait_log(r"adopted 1 worker\(s\); 1 gone meanwhile")
    status = second.wait_ready(2)
    assert dead["pid"] not in managed_pids(second)
    target = os.readlink(first.tmp_dir / "app.1.sock")
    assert (first.tmp_dir / target).exists() and target != Path(dead["socket"]).name


def test_a_recorded_pid_now_used_by_another_program_is_neither_adopted_nor_signalled(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    settings: dict[str, Any] = {"command": tinyapp_command(), "workers": 1}
    first = start_daemon(settings)
    first.wait_ready(1)
    first.proc.kill()
    first.proc.wait(10)
    for proc in first.worker_processes():
        proc.kill()
    # An unrelated program now has the pid the state file names (we rewrite the record
    # to its pid: the kernel would not hand us the same number on demand).
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        state_path = first.tmp_dir / "sockherd.ipc.state.json"
        state = json.loads(state_path.read_text())
        state["workers"][0]["pid"] = stranger.pid  # its start time stays the worker's
        state_path.write_text(json.dumps(state))
        second = start_daemon({**settings, "tmp_dir": str(first.tmp_dir)})
        second.wait_log(rf"gone meanwhile \(.*pid {stranger.pid}\)")
        second.wait_ready(1)
        assert stranger.pid not in managed_pids(second)
        assert second.cli("terminate").returncode == 0
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("recorded", [True, False], ids=["new-generation-recorded", "maybe-not-recorded-yet"])
def test_sigkill_in_the_middle_of_a_restart_leaves_one_generation(start_daemon: DaemonFactory, recorded: bool) -> None:
    settings: dict[str, Any] = {
        "command": tinyapp_command("--start-delay", "1"),
        "workers": 2,
        "online_timeout": 20,
    }
    first = start_daemon(settings)
    old = {w["pid"] for w in first.wait_ready(2, timeout=30)["workers"]}
    mark = first.mark()
    restart = first.cli_background("restart")
    first.wait_log(r"spawned \(generation 2\)", start=mark)
    wait_for(lambda: len(first.worker_pids()) == 4, 10, "the new generation's processes")
    if recorded:
        wait_for(lambda: len(recorded_pids(first)) == 4, 10, "the state file to name all four")
    second = successor(start_daemon, first, settings)
    restart.communicate(timeout=10)
    # Each new worker recorded by then (adopted, then retired) or not yet (killed as a
    # stray): either way only the published generation is left, all of it managed.
    line = second.wait_log(r"adopting from daemon .*: adopted (\d) worker\(s\)(.*)")
    adopted, rest = int(line[1]), line[2]
    retired = int(m[1]) if (m := re.search(r"(\d) to retire", rest)) else 0
    strays = int(m[1]) if (m := re.search(r"killed (\d) stray", rest)) else 0
    assert adopted - retired == 2 and retired + strays == 2, line.string
    if recorded:
        assert (adopted, retired, strays) == (4, 2, 0), line.string
    wait_for(lambda: second.worker_pids() == old, 15, "only the published generation to be left")
    status = second.wait_ready(2)
    assert {w["pid"] for w in status["workers"]} == old
    assert {w["generation"] for w in status["workers"]} == {1}
    assert second.worker_pids() == managed_pids(second)


def test_a_daemon_that_is_alive_but_silent_is_not_doubled(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    settings: dict[str, Any] = {"command": tinyapp_command(), "workers": 1}
    first = start_daemon(settings)
    first.wait_ready(1)
    first.proc.send_signal(signal.SIGSTOP)  # hung: alive, its IPC socket no longer answers
    try:
        os.unlink(first.ipc)  # as if its socket were gone too
        result = subprocess.run(
            [*first.proc.args[:3], "daemon", "-c", str(first.config_path)],  # type: ignore[index]
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 1
        assert f"(pid {first.proc.pid}) is still running but does not answer" in result.stderr
    finally:
        first.proc.send_signal(signal.SIGCONT)
