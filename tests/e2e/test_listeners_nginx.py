"""A shared UNIX listener behind nginx with its defaults and one `server` line.

nginx ignores `max_fails` when an upstream has a single server, and the daemon keeps
the listener (and its queue) open while workers come and go: so nginx's defaults,
which hurt per-worker sockets badly (a refused connect takes a server out for 10 s),
are harmless here.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import sys
import time

import pytest

from conftest import DaemonFactory, NginxFactory
from support.daemon import REPO, RunningDaemon, wait_for
from support.http import LoadGenerator

pytestmark = pytest.mark.e2e

APP = {
    "command": [sys.executable, "-m", "sockherd.uvicorn", "asgi_app:app", "--log-level", "warning"],
    "cwd": str(REPO / "tests" / "apps"),
}


def replaced(daemon: RunningDaemon, victim: int) -> bool:
    pids = daemon.published_pids()
    return victim not in pids and len(pids) == 2


def test_restarts_behind_nginx_defaults_fail_no_get_and_no_post(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_dir: os.PathLike[str]
) -> None:
    shared = f"{tmp_dir}/app.sock"
    daemon = start_daemon({**APP, "workers": 2, "listen": [f"unix://{shared}"]})
    daemon.wait_ready(2)
    nginx = start_nginx([f"unix:{shared}"], keepalive=True, max_fails=None)  # nginx's defaults
    assert "max_fails" not in nginx.conf.read_text()
    with LoadGenerator(nginx.port, concurrency=16, post_every=3) as load:
        load.wait_requests(300)
        for _ in range(4):
            before = daemon.published_pids()
            assert daemon.cli("restart").returncode == 0
            assert not before & daemon.published_pids()
            load.wait_requests(300)
    result = load.result
    assert result.failures == [], result.failures[:5]
    assert result.methods["POST"] > 100 and result.methods["GET"] > 100
    assert nginx.errors() == []


def test_a_worker_killed_every_second_costs_at_most_its_in_flight_requests(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_dir: os.PathLike[str]
) -> None:
    """No standby: a dead worker's queued connections wait for the other one, and only
    the requests in flight on it fail (nginx has no second server to retry on)."""
    shared = f"{tmp_dir}/app.sock"
    daemon = start_daemon({**APP, "workers": 2, "listen": [f"unix://{shared}"]})
    daemon.wait_ready(2)
    nginx = start_nginx([f"unix:{shared}"], keepalive=True, max_fails=None)
    kills = 0
    with LoadGenerator(nginx.port, concurrency=16, post_every=0) as load:
        load.wait_requests(300)
        started = time.monotonic()
        while time.monotonic() - started < 10:
            victim = random.choice(sorted(daemon.published_pids()))
            os.kill(victim, signal.SIGKILL)
            kills += 1
            wait_for(functools.partial(replaced, daemon, victim), 10, "the replacement")
            time.sleep(max(0.0, started + kills - time.monotonic()))  # one kill a second
    result = load.result
    assert kills >= 9
    # At most what was in flight on each killed worker (16 clients share two workers).
    assert len(result.failures) <= kills * 16, result.failures[:5]
    assert len(result.failures) <= 0.01 * result.total, f"{len(result.failures)} of {result.total} failed"
