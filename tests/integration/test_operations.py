"""Rolling deploys, reload, the dev server and the small commands, with real processes."""

from __future__ import annotations

import json
import signal
import sys

import psutil

from conftest import DaemonFactory
from support.daemon import EXAMPLE, tinyapp_command, write_config
from support.http import LoadGenerator, tcp_get, unix_get


def test_rolling_restart_replaces_one_slot_at_a_time(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 3, "strategy": "rolling", "linger": 0.05})
    old = {w["index"]: w["pid"] for w in daemon.wait_ready(3)["workers"]}
    mark = daemon.mark()
    result = daemon.cli("restart")
    assert result.returncode == 0, result.stderr
    events = [line for line in daemon.lines[mark:] if "published worker" in line or "stopping: sent" in line]
    # slot 0 is published and its old worker stopped before slot 1's successor is published
    order = [("published" if "published" in line else "stopped") for line in events]
    assert order == ["published", "stopped"] * 3, events
    new = {w["index"]: w["pid"] for w in daemon.status()["workers"]}
    assert set(new) == {0, 1, 2} and not set(new.values()) & set(old.values())


def test_failed_rolling_deploy_rolls_back_to_the_old_version(start_daemon: DaemonFactory) -> None:
    settings = {"command": tinyapp_command("--fail-if-env", "BREAK"), "workers": 2, "linger": 0.05}
    daemon = start_daemon({**settings, "strategy": "rolling"})
    old = {w["index"]: w["pid"] for w in daemon.wait_ready(2)["workers"]}
    # The new release starts fine in slot 0 and fails in slot 1, mid-roll.
    new_settings = {**settings, "strategy": "rolling", "tmp_dir": str(daemon.tmp_dir), "environment": {"BREAK": "1"}}
    write_config(daemon.config_path, new_settings)
    result = daemon.cli("reload")
    assert result.returncode == 1
    assert "before it reported ready" in result.stderr
    assert "rolled slot 0 back" in daemon.log
    status = daemon.status()
    assert status["daemon"]["generation"] == 1, "the old generation is current again"
    workers = {w["index"]: w for w in status["workers"]}
    assert set(workers) == {0, 1} and all(w["generation"] == 1 and w["published"] for w in workers.values())
    assert workers[1]["pid"] == old[1], "slot 1 was never touched"
    assert "BREAK" not in psutil.Process(workers[0]["pid"]).environ(), "slot 0 runs the old spec again"
    assert "BREAK" not in daemon.call("config")["environment"], "the failed config did not become the running one"
    for index in (0, 1):
        assert unix_get(str(daemon.tmp_dir / f"app.{index}.sock")).status == 200


def test_reload_applies_a_changed_config_and_refuses_a_broken_one(start_daemon: DaemonFactory) -> None:
    settings = {"command": tinyapp_command(), "workers": 1, "linger": 0.05}
    daemon = start_daemon(settings)
    first = daemon.wait_ready(1)["workers"][0]["pid"]
    write_config(daemon.config_path, {**settings, "tmp_dir": str(daemon.tmp_dir), "environment": {"RELEASE": "2"}})
    result = daemon.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "environment" in result.stdout
    worker = daemon.status()["workers"][0]
    assert worker["pid"] != first
    assert psutil.Process(worker["pid"]).environ()["RELEASE"] == "2"
    daemon.config_path.write_text(daemon.config_path.read_text() + "workers = [oops\n")
    result = daemon.cli("reload")
    assert result.returncode == 2
    assert "nothing was sent: the daemon keeps running with its current configuration" in result.stderr
    result = daemon.cli("reload", ipc=True)
    assert result.returncode == 1
    assert "reload refused, the running configuration stays" in result.stderr
    assert "sockherd.toml" in result.stderr and "line" in result.stderr
    assert daemon.status()["workers"][0]["pid"] == worker["pid"]
    assert daemon.call("config")["environment"] == {"RELEASE": "2"}


def test_sighup_reload_with_a_broken_config_keeps_running(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command()})
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    daemon.config_path.write_text(daemon.config_path.read_text() + "wokers = 3\n")
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(
        r"reload failed, the running configuration stays: .*unknown key 'wokers' \(did you mean", start=mark
    )
    assert daemon.published_pids() == {pid}


def test_dev_server_forwards_round_robin_and_survives_restarts(start_daemon: DaemonFactory) -> None:
    # The dev server forwards bytes, so a client's keep-alive connection stays with one
    # worker: a lossless restart needs the worker's drain (Connection: close), as the
    # example app's runner does.
    example = {"command": [sys.executable, "-m", "sockherd.uvicorn", "hello:app"], "cwd": str(EXAMPLE)}
    daemon = start_daemon({**example, "workers": 2}, "--dev-server=0")
    status = daemon.wait_ready(2, timeout=30)
    port = status["daemon"]["dev_server"]
    pids = {tcp_get(port).pid for _ in range(4)}
    assert pids == {w["pid"] for w in status["workers"]}
    with LoadGenerator(port, concurrency=4, post_every=3) as load:
        load.wait_requests(100)
        for _ in range(2):
            assert daemon.cli("restart").returncode == 0
        load.wait_requests(100)
    result = load.stop()
    assert result.failures == []


def test_start_when_running_and_config_command(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    result = daemon.cli("start")
    assert result.returncode == 0 and "already running" in result.stdout
    config = json.loads(daemon.cli("config").stdout)
    assert config["workers"] == 1 and config["tmp_dir"] == str(daemon.tmp_dir)


def test_stop_then_start(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2, "linger": 0.05})
    pids = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    assert daemon.cli("stop").returncode == 0
    assert not (daemon.tmp_dir / "app.0.sock").exists(), "stop unpublishes"
    assert not any(psutil.pid_exists(p) for p in pids)
    assert daemon.status()["daemon"]["state"] == "stopped"
    assert daemon.cli("start").returncode == 0
    assert len(daemon.published_pids()) == 2
