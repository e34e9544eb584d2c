"""`start` and `restart` through the CLI's fast path, against a real daemon: the full
CLI's progress, result and failure reports, without the full CLI's imports; and the
command is never sent twice (the fast path hands over only before it sends it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
from pathlib import Path

from conftest import DaemonFactory
from support.cli import fast_path_imports, sockherd_argv
from support.daemon import RunningDaemon, tinyapp_command


def run(daemon: RunningDaemon, *args: str, full: bool = False) -> subprocess.CompletedProcess[str]:
    """``sockherd ARGS`` through the console script's path, or straight through the full CLI."""
    return subprocess.run(
        command(daemon, *args, full=full), cwd=daemon.workdir, capture_output=True, text=True, timeout=60, check=False
    )


def command(daemon: RunningDaemon, *args: str, full: bool = False) -> list[str]:
    return sockherd_argv(*args, "-c", str(daemon.config_path), full=full)


def steady(text: str) -> str:
    """Pids, generations and worker ids differ between two deploys."""
    return re.sub(r"\b[0-9a-f]{6}\b|\d+", "N", text)


def shape(value: object) -> object:
    """A JSON value's keys, all the way down (its figures, ids and nulls vary)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return None


def test_a_restart_reports_as_the_full_cli_does(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    fast, full = run(daemon, "restart"), run(daemon, "restart", full=True)
    assert fast.returncode == full.returncode == 0, (fast.stderr, full.stderr)
    assert steady(fast.stdout) == steady(full.stdout)
    assert fast.stdout.startswith("restart done: serving from pid(s) "), fast.stdout
    assert steady(fast.stderr) == steady(full.stderr)  # the progress lines
    assert "published; stopping 2 old worker(s)" in fast.stderr
    pids = {w["pid"] for w in daemon.status()["workers"]}
    assert fast.stdout.strip() != full.stdout.strip() and str(min(pids)) in full.stdout


def test_a_suspended_restart_with_json_is_the_full_clis(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command("--ready", "library"), "workers": 1})
    daemon.wait_ready(1)
    fast = run(daemon, "restart", "--suspended", "--json")
    assert fast.returncode == 0, fast.stderr
    result = json.loads(fast.stdout)
    assert result["status"]["daemon"]["suspended"] is True
    assert "holds requests until `sockherd resume`" in fast.stderr
    assert daemon.cli("resume").returncode == 0
    full = json.loads(run(daemon, "restart", "--suspended", "--json", full=True).stdout)
    assert shape(full) == shape(result)


def test_a_failed_restart_reports_as_the_full_cli_does(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    marker = tmp_path / "broken"
    daemon = start_daemon(
        {
            "command": tinyapp_command("--fail-if-file", str(marker)),
            "workers": 1,
            "max_start_attempts": 1,
            "stderr": str(tmp_path / "workers.log"),
        }
    )
    daemon.wait_ready(1)
    marker.touch()
    fast = run(daemon, "restart")
    (tmp_path / "workers.log").write_text("")  # each report shows the log's last lines: the same ones
    full = run(daemon, "restart", full=True)
    assert fast.returncode == full.returncode == 1
    assert fast.stdout == full.stdout == ""
    assert steady(fast.stderr) == steady(full.stderr)
    assert "sockherd: restart failed: " in fast.stderr
    assert "last output of the failed worker:" in fast.stderr
    assert "  | tinyapp" in fast.stderr


def test_a_daemon_that_dies_during_the_restart_is_reported_once(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Sent, then the connection ends: the fast path says so (exit 3, the full CLI's words)
    and does not hand the restart over to the full CLI, which would send it again."""
    slow = tmp_path / "slow"  # the new generation takes its time to start
    command_line = f"[ -e {shlex.quote(str(slow))} ] && sleep 30; exec {shlex.join(tinyapp_command())}"
    daemon = start_daemon({"command": ["sh", "-c", command_line], "workers": 1, "online_timeout": 60})
    daemon.wait_ready(1)
    slow.touch()
    mark = daemon.mark()
    proc = subprocess.Popen(
        command(daemon, "restart"), cwd=daemon.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        daemon.wait_log("starting generation 2", start=mark)
        daemon.proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 3
    # Its own words: the full CLI, had it been handed the restart, would have found no
    # daemon ("no sockherd daemon is listening on …").
    assert err.endswith("sockherd: the daemon closed the connection\n"), err


def test_the_fast_restart_imports_none_of_the_full_clis_modules(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    stderr = fast_path_imports("restart", "-c", str(daemon.config_path))
    assert stderr.splitlines()[-1] == "0 []", stderr  # after the progress lines


def test_a_closed_stderr_loses_the_progress_not_the_result(start_daemon: DaemonFactory) -> None:
    """A deploy script that closed our stderr (`2>&-` into a dead pipe): both CLIs drop the
    progress lines and still wait for the deploy and report its result by exit code."""
    daemon = start_daemon({"command": tinyapp_command(), "workers": 1})
    daemon.wait_ready(1)
    for full in (False, True):
        read_end, write_end = os.pipe()
        os.close(read_end)  # every write to stderr: EPIPE
        try:
            result = subprocess.run(
                command(daemon, "restart", full=full),
                cwd=daemon.workdir,
                stdout=subprocess.PIPE,
                stderr=write_end,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(write_end)
        assert result.returncode == 0, (full, result.stdout)
        assert result.stdout.startswith("restart done: serving from pid(s) "), (full, result.stdout)


class ScriptedDaemon:
    """A UNIX socket that greets like the daemon, then answers a command with ``lines``;
    with ``hello_errors``, refuses the hello instead and records what comes after it."""

    def __init__(self, path: Path, lines: list[bytes], hello_errors: list[str] | None = None) -> None:
        self.path = path
        self.lines = lines
        self.hello_errors = hello_errors
        self.after_refusal: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    reader = conn.makefile("rb")
                    hello = json.loads(reader.readline())
                    if self.hello_errors is not None:
                        refusal = {
                            "type": "reply",
                            "request_id": hello["id"],
                            "done": True,
                            "errors": self.hello_errors,
                        }
                        conn.sendall(json.dumps(refusal).encode() + b"\n")
                        if rest := reader.readline():  # the client should hang up, not send the command
                            self.after_refusal.append(rest)
                        reader.close()
                        continue
                    greeting = {"daemon_pid": 1, "version": "0.1.0", "name": "app"}
                    conn.sendall(
                        json.dumps(
                            {"type": "reply", "request_id": hello["id"], "done": True, "data": greeting}
                        ).encode()
                        + b"\n"
                    )
                    request = json.loads(reader.readline())
                    conn.sendall(
                        b"".join(line.replace(b"ID", str(request["id"]).encode()) + b"\n" for line in self.lines)
                    )
                    reader.close()
                    conn.shutdown(socket.SHUT_RDWR)  # then the connection ends, as a daemon's would

    def close(self) -> None:
        self.listener.close()
        self.path.unlink()
        assert self.after_refusal == [], "a client sent more after its hello was refused"


def scripted(
    tmp_path: Path, lines: list[bytes], *, full: bool, hello_errors: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    server = ScriptedDaemon(tmp_path / f"ipc-{full}", lines, hello_errors)
    try:
        return subprocess.run(
            sockherd_argv("restart", "-i", str(server.path), full=full),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        server.close()


def test_what_a_daemon_could_send_is_read_as_the_full_cli_reads_it(tmp_path: Path) -> None:
    progress = b'{"type":"reply","request_id":ID,"done":false,"data":{"progress":"starting generation 2"}}'
    status = {"workers": [{"pid": 42, "published": True}], "daemon": {}}
    final_without_done = (
        json.dumps({"type": "reply", "request_id": 0, "data": {"status": status}})
        .replace('"request_id": 0', '"request_id": ID')
        .encode()
    )
    for lines, code in (
        ([progress, b"this is not json"], 3),
        ([progress, b"[1, 2]"], 3),
        ([progress, final_without_done], 0),  # `done` defaults to true
        ([progress, b'{"type":"reply","request_id":ID,"done":true,"errors":["it broke"]}'], 1),
        ([progress], 3),  # the connection ends first
    ):
        fast, full = scripted(tmp_path, lines, full=False), scripted(tmp_path, lines, full=True)
        assert (fast.returncode, fast.stdout, fast.stderr) == (full.returncode, full.stdout, full.stderr), lines
        assert fast.returncode == code, (lines, fast.stderr)


def test_a_refused_hello_hands_the_deploy_over_without_sending_it(tmp_path: Path) -> None:
    """Up to the daemon's greeting the fast path has asked nothing: a refused hello (another
    protocol version) goes to the full CLI, which says why; the command is never sent (the
    scripted daemon checks that nothing follows a refused hello)."""
    refusal = ["unsupported protocol version 1"]
    fast = scripted(tmp_path, [], full=False, hello_errors=refusal)
    full_cli = scripted(tmp_path, [], full=True, hello_errors=refusal)
    assert (fast.returncode, fast.stdout, fast.stderr) == (full_cli.returncode, full_cli.stdout, full_cli.stderr)
    assert "unsupported protocol version 1" in fast.stderr
