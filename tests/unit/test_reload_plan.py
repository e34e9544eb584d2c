"""The smallest action for each kind of config change: a pure decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockherd.config import Config, ConfigError, load_config
from sockherd.daemon.reload import plan_reload

BASE = 'command = ["app", "{socket}"]\ntmp_dir = "/tmp/sh-plan"\nworkers = 2\n'


def config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "sockherd.toml"
    path.write_text(BASE + extra)
    return load_config(path)


def replaced(tmp_path: Path, key: str, line: str) -> Config:
    """The base config with ``key`` set by ``line`` instead."""
    body = "\n".join(old for old in BASE.splitlines() if not old.startswith(key + " ")) + "\n" + line + "\n"
    (tmp_path / "sockherd.toml").write_text(body)
    return load_config(tmp_path / "sockherd.toml")


@pytest.mark.parametrize(
    "extra",
    [
        'command = ["app2", "{socket}"]',
        'environment = { RELEASE = "2" }',
        'env = ["DATABASE_URL"]',
        'cwd = "/srv"',
        'ready = "socket"',
        'stdout = "/tmp/app.log"',
        'stop_signal = "SIGINT"',
        "socket_mode = 0o600",
        "backlog = 64",
    ],
)
def test_what_a_worker_runs_needs_a_restart(tmp_path: Path, extra: str) -> None:
    old = config(tmp_path)
    key = extra.split(" ", 1)[0]
    plan = plan_reload(old, replaced(tmp_path, key, extra), workers=2, standby=0)
    assert plan.restart and key in plan.changed
    assert plan.workers is None and plan.standby is None


def test_counts_only_scale(tmp_path: Path) -> None:
    old = config(tmp_path)
    (tmp_path / "sockherd.toml").write_text(BASE.replace("workers = 2", "workers = 4") + "standby = 1\n")
    plan = plan_reload(old, load_config(tmp_path / "sockherd.toml"), workers=2, standby=0)
    assert not plan.restart
    assert (plan.workers, plan.standby) == (4, 1)
    assert plan.describe() == "changed: standby, workers (scale to 4 worker(s); scale to 1 standby)"


def test_a_reload_ends_runtime_overrides(tmp_path: Path) -> None:
    same = config(tmp_path)
    plan = plan_reload(same, same, workers=5, standby=0)  # `set-workers 5` earlier
    assert plan.workers == 2 and not plan.changed
    assert plan.describe() == "no change in the file (scale to 2 worker(s))"


def test_in_place_changes(tmp_path: Path) -> None:
    old = config(tmp_path)
    extra = 'name = "shop"\nshutdown_timeout = 3\nsymlinks = "absolute"\nmax_age = 3600\ndev_server = 8080\n'
    plan = plan_reload(old, config(tmp_path, extra), workers=2, standby=0)
    assert not plan.restart
    assert plan.retitle and plan.timeouts and plan.republish and plan.recycling and plan.dev_server


def test_nothing_changed(tmp_path: Path) -> None:
    old = config(tmp_path)
    plan = plan_reload(old, config(tmp_path), workers=2, standby=0)
    assert plan.describe() == "no change in the file"
    assert not (plan.restart or plan.retitle or plan.timeouts)


@pytest.mark.parametrize("extra", ['tmp_dir = "/tmp/sh-other"', 'ipc_file = "x.ipc"', 'socket_file = "w{worker}.sock"'])
def test_where_sockets_live_cannot_change(tmp_path: Path, extra: str) -> None:
    old = config(tmp_path)
    key = extra.split(" ", 1)[0]
    with pytest.raises(ConfigError, match=f"key '{key}' cannot change while the daemon runs"):
        plan_reload(old, replaced(tmp_path, key, extra), workers=2, standby=0)
