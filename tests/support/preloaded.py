"""Helpers of the preload tests: a preloaded daemon's settings, its workers' answers, its fork servers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from support.daemon import RunningDaemon
from support.http import unix_get

APPS = Path(__file__).resolve().parents[1] / "apps"
RUNNER = [sys.executable, "-m", "sockherd.uvicorn", "preload_app:app"]


def preloaded(tmp_path: Path, **settings: Any) -> tuple[dict[str, Any], dict[str, str], Path]:
    """(settings, environment, release file) of a daemon running tests/apps/preload_app.py preloaded."""
    release = tmp_path / "release"
    release.write_text("1")
    config = {"command": RUNNER, "cwd": str(APPS), "preload": True, "workers": 2, "env": ["RELEASE_FILE"], **settings}
    return config, {"RELEASE_FILE": str(release)}, release


def start_preloaded(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, **settings: Any
) -> tuple[RunningDaemon, Path]:
    """A daemon running tests/apps/preload_app.py preloaded (:func:`preloaded`), its 2
    workers published: (the daemon, the release file)."""
    config, env, release = preloaded(tmp_path, **settings)
    daemon = start_daemon(config, env=env)
    daemon.wait_ready(2)
    return daemon, release


def answer(daemon: RunningDaemon, index: int) -> dict[str, Any]:
    """What the worker in slot ``index`` says of itself (tests/apps/preload_app.py)."""
    response = unix_get(str(daemon.tmp_dir / f"app.{index}.sock"))
    assert response.status == 200, response
    result: dict[str, Any] = json.loads(response.body)
    return result


def fork_servers(daemon: RunningDaemon) -> dict[str, int]:
    servers: dict[str, int] = daemon.status()["daemon"]["preloaded"]
    return servers


def fork_server(daemon: RunningDaemon) -> int:
    """The pid of the one fork server running (that of the current generation)."""
    (pid,) = fork_servers(daemon).values()
    return pid


def flip(link: Path, target: Path) -> None:
    """Point the symlink ``link`` at ``target`` atomically, as a deploy flips ``current``."""
    staged = link.with_name(link.name + ".new")
    staged.symlink_to(target)
    staged.rename(link)


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or zombie(pid)


def zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
