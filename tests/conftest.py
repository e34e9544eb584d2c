"""Shared fixtures: every process a test starts is stopped in a fixture's teardown."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from support.daemon import RunningDaemon, running_daemon, short_tmp_dir
from support.fake_daemon import FakeDaemon
from support.nginx import Nginx

DaemonFactory = Callable[..., RunningDaemon]
NginxFactory = Callable[..., Nginx]


@pytest.fixture(autouse=True)
def _the_test_runner_stays_no_subreaper() -> Iterator[None]:
    """A test that made pytest itself a child subreaper (the daemon's own code run
    in-process) would hand it every orphan of the tests after it, which it never reaps:
    their processes would linger as zombies and "process gone" checks fail far away."""
    yield
    assert not _child_subreaper(), "this test made the test runner a child subreaper (PR_SET_CHILD_SUBREAPER)"


def _child_subreaper() -> bool:
    import ctypes

    value = ctypes.c_int()
    ctypes.CDLL(None, use_errno=True).prctl(37, ctypes.byref(value), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    return bool(value.value)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    """``start_daemon({"command": [...], "workers": 2}, "--dev-server=0")`` → RunningDaemon."""
    with contextlib.ExitStack() as stack:

        def start(
            settings: dict[str, Any], *args: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
        ) -> RunningDaemon:
            return stack.enter_context(running_daemon(tmp_path, settings, *args, env=env, pass_fds=pass_fds))

        yield start


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    """A tmp_dir short enough for socket paths (pytest's tmp_path is not), removed after."""
    path = short_tmp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    """The daemon's end of the IPC protocol, for testing the worker library alone."""
    fake = FakeDaemon(tmp_path / "ipc")
    yield fake
    fake.close()


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[NginxFactory]:
    started: list[Nginx] = []

    def start(
        sockets: Sequence[Path | str], *, keepalive: bool, max_fails: int | None = 0, user: str | None = None
    ) -> Nginx:
        workdir = tmp_path / f"nginx{len(started)}"
        workdir.mkdir()
        nginx = Nginx(workdir, sockets, keepalive=keepalive, max_fails=max_fails, user=user)
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop()
