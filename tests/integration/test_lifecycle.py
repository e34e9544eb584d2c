"""Standbys, broken workers, scaling, reload's smallest actions, recycling: real processes."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from conftest import DaemonFactory
from support.daemon import RunningDaemon, tinyapp_command, wait_for, write_config
from support.http import unix_get


def standbys(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in status["workers"] if w["index"] is None]


def published(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {w["index"]: w for w in status["workers"] if w["published"]}


def wait_standbys(daemon: RunningDaemon, count: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        status = daemon.status()
        ok = [w for w in standbys(status) if w["state"] == "suspended"]
        return status if len(ok) == count else None

    result: dict[str, Any] = wait_for(ready, 20, f"{count} ready standby(s)")
    return result


def test_standbys_start_suspended_and_unpublished(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2, "standby": 1})
    daemon.wait_ready(2)
    status = wait_standbys(daemon, 1)
    standby = standbys(status)[0]
    assert not standby["published"] and standby["suspended"]
    env = psutil.Process(standby["pid"]).environ()
    assert env["SOCKHERD_INDEX"] == "standby" and env["SOCKHERD_SUSPENDED"] == "1"
    assert "standby" in daemon.cli("status").stdout


def test_a_dead_worker_is_replaced_by_its_standby_in_milliseconds(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2, "standby": 1})
    daemon.wait_ready(2)
    status = wait_standbys(daemon, 1)
    victim, standby = published(status)[0], standbys(status)[0]
    link = daemon.tmp_dir / "app.0.sock"
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: os.readlink(link) == os.path.basename(standby["socket"]), 5, "the standby to be published", 0.001)
    failover = time.monotonic() - killed
    assert unix_get(str(link)).pid == standby["pid"]
    assert failover < 1.0  # the benchmark measures the distribution; this only catches a respawn
    after = wait_standbys(daemon, 1)
    promoted = published(after)[0]
    assert promoted["pid"] == standby["pid"] and promoted["state"] == "online" and promoted["restarts"] == 1
    assert standbys(after)[0]["pid"] != standby["pid"], "a new standby was started"


def test_a_broken_worker_keeps_serving_until_its_replacement_is_published(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1, "linger": 0.05})
    old = daemon.wait_ready(1)["workers"][0]
    mark = daemon.mark()
    assert unix_get(str(daemon.tmp_dir / "app.0.sock"), "/broken").pid == old["pid"]
    daemon.wait_log(r"reports itself broken: asked to by /broken", start=mark)
    daemon.wait_log(rf"pid {old['pid']}\) exited", start=mark)
    lines = daemon.lines[mark:]
    published_at = next(i for i, line in enumerate(lines) if "published worker #0" in line)
    stopped_at = next(i for i, line in enumerate(lines) if f"pid {old['pid']}) stopping" in line)
    assert published_at < stopped_at, "the successor is published before the broken worker stops"
    new = daemon.status()["workers"][0]
    assert new["pid"] != old["pid"] and new["state"] == "online"


def test_a_broken_worker_is_replaced_through_a_standby(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1, "standby": 1, "linger": 0.05})
    daemon.wait_ready(1)
    status = wait_standbys(daemon, 1)
    old, standby = published(status)[0], standbys(status)[0]
    mark = daemon.mark()
    unix_get(str(daemon.tmp_dir / "app.0.sock"), "/broken")
    daemon.wait_log(rf"pid {old['pid']}\) exited", start=mark)
    assert published(daemon.status())[0]["pid"] == standby["pid"]
    wait_standbys(daemon, 1)


def test_set_workers_scales_and_scaling_down_unpublishes_first(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1, "linger": 0.05})
    first = daemon.wait_ready(1)["workers"][0]["pid"]
    result = daemon.cli("set-workers", "3")
    assert result.returncode == 0, result.stderr
    status = daemon.status()
    assert sorted(published(status)) == [0, 1, 2] and published(status)[0]["pid"] == first
    assert status["daemon"]["workers"] == 3
    mark = daemon.mark()
    assert daemon.cli("set-workers", "1").returncode == 0
    assert not (daemon.tmp_dir / "app.1.sock").exists() and not (daemon.tmp_dir / "app.2.sock").exists()
    assert list(published(daemon.status())) == [0]
    assert published(daemon.status())[0]["pid"] == first
    lines = daemon.lines[mark:]
    unpublished_at = next(i for i, line in enumerate(lines) if "unpublished 2 slot(s)" in line)
    assert all(i > unpublished_at for i, line in enumerate(lines) if "stopping: sent" in line)


def test_sigttin_and_sigttou_scale_by_one(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1, "linger": 0.05})
    daemon.wait_ready(1)
    daemon.proc.send_signal(signal.SIGTTIN)
    daemon.wait_ready(2)
    daemon.proc.send_signal(signal.SIGTTOU)
    wait_for(lambda: len(published(daemon.status())) == 1, 10, "one worker")


def test_set_standby(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    assert daemon.cli("set-standby", "2").returncode == 0
    assert len([w for w in standbys(daemon.status()) if w["state"] == "suspended"]) == 2
    assert daemon.cli("set-standby", "0").returncode == 0
    assert standbys(daemon.status()) == []


def test_reload_scales_without_restarting_and_ends_overrides(start_daemon: DaemonFactory) -> None:
    settings: dict[str, Any] = {"command": tinyapp_command(), "workers": 2, "linger": 0.05}
    daemon = start_daemon(settings)
    pids = {i: w["pid"] for i, w in published(daemon.wait_ready(2)).items()}
    assert daemon.cli("set-workers", "1").returncode == 0
    write_config(daemon.config_path, {**settings, "tmp_dir": str(daemon.tmp_dir), "workers": 3, "standby": 1})
    result = daemon.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "scale to 3 worker(s)" in result.stdout
    status = wait_standbys(daemon, 1)
    assert published(status)[0]["pid"] == pids[0], "a count change scales; it does not restart"
    assert sorted(published(status)) == [0, 1, 2]


def test_reload_of_timeouts_applies_in_place(start_daemon: DaemonFactory) -> None:
    # A worker that ignores SIGTERM: its stop takes the whole ladder, so the timeouts
    # the ladder used are visible (defaults: 10 s + 5 s).
    settings: dict[str, Any] = {"command": tinyapp_command("--ignore-term"), "workers": 1}
    daemon = start_daemon(settings)
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    write_config(
        daemon.config_path,
        {**settings, "tmp_dir": str(daemon.tmp_dir), "shutdown_timeout": 0.3, "kill_timeout": 0.4, "name": "shop"},
    )
    result = daemon.cli("reload")
    assert result.returncode == 0 and "shutdown_timeout" in result.stdout
    assert daemon.status()["workers"][0]["pid"] == pid  # applied in place, no restart
    assert "sockherd daemon: shop" in " ".join(psutil.Process(daemon.proc.pid).cmdline())
    mark = daemon.mark()
    assert daemon.cli("stop", timeout=8).returncode == 0
    daemon.wait_log(rf"pid {pid}\) still running 0.3s after SIGTERM", start=mark)
    daemon.wait_log(rf"pid {pid}\) ignored SIGTERM for 0.4s: sending SIGKILL", start=mark)


def test_max_memory_recycles_without_a_capacity_dip(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2, "max_memory": "80MiB", "linger": 0.05})
    before = published(daemon.wait_ready(2))
    mark = daemon.mark()
    unix_get(str(daemon.tmp_dir / "app.0.sock"), "/grow?mb=100")
    daemon.wait_log(rf"pid {before[0]['pid']}\) exited", start=mark, timeout=20)
    lines = daemon.lines[mark:]
    assert any(re.search(r"replacing worker #0 .* over max_memory", line) for line in lines)
    after = published(daemon.status())
    assert after[0]["pid"] != before[0]["pid"] and after[1]["pid"] == before[1]["pid"]
    published_at = next(i for i, line in enumerate(lines) if "published worker #0" in line)
    stopped_at = next(i for i, line in enumerate(lines) if "stopping: sent" in line)
    assert published_at < stopped_at, "the successor is published first: never fewer than `workers` serve"


def test_max_age_recycles_one_slot_at_a_time(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2, "max_age": 1, "linger": 0.05})
    first = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    wait_for(lambda: not first & {w["pid"] for w in daemon.status()["workers"]}, 20, "both workers recycled")
    replacing = [line for line in daemon.lines if "older than max_age" in line]
    assert len(replacing) >= 2
    # one at a time: each replacement's old worker exits before the next replacement starts
    events = [line for line in daemon.lines if "older than max_age" in line or ") exited" in line]
    kinds = ["replace" if "max_age" in line else "exit" for line in events]
    assert kinds[:4] == ["replace", "exit", "replace", "exit"], events[:4]


def test_restart_while_suspended_rolls_back_and_serves_the_held_requests(start_daemon: DaemonFactory) -> None:
    """restart --suspended; migrations fail; `restart` (old code back on disk) while still suspended."""
    import socket
    import sys
    import threading

    from support.daemon import REPO
    from support.http import build_request, read_response

    app = {"command": [sys.executable, "-m", "sockherd.uvicorn", "asgi_app:app"], "cwd": str(REPO / "tests" / "apps")}
    daemon = start_daemon({**app, "workers": 1, "linger": 0.05})
    daemon.wait_ready(1, timeout=30)
    assert daemon.cli("restart", "--suspended").returncode == 0
    suspended_worker = daemon.status()["workers"][0]
    assert suspended_worker["state"] == "suspended"
    held = socket.socket(socket.AF_UNIX)
    held.settimeout(30)
    held.connect(str(daemon.tmp_dir / "app.0.sock"))
    held.sendall(build_request("GET", "/"))
    answer: list[int | None] = []
    reader = threading.Thread(target=lambda: answer.append(read_response(held).pid))
    reader.start()
    result = daemon.cli("restart")  # roll back: a new, not suspended generation
    assert result.returncode == 0, result.stderr
    reader.join(30)
    held.close()
    assert answer == [suspended_worker["pid"]], "the held request was served when its worker shut down"
    status = daemon.status()
    assert not status["daemon"]["suspended"]
    assert status["workers"][0]["state"] == "online" and status["workers"][0]["pid"] != suspended_worker["pid"]


def test_a_failed_reload_leaves_the_old_config_and_counts(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    settings: dict[str, Any] = {"command": tinyapp_command("--fail-if-env", "BREAK"), "workers": 1, "linger": 0.05}
    daemon = start_daemon(settings)
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    new = {**settings, "tmp_dir": str(daemon.tmp_dir), "workers": 2, "environment": {"BREAK": "0,1"}}
    write_config(daemon.config_path, new)
    result = daemon.cli("reload")
    assert result.returncode == 1 and "the running configuration stays" in result.stderr
    status = daemon.status()
    assert status["daemon"]["workers"] == 1 and [w["pid"] for w in status["workers"]] == [pid]
    assert daemon.call("config")["environment"] == {}
    assert daemon.cli("restart").returncode == 0, "the next restart deploys the old config"
    assert len(daemon.status()["workers"]) == 1


def test_a_failed_scale_up_on_reload_keeps_the_old_count(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    marker = tmp_path / "broken"
    settings: dict[str, Any] = {"command": tinyapp_command("--fail-if-file", str(marker)), "workers": 1}
    daemon = start_daemon(settings)
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    marker.touch()  # new workers cannot start from now on
    write_config(daemon.config_path, {**settings, "tmp_dir": str(daemon.tmp_dir), "workers": 2})
    result = daemon.cli("reload")
    assert result.returncode == 1, result.stdout
    assert "the running configuration stays" in result.stderr
    assert daemon.call("config")["workers"] == 1
    status = daemon.status()
    assert status["daemon"]["workers"] == 1 and [w["pid"] for w in status["workers"]] == [pid]
