"""examples/multihost/rolling-deploy.sh, with two real daemons standing in for two hosts.

Each "host" is a directory with its app (a copy of tinyapp) and a running daemon; the
script's per-host command, ssh in production, here copies the release's app.py into the
host and runs `sockherd restart` there, and notes which hosts it was run for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.daemon import REPO, TINYAPP, RunningDaemon, running_daemon, without_metrics
from support.http import unix_get

SCRIPT = REPO / "examples" / "multihost" / "rolling-deploy.sh"
DEPLOY_ONE = 'echo "$1" >> "$DEPLOYED" && cp "$RELEASE/app.py" "$1/app.py" && sockherd restart -c "$1/sockherd.toml"'


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[RunningDaemon]]:
    with contextlib.ExitStack() as stack:
        daemons = []
        for name in ("host1", "host2"):
            workdir = tmp_path / name
            workdir.mkdir()
            shutil.copy(TINYAPP, workdir / "app.py")
            settings = {"command": [sys.executable, "app.py", "{socket}"], "workers": 2}
            daemons.append(stack.enter_context(running_daemon(workdir, settings)))
        for daemon in daemons:
            daemon.wait_ready(2)
        yield daemons


def release(tmp_path: Path, name: str, app: str) -> Path:
    where = tmp_path / "releases" / name
    where.mkdir(parents=True)
    (where / "app.py").write_text(app)
    return where


def rolling_deploy(tmp_path: Path, release_dir: Path, hosts: list[RunningDaemon]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RELEASE": str(release_dir),
        "DEPLOYED": str(tmp_path / "deployed"),
    }
    (tmp_path / "deployed").write_text("")
    return subprocess.run(
        [str(SCRIPT), "-x", DEPLOY_ONE, *(str(host.workdir) for host in hosts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def serving(host: RunningDaemon) -> tuple[int, set[int]]:
    """The generation a host serves, and the pids that answer on its published sockets."""
    status = host.status()
    answered = set()
    for row in status["workers"]:
        if row["published"]:
            response = unix_get(row["symlink"], "/")
            assert response.status == 200
            assert response.pid is not None
            answered.add(response.pid)
    return status["daemon"]["generation"], answered


def test_a_good_release_goes_out_to_every_host(tmp_path: Path, hosts: list[RunningDaemon]) -> None:
    before = [serving(host) for host in hosts]
    good = release(tmp_path, "v2", TINYAPP.read_text() + "\n# v2\n")
    result = rolling_deploy(tmp_path, good, hosts)
    assert result.returncode == 0, result.stderr
    assert "rolling-deploy: all 2 host(s) deployed" in result.stderr
    assert (tmp_path / "deployed").read_text().split() == [str(host.workdir) for host in hosts]
    for host, (generation, pids) in zip(hosts, before, strict=True):
        now_generation, now_pids = serving(host)
        assert now_generation == generation + 1
        assert now_pids and not now_pids & pids  # new workers answer; the old ones are gone
        assert (host.workdir / "app.py").read_text().endswith("# v2\n")


def test_a_release_that_fails_on_host_1_stops_there(tmp_path: Path, hosts: list[RunningDaemon]) -> None:
    before = [serving(host) for host in hosts]
    host2_rows = without_metrics(hosts[1].status()["workers"])
    bad = release(tmp_path, "v3", TINYAPP.read_text().replace("import argparse", "import argparse +", 1))
    result = rolling_deploy(tmp_path, bad, hosts)
    assert result.returncode == 1, result.stderr
    assert "sockherd: restart failed: worker #" in result.stderr
    assert "before it reported ready" in result.stderr
    hosts[0].wait_log(r"^SyntaxError: invalid syntax")  # the worker's output: the daemon's stderr
    assert f"rolling-deploy: {hosts[0].workdir} failed (exit 1)" in result.stderr
    assert f"rolling-deploy: not deployed: {hosts[1].workdir}" in result.stderr
    assert (tmp_path / "deployed").read_text().split() == [str(hosts[0].workdir)]
    # Both keep serving from the generation they had: the same pids answer.
    assert [serving(host) for host in hosts] == before
    assert without_metrics(hosts[1].status()["workers"]) == host2_rows
    assert (hosts[1].workdir / "app.py").read_text() == TINYAPP.read_text()


def test_bad_usage_exits_2() -> None:
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=10, check=False)
    assert (result.returncode, result.stderr.strip()) == (2, "usage: rolling-deploy.sh [-x COMMAND] HOST...")
