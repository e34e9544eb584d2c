"""End to end with nginx and load: suspended deploys, standby failover, broken workers, recycling."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonFactory, NginxFactory
from support.daemon import REPO, RunningDaemon, wait_for
from support.http import LoadGenerator, unix_get

pytestmark = pytest.mark.e2e

APP = {"command": [sys.executable, "-m", "sockherd.uvicorn", "asgi_app:app"], "cwd": str(REPO / "tests" / "apps")}


def links(daemon: RunningDaemon, count: int) -> list[Path]:
    return [daemon.tmp_dir / f"app.{i}.sock" for i in range(count)]


def quiet_for(load: LoadGenerator, seconds: float) -> bool:
    """No request completed for ``seconds``: a check of quiescence needs a window."""
    before = load.result.total
    time.sleep(seconds)
    return load.result.total == before


def test_suspended_deploy_holds_requests_until_resume(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    release.write_text("1")
    daemon = start_daemon({**APP, "workers": 2, "environment": {"RELEASE_FILE": str(release)}})
    old = {w["pid"] for w in daemon.wait_ready(2, timeout=30)["workers"]}
    nginx = start_nginx(links(daemon, 2), keepalive=True)
    with LoadGenerator(nginx.port, concurrency=16, post_every=4) as load:
        load.wait_requests(300)
        release.write_text("2")  # the deploy put new code on disk; migrations must run first
        result = daemon.cli("restart", "--suspended")
        assert result.returncode == 0, result.stderr
        assert "suspended" in result.stdout
        status = daemon.status()
        new = {w["pid"] for w in status["workers"] if w["published"]}
        assert status["daemon"]["suspended"] and not new & old
        assert all(w["state"] == "suspended" for w in status["workers"])
        # Every client ends up waiting on a held request: the count stops moving.
        wait_for(lambda: quiet_for(load, 0.3), 10, "every client to wait on a held request")
        assert not any(load.result.pids[pid] for pid in new), "the new version answered while suspended"
        assert load.result.failures == []
        resumed = daemon.cli("resume")
        assert resumed.returncode == 0 and "resumed 2 worker(s)" in resumed.stdout
        load.wait_requests(300)
    result_ = load.stop()
    assert result_.failures == [], result_.failures[:10]
    assert all(load.result.pids[pid] for pid in new), "after resume the new version serves"
    assert nginx.errors() == []


def test_standby_failover_under_load_fails_no_get(start_daemon: DaemonFactory, start_nginx: NginxFactory) -> None:
    daemon = start_daemon({**APP, "workers": 2, "standby": 1})
    daemon.wait_ready(2, timeout=30)
    wait_for(
        lambda: any(w["index"] is None and w["state"] == "suspended" for w in daemon.status()["workers"]), 30, "standby"
    )
    nginx = start_nginx(links(daemon, 2), keepalive=True)
    with LoadGenerator(nginx.port, concurrency=16, post_every=0) as load:
        load.wait_requests(300)
        for _ in range(3):
            status = daemon.status()
            victim = next(w for w in status["workers"] if w["index"] == 0 and w["published"])
            standby = next(w for w in status["workers"] if w["index"] is None and w["state"] == "suspended")
            os.kill(victim["pid"], signal.SIGKILL)
            promoted: int = standby["pid"]
            wait_for(lambda: load.result.pids[promoted] > 0, 10, "the promoted standby to answer")  # noqa: B023
            wait_for(
                lambda: any(w["index"] is None and w["state"] == "suspended" for w in daemon.status()["workers"]),
                30,
                "a new standby",
            )
        load.wait_requests(300)
    result = load.stop()
    assert result.failures_except_torn() == [], result.failures[:10]
    assert len(result.failures) <= 3, "at most one response torn per SIGKILL"


def test_broken_worker_is_replaced_under_load_with_no_failure(
    start_daemon: DaemonFactory, start_nginx: NginxFactory
) -> None:
    daemon = start_daemon({**APP, "workers": 2})
    before = {w["pid"] for w in daemon.wait_ready(2, timeout=30)["workers"]}
    nginx = start_nginx(links(daemon, 2), keepalive=True)
    with LoadGenerator(nginx.port, concurrency=16, post_every=4) as load:
        load.wait_requests(300)
        broken = unix_get(str(daemon.tmp_dir / "app.0.sock"), "/broken").pid
        assert broken in before
        wait_for(lambda: broken not in {w["pid"] for w in daemon.status()["workers"]}, 30, "the broken worker to exit")
        load.wait_requests(300)
    result = load.stop()
    assert result.failures == [], result.failures[:10]
    assert nginx.errors() == []


def test_max_memory_recycles_under_load_without_a_capacity_dip(
    start_daemon: DaemonFactory, start_nginx: NginxFactory
) -> None:
    daemon = start_daemon({**APP, "workers": 2, "max_memory": "150MiB"})
    before = {w["pid"] for w in daemon.wait_ready(2, timeout=30)["workers"]}
    nginx = start_nginx(links(daemon, 2), keepalive=True)
    dips: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            status: dict[str, Any] = daemon.status()
            serving = [w for w in status["workers"] if w["published"] and w["state"] == "online"]
            if len(serving) < 2:
                dips.append(len(serving))

    watcher = threading.Thread(target=watch)
    with LoadGenerator(nginx.port, concurrency=16, post_every=4) as load:
        load.wait_requests(300)
        watcher.start()
        grown = unix_get(str(daemon.tmp_dir / "app.1.sock"), "/grow?mb=200").pid
        assert grown in before
        wait_for(lambda: grown not in {w["pid"] for w in daemon.status()["workers"]}, 30, "the big worker recycled")
        load.wait_requests(300)
        stop.set()
        watcher.join()
    result = load.stop()
    assert result.failures == [], result.failures[:10]
    assert dips == [], "fewer than `workers` online workers during the recycle"
    assert "over max_memory" in daemon.log
