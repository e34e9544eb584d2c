"""`restart --upgrade`: the daemon re-executes a newer installed sockherd in place.

The daemon runs from a copy of the source with its own dist-info (what `pip install`
leaves); the test "installs" another version by bumping it while the daemon runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import DaemonFactory
from support.daemon import bump, installable_copy, tinyapp_command, wait_for

SETTINGS: dict[str, Any] = {"command": tinyapp_command("--ready", "library"), "workers": 2, "standby": 1}


def test_upgrade_re_executes_in_place_and_restarts_the_workers(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    site = installable_copy(tmp_path / "site", "0.1.0")
    # sd_notify readiness: the new generation reports through the notify socket that
    # crossed the exec.
    daemon = start_daemon({**SETTINGS, "command": tinyapp_command()}, env={"PYTHONPATH": str(site)})
    before = daemon.wait_ready(2)
    assert before["daemon"]["version"] == "0.1.0"
    old = {w["pid"] for w in before["workers"]}
    bump(site, "0.2.0")
    mark = daemon.mark()
    result = daemon.cli("restart", "--upgrade")
    assert result.returncode == 0, result.stderr
    assert "upgrading the daemon in place: sockherd 0.1.0 -> 0.2.0" in result.stderr
    assert "daemon upgraded in place from 0.1.0 to 0.2.0" in result.stdout
    after = daemon.wait_ready(2)
    assert after["daemon"]["pid"] == before["daemon"]["pid"] == daemon.proc.pid
    assert after["daemon"]["version"] == "0.2.0"
    assert not old & {w["pid"] for w in after["workers"]}
    wait_for(lambda: len(daemon.status()["workers"]) == 3, 5, "the standby")
    assert all(w["generation"] == 2 for w in daemon.status()["workers"])
    upgraded = daemon.wait_log(r"upgraded in place from sockherd 0.1.0 to 0.2.0", start=mark)
    assert upgraded
    daemon.wait_log(r"worker #0 .* reported ready via sd_notify", start=daemon.lines.index(upgraded.string))


def test_upgrade_with_the_same_version_reloads_and_restarts(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({**SETTINGS, "standby": 0})
    old = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    result = daemon.cli("restart", "--upgrade")
    assert result.returncode == 0, result.stderr
    assert "is the installed version: reloading the config and restarting" in result.stderr
    assert not old & daemon.published_pids()


def test_a_new_image_that_fails_leaves_the_workers_serving_for_the_next_daemon(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    site = installable_copy(tmp_path / "site", "0.1.0")
    daemon = start_daemon({**SETTINGS, "standby": 0}, env={"PYTHONPATH": str(site)})
    pids = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    broken = site / "sockherd" / "daemon" / "adoption.py"
    good = broken.read_text()
    broken.write_text("this is not python\n")
    bump(site, "0.2.0")
    result = daemon.cli("restart", "--upgrade")
    assert result.returncode != 0
    assert daemon.proc.wait(10) != 0  # the new image could not start
    assert {p.pid for p in daemon.worker_processes()} == pids  # still running, still serving
    # The service manager starts the daemon again (Restart=always); fixed, it adopts them.
    broken.write_text(good)
    again = start_daemon({**SETTINGS, "standby": 0, "tmp_dir": str(daemon.tmp_dir)}, env={"PYTHONPATH": str(site)})
    again.wait_log(r"adopted 2 worker\(s\)")
    assert {w["pid"] for w in again.wait_ready(2)["workers"]} == pids
