"""Deploys you can take back, under load behind nginx: keep-previous + rollback, canaries."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import DaemonFactory, NginxFactory
from support.daemon import REPO, RunningDaemon, wait_for
from support.http import LoadGenerator, tcp_get

pytestmark = pytest.mark.e2e

APP = {
    "command": [sys.executable, "-m", "sockherd.uvicorn", "asgi_app:app", "--log-level", "warning"],
    "cwd": str(REPO / "tests" / "apps"),
}


def served(port: int, n: int = 40) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        match = re.search(rb"release=(\S+)", tcp_get(port, "/").body)
        out[match.group(1).decode() if match else "?"] += 1
    return out


def started(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path, workers: int
) -> tuple[RunningDaemon, int, Path]:
    release = tmp_path / "release"
    release.write_text("1")
    daemon = start_daemon({**APP, "workers": workers, "environment": {"RELEASE_FILE": str(release)}})
    daemon.wait_ready(workers)
    nginx = start_nginx([daemon.tmp_dir / f"app.{i}.sock" for i in range(workers)], keepalive=True)
    return daemon, nginx.port, release


def test_keep_previous_then_rollback_loses_nothing_and_brings_back_the_same_pids(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path
) -> None:
    daemon, port, release = started(start_daemon, start_nginx, tmp_path, 2)
    before = daemon.published_pids()
    with LoadGenerator(port, concurrency=16) as load:
        load.wait_requests(300)
        release.write_text("2")
        result = daemon.cli("restart", "--keep-previous", "60s")
        assert result.returncode == 0, result.stderr
        assert "keeping generation 1 (2 worker(s)) for a rollback" in result.stderr
        new = daemon.published_pids()
        assert not before & new
        status = daemon.status()
        kept = status["daemon"]["kept"]
        assert kept["generation"] == 1 and set(kept["pids"]) == before and kept["rss"] > 0
        assert 55 < kept["until"] - time.time() <= 60
        assert "kept: generation 1 (2 worker(s), " in daemon.cli("status").stdout
        wait_for(lambda: served(port, 10) == Counter({"2": 10}), 10, "only the new release to answer")
        load.wait_requests(300)
        result = daemon.cli("rollback", "--json")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["result"]["moved_ms"] < 50, answer["result"]  # command receipt to every symlink moved
        assert re.search(r"rolled back to generation 1: 2 slot\(s\) moved in [0-9.]+ ms", result.stderr)
        assert daemon.published_pids() == before  # the very workers that served before
        load.wait_requests(300)
    assert load.result.failures == [], load.result.failures[:5]
    assert served(port) == Counter({"1": 40})
    wait_for(lambda: not new & {w["pid"] for w in daemon.status()["workers"]}, 20, "the bad generation to retire")
    assert daemon.status()["daemon"]["kept"] is None
    nothing = daemon.cli("rollback")
    assert nothing.returncode == 1 and "nothing to roll back to" in nothing.stderr


def test_a_kept_generation_retires_on_commit_and_when_its_time_is_up(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path
) -> None:
    daemon, _, _ = started(start_daemon, start_nginx, tmp_path, 1)
    first = daemon.published_pids()
    assert daemon.cli("restart", "--keep-previous", "60").returncode == 0
    result = daemon.cli("commit")
    assert result.returncode == 0 and "retired 1 kept worker(s)" in result.stdout
    wait_for(lambda: not first & {w["pid"] for w in daemon.status()["workers"]}, 20, "commit to retire")
    second = daemon.published_pids()
    assert daemon.cli("restart", "--keep-previous", "1").returncode == 0
    wait_for(lambda: daemon.status()["daemon"]["kept"] is None, 20, "the kept time to run out")
    wait_for(lambda: not second & {w["pid"] for w in daemon.status()["workers"]}, 20, "the expiry to retire it")


def test_canary_serves_one_slot_then_promote_moves_the_rest(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path
) -> None:
    daemon, port, release = started(start_daemon, start_nginx, tmp_path, 4)
    old = daemon.published_pids()
    with LoadGenerator(port, concurrency=16) as load:
        load.wait_requests(300)
        release.write_text("2")
        result = daemon.cli("restart", "--canary", "1")
        assert result.returncode == 0, result.stderr
        status = daemon.status()
        assert status["daemon"]["canary"] == {"generation": 2, "slots": [0]}
        by_release = served(port, 200)
        assert set(by_release) == {"1", "2"} and 20 < by_release["2"] < 100  # one slot in four
        load.wait_requests(300)
        result = daemon.cli("promote")
        assert result.returncode == 0, result.stderr
        load.wait_requests(300)
    assert load.result.failures == [], load.result.failures[:5]
    assert served(port) == Counter({"2": 40})
    assert not old & daemon.published_pids()
    assert daemon.status()["daemon"]["canary"] is None


def test_canary_rollback_restores_the_old_version_everywhere(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path
) -> None:
    daemon, port, release = started(start_daemon, start_nginx, tmp_path, 4)
    old = daemon.published_pids()
    with LoadGenerator(port, concurrency=16) as load:
        load.wait_requests(300)
        release.write_text("2")
        assert daemon.cli("restart", "--canary", "1").returncode == 0
        load.wait_requests(300)
        result = daemon.cli("rollback")
        assert result.returncode == 0, result.stderr
        load.wait_requests(300)
    assert load.result.failures == [], load.result.failures[:5]
    assert daemon.published_pids() == old
    assert served(port) == Counter({"1": 40})


def test_a_canary_that_crashes_rolls_back_by_itself(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path
) -> None:
    daemon, port, release = started(start_daemon, start_nginx, tmp_path, 2)
    old = daemon.published_pids()
    release.write_text("2")
    assert daemon.cli("restart", "--canary", "1").returncode == 0
    (canary,) = daemon.published_pids() - old
    os.kill(canary, signal.SIGKILL)  # as a canary that dies at its first request would
    wait_for(lambda: daemon.published_pids() == old, 10, "the automatic rollback")
    status = daemon.status()
    assert status["daemon"]["canary"] is None
    assert "canary rolled back by itself: worker #0" in status["daemon"]["rolled_back"]
    assert "crashed" in daemon.cli("status").stdout
    assert served(port) == Counter({"1": 40})
