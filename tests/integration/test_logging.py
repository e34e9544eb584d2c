"""The daemon's log as data: `--log-format json` lines, and journald's priority prefixes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonFactory
from sockherd.client import Client, DaemonUnreachable
from support.daemon import end_daemon, tinyapp_command, wait_for, write_config

IDENTITY = ("id", "index", "pid", "generation")


def entries(lines: list[str]) -> list[dict[str, Any]]:
    parsed = []
    for line in lines:
        entry = json.loads(line)  # every line: a worker's output would fail here too
        assert isinstance(entry, dict), line
        parsed.append(entry)
    return parsed


def test_json_log_lines_carry_each_workers_identity(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2}, "--log-format", "json")
    first = {w["pid"]: w for w in daemon.wait_ready(2)["workers"]}
    victim = next(iter(first))
    os.kill(victim, signal.SIGKILL)
    daemon.wait_log(rf'"event": "crashed".*"pid": {victim}\b')
    daemon.wait_ready(2)
    restart = daemon.cli("restart")
    assert restart.returncode == 0, restart.stderr
    second = {w["pid"]: w for w in daemon.status()["workers"]}
    daemon.stop()  # SIGTERM: a graceful quit, every worker's exit logged

    log = entries(daemon.lines)
    for entry in log:
        assert set(entry) >= {"time", "level", "event", "message"}, entry
        assert entry["level"] in ("debug", "info", "warning", "error")
    by_event: dict[str, dict[int, dict[str, Any]]] = {}
    for entry in log:
        if "pid" in entry:
            by_event.setdefault(entry["event"], {})[entry["pid"]] = entry
    for pid, row in second.items():
        for event in ("spawned", "online", "published", "stopping", "exited"):
            entry = by_event[event][pid]
            assert {key: entry[key] for key in IDENTITY} == {key: row[key] for key in IDENTITY}, (event, entry)
    crashed = by_event["crashed"][victim]
    assert {key: crashed[key] for key in IDENTITY} == {key: first[victim][key] for key in IDENTITY}
    assert crashed["level"] == "warning" and crashed["code"] == -signal.SIGKILL
    assert "crashed (signal SIGKILL)" in crashed["message"]
    assert all(by_event["exited"][pid]["generation"] == 1 for pid in first if pid != victim)
    assert any(e["event"] == "log" and e["message"].startswith("daemon 0.") for e in log)


@contextlib.contextmanager
def daemon_with_stderr_in(
    path: Path, config: Path, ipc: Path, env: dict[str, str], *args: str
) -> Iterator[subprocess.Popen[str]]:
    """A daemon whose stderr is ``path`` (a file: its device and inode are known)."""
    with path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sockherd", "daemon", "-c", str(config), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **env},
            text=True,
        )
    try:
        yield proc
    finally:
        end_daemon(proc, ipc)


def journal_stream_of(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_under_journald_lines_carry_the_priority_and_no_timestamp(
    tmp_path: Path, tmp_dir: Path, log_format: str
) -> None:
    config = write_config(
        tmp_path / "sockherd.toml", {"command": tinyapp_command(), "tmp_dir": str(tmp_dir), "workers": 1}
    )
    ipc = tmp_dir / "sockherd.ipc"
    log_file = tmp_path / "stderr"
    log_file.touch()
    env = {"JOURNAL_STREAM": journal_stream_of(log_file)}
    with daemon_with_stderr_in(log_file, config, ipc, env, "--log-format", log_format) as proc:

        def published() -> int | None:
            assert proc.poll() is None, log_file.read_text()
            try:
                with Client(ipc) as client:
                    rows = client.call("status")["workers"]
            except (DaemonUnreachable, OSError):
                return None
            return next((w["pid"] for w in rows if w["published"] and w["state"] == "online"), None)

        pid = wait_for(published, 20, "a published worker")
        os.kill(pid, signal.SIGKILL)  # a crash: logged as a warning
        wait_for(lambda: "crashed" in log_file.read_text(), 10, "the crash in the log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    lines = log_file.read_text().splitlines()
    assert lines
    pattern = re.compile(r"^<([2-7])>(.*)$")
    seen = []
    for line in lines:
        match = pattern.match(line)
        assert match, f"no priority prefix: {line!r}"
        body = match[2]
        assert not re.search(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d", body), f"a timestamp: {line!r}"
        if log_format == "json":
            entry = json.loads(body)
            assert "time" not in entry
            level, message = entry["level"], entry["message"]
        else:
            level, _, message = body.partition(" ")
        assert int(match[1]) == {"debug": 7, "info": 6, "warning": 4, "error": 3}[level.lower()], line
        seen.append((int(match[1]), message))
    assert any(priority == 4 and "crashed (signal SIGKILL)" in message for priority, message in seen), seen
    assert (6, "daemon exits") in seen


def test_a_journal_stream_that_is_not_stderr_keeps_the_timestamps(tmp_path: Path, tmp_dir: Path) -> None:
    """systemd's variable is inherited by children whose stderr went elsewhere: not the journal."""
    config = write_config(
        tmp_path / "sockherd.toml", {"command": tinyapp_command(), "tmp_dir": str(tmp_dir), "workers": 1}
    )
    other = tmp_path / "other"
    other.touch()
    log_file = tmp_path / "stderr"
    env = {"JOURNAL_STREAM": journal_stream_of(other)}
    with daemon_with_stderr_in(log_file, config, tmp_dir / "sockherd.ipc", env) as proc:
        wait_for(lambda: "generation 1 is serving" in log_file.read_text(), 20, "the first generation")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    for line in log_file.read_text().splitlines():
        assert re.match(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} sockherd\[{proc.pid}\] [A-Z]+ ", line), line
