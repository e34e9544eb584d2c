"""``preload = true``: a fork server per generation imports the app once; workers are forked from it.

Real daemons, real fork servers, real forked workers answering over their sockets. The
test app answers with the pid that imported it and the pids its hooks ran in, so each
test can tell which process did what.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import DaemonFactory
from sockherd.daemon.forkserver import PRELOAD_FD_VAR
from support.daemon import bump, installable_copy, wait_for
from support.http import build_request, read_response
from support.nginx import free_port
from support.preloaded import APPS, answer, fork_server, fork_servers, gone, preloaded, start_preloaded, zombie


def test_workers_are_forked_from_one_import_and_are_the_daemons_children(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    settings, env, _ = preloaded(tmp_path, workers=3)
    daemon = start_daemon(settings, env=env)
    status = daemon.wait_ready(3)
    servers = fork_servers(daemon)
    assert list(servers) == [str(status["daemon"]["generation"])]
    server_pid = next(iter(servers.values()))
    answers = [answer(daemon, i) for i in range(3)]
    pids = {a["pid"] for a in answers}
    assert len(pids) == 3
    assert all(a["imported_in"] == server_pid for a in answers), answers  # imported once, in the fork server
    assert all(a["forked_in"] == [a["pid"]] for a in answers), answers  # on_fork ran in the worker itself
    assert all(a["resumed_in"] == [a["pid"]] for a in answers), answers  # on_resume: in the worker, not at import
    assert sorted(a["index"] for a in answers) == [0, 1, 2]
    for pid in pids:
        worker = psutil.Process(pid)
        assert worker.ppid() == daemon.proc.pid  # reparented to the daemon (subreaper)
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own session and group
    assert psutil.Process(server_pid).ppid() == daemon.proc.pid


def test_without_preload_each_worker_imports_the_app_itself(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    daemon, _ = start_preloaded(start_daemon, tmp_path, preload=False)
    assert fork_servers(daemon) == {}
    for i in range(2):
        result = answer(daemon, i)
        assert result["imported_in"] == result["pid"]
        assert result["forked_in"] == [result["pid"]]  # fork_point runs on_fork without preload too


def test_a_crashed_worker_is_forked_again_from_the_same_fork_server(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    daemon, _ = start_preloaded(start_daemon, tmp_path)
    server_pid = fork_server(daemon)
    victim = answer(daemon, 0)["pid"]
    mark = daemon.mark()
    os.kill(victim, signal.SIGKILL)
    daemon.wait_log(r"worker #0 .* online after", start=mark)
    daemon.wait_ready(2)
    replacement = answer(daemon, 0)
    assert replacement["pid"] != victim
    assert replacement["imported_in"] == server_pid
    assert psutil.Process(replacement["pid"]).ppid() == daemon.proc.pid


def test_a_restart_imports_the_new_release_once_and_retires_the_old_fork_server(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    daemon, release = start_preloaded(start_daemon, tmp_path)
    old_server = fork_server(daemon)
    release.write_text("2")
    result = daemon.cli("restart")
    assert result.returncode == 0, result.stderr
    servers = fork_servers(daemon)
    assert len(servers) == 1
    new_server = next(iter(servers.values()))
    assert new_server != old_server
    answers = [answer(daemon, i) for i in range(2)]
    assert all(a["release"] == "2" and a["imported_in"] == new_server for a in answers), answers
    wait_for(lambda: not psutil.pid_exists(old_server) or zombie(old_server), 10, "the old fork server to exit")


def test_new_code_that_fails_to_import_fails_the_restart_and_the_old_generation_serves(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    settings, env, release = preloaded(tmp_path, stderr=str(tmp_path / "workers.log"))
    daemon = start_daemon(settings, env=env)
    daemon.wait_ready(2)
    before = {answer(daemon, i)["pid"] for i in range(2)}
    release.write_text("broken")
    result = daemon.cli("restart")
    assert result.returncode == 1
    assert "could not be forked: its preload process exited with status 1" in result.stderr, result.stderr
    assert "RuntimeError: release 'broken' does not import" in result.stderr, result.stderr  # the log's tail
    assert {answer(daemon, i)["pid"] for i in range(2)} == before
    assert all(answer(daemon, i)["release"] == "1" for i in range(2))
    release.write_text("3")
    result = daemon.cli("restart")
    assert result.returncode == 0, result.stderr
    assert all(answer(daemon, i)["release"] == "3" for i in range(2))


def test_a_suspended_preloaded_restart_runs_resume_hooks_in_each_worker_at_resume(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    daemon, release = start_preloaded(start_daemon, tmp_path)
    release.write_text("2")
    result = daemon.cli("restart", "--suspended")
    assert result.returncode == 0, result.stderr
    # Suspended, a worker holds requests: one sent now is answered after the resume, by a
    # worker whose resume hook has run in it (answered before, it would list none).
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.settimeout(10)
    held.connect(str(daemon.tmp_dir / "app.0.sock"))
    held.sendall(build_request("GET", "/", close=True))
    assert daemon.cli("resume").returncode == 0
    response = read_response(held)
    held.close()
    result_json = json.loads(response.body)
    assert result_json["release"] == "2"
    assert result_json["resumed_in"] == [result_json["pid"]]


def test_preload_serves_shared_listeners_with_listen_pid_its_own(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    """And a file the app opened at import keeps its descriptor: the fork server starts with
    the listeners at 3.., so the import's own files come after them."""
    port = free_port()
    settings, env, _ = preloaded(tmp_path, listen=[f"tcp://127.0.0.1:{port}"])
    env["IMPORT_LOG"] = str(tmp_path / "import.log")
    settings["env"] = [*settings["env"], "IMPORT_LOG"]
    daemon = start_daemon(settings, env=env)
    daemon.wait_ready(2)
    seen: dict[int, dict[str, Any]] = {}

    def both_answered() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(build_request("GET", "/", close=True))
            result = json.loads(read_response(sock).body)
        seen[result["pid"]] = result
        return len(seen) == 2

    wait_for(both_answered, 20, "both workers answering on the shared listener", interval=0)
    for pid, result in seen.items():
        assert result["listen_pid"] == str(pid)
        assert result["listen_fds"] == "1"
        assert result["import_log_works"] is True, result


def test_an_upgraded_daemon_forks_the_new_generation_from_a_fork_server_of_its_own(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    site = installable_copy(tmp_path / "site", "0.1.0")
    settings, env, _ = preloaded(tmp_path)
    daemon = start_daemon(settings, env={**env, "PYTHONPATH": f"{site}:{APPS}"})
    daemon.wait_ready(2)
    old_server = fork_server(daemon)
    bump(site, "0.2.0")
    result = daemon.cli("restart", "--upgrade")
    assert result.returncode == 0, result.stderr
    assert "daemon upgraded in place from 0.1.0 to 0.2.0" in result.stdout
    status = daemon.wait_ready(2)
    assert status["daemon"]["version"] == "0.2.0"
    new_server = fork_server(daemon)
    assert new_server != old_server
    # The exec closed the old fork server's channel: it exited, and the new image reaped it.
    wait_for(lambda: not psutil.pid_exists(old_server), 10, "the old fork server to be gone")
    for i in range(2):
        result_json = answer(daemon, i)
        assert result_json["imported_in"] == new_server
        assert psutil.Process(result_json["pid"]).ppid() == daemon.proc.pid


def test_a_daemon_started_after_a_crash_adopts_forked_workers(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    settings, env, _ = preloaded(tmp_path)
    first = start_daemon(settings, env=env)
    first.wait_ready(2)
    old_server = fork_server(first)
    workers = {answer(first, i)["pid"] for i in range(2)}
    try:
        first.proc.kill()
        first.proc.wait(10)
        # Its channel closed with the daemon: the fork server leaves; the workers serve on.
        wait_for(lambda: not psutil.pid_exists(old_server) or zombie(old_server), 10, "the fork server to exit")
        assert {answer(first, i)["pid"] for i in range(2)} == workers
        second = start_daemon({**settings, "tmp_dir": str(first.tmp_dir)}, env=env)
        second.wait_log(r"adopted 2 worker\(s\)")
        second.wait_ready(2)
        assert {w["pid"] for w in second.status()["workers"]} == workers
        mark = second.mark()
        os.kill(answer(second, 1)["pid"], signal.SIGKILL)
        second.wait_log(r"worker #1 .* online after", start=mark)
        second.wait_ready(2)
        replacement = answer(second, 1)
        assert replacement["imported_in"] == fork_server(second) != old_server
        assert psutil.Process(replacement["pid"]).ppid() == second.proc.pid
    finally:
        for pid in workers:  # adopted from a dead daemon: nobody's descendants, so cleaned here
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_the_fork_server_exits_with_the_daemon(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    settings, env, _ = preloaded(tmp_path)
    daemon = start_daemon(settings, env=env)
    daemon.wait_ready(2)
    server = fork_server(daemon)
    workers = {answer(daemon, i)["pid"] for i in range(2)}
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    for pid in (server, *workers):
        wait_for(functools.partial(gone, pid), 10, f"process {pid} to exit")


class Gate:
    """A daemon whose fork server (tests/apps/gated_fork_server.py) forks only when the test
    opens that request's gate; its first worker is let through and online."""

    def __init__(self, tmp_path: Path, start_daemon: DaemonFactory, **settings: Any) -> None:
        self.dir = tmp_path / "gate"
        self.dir.mkdir()
        command = [sys.executable, str(APPS / "gated_fork_server.py"), str(self.dir)]
        self.daemon = start_daemon({"command": command, "preload": True, "workers": 1, **settings})
        self.first = wait_for(lambda: next(self.dir.glob("*.waiting"), None), 20, "the first fork request")
        self.open(self.first)
        self.serving: int = self.daemon.wait_ready(1)["workers"][0]["pid"]

    def open(self, request: Path) -> None:
        (self.dir / request.stem).touch()

    def next_request(self) -> Path:
        """The fork request after the first one, once the fork server waits on it."""

        def waiting() -> Path | None:
            return next((p for p in self.dir.glob("*.waiting") if p.stem != self.first.stem), None)

        found: Path = wait_for(waiting, 20, "the next fork request")
        return found

    def forked(self, request: Path) -> str | None:
        """The pid the fork server answered with for ``request``, if it forked."""
        return _read(self.dir / f"{request.stem}.pid")


def test_a_stop_while_a_fork_is_in_flight_kills_and_reaps_the_late_worker(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """The launch is given up (the stop preempts the restart) while the fork server is still
    forking; the worker it then makes must not be left running, nor as a zombie."""
    gate = Gate(tmp_path, start_daemon)
    daemon = gate.daemon
    restart = daemon.cli_background("restart")
    held = gate.next_request()
    stop = daemon.cli("stop")
    assert stop.returncode == 0, stop.stderr
    _, restart_err = restart.communicate(timeout=30)
    assert restart.returncode != 0, restart_err
    gate.open(held)  # the fork server forks now, for a launch nobody waits for
    late = int(wait_for(lambda: gate.forked(held), 10, "the late worker's pid"))
    wait_for(lambda: not psutil.pid_exists(late), 10, "the late worker to be killed and reaped by the daemon")
    assert daemon.worker_pids() == set() or all(zombie(p) for p in daemon.worker_pids())
    assert daemon.proc.poll() is None
    assert daemon.status()["workers"] == []


def test_a_fork_past_spawn_timeout_fails_the_deploy_and_leaves_nothing_running(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    gate = Gate(tmp_path, start_daemon, spawn_timeout=1)
    daemon = gate.daemon
    restart = daemon.cli("restart")
    assert restart.returncode == 1
    assert "could not be forked within spawn_timeout (1.0s)" in restart.stderr, restart.stderr
    held = gate.next_request()
    server = int(held.stem.split("-")[0])
    gate.open(held)  # the fork goes ahead now, or the retired server was killed first
    wait_for(lambda: gone(server), 10, "the retired fork server to be gone")
    late = gate.forked(held)
    if late is not None:  # it forked before it was killed: that worker was killed and reaped
        wait_for(lambda: not psutil.pid_exists(int(late)), 10, "the late worker to be killed and reaped")
    status = daemon.status()
    assert [w["pid"] for w in status["workers"]] == [gate.serving]  # the old generation serves on
    assert {p.pid for p in daemon.worker_processes()} == {gate.serving, int(gate.first.stem.split("-")[0])}


def test_a_quit_while_a_fork_is_in_flight_waits_for_it_and_leaves_nothing_running(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """SIGTERM during a deploy cancels its launches; the daemon must not exit before the
    fork it cut short has answered and its worker is killed: nobody would manage it after."""
    gate = Gate(tmp_path, start_daemon, spawn_timeout=20)
    daemon = gate.daemon
    restart = daemon.cli_background("restart")
    held = gate.next_request()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_log(r"waiting for 1 fork\(s\) given up to answer")  # the quit is done but for it
    gate.open(held)  # the fork completes only now
    assert daemon.proc.wait(30) == 0
    restart.communicate(timeout=30)
    late = int(wait_for(lambda: gate.forked(held), 10, "the late worker's pid"))
    assert gone(late), "the worker forked for the cancelled launch outlived the daemon"


@pytest.mark.parametrize(
    ("preload", "teardown", "torn_down"),
    [(True, False, False), (True, True, True), (False, False, True)],
    ids=["forked", "forked-preload_teardown", "not-preloaded"],
)
def test_how_a_worker_ends(
    tmp_path: Path, start_daemon: DaemonFactory, preload: bool, teardown: bool, torn_down: bool
) -> None:
    """A forked worker joins its threads, runs its atexit hooks and flushes stdout, then
    exits without the interpreter's teardown, unless ``preload_teardown = true``; a worker
    that was not forked exits as any Python program does. The teardown is seen in what
    `PYTHONVERBOSE` makes it print as it frees each module (``# cleanup[2] removing``):
    nothing else it does can be observed reliably (CPython does not promise to call
    ``__del__`` at exit, and here it did not)."""
    exit_log, output, errors = tmp_path / "exit.log", tmp_path / "worker.out", tmp_path / "worker.err"
    command = [sys.executable, "-m", "sockherd.uvicorn", "exit_app:app"]
    settings = {
        "command": command,
        "cwd": str(APPS),
        "workers": 1,
        "env": ["EXIT_LOG"],
        "environment": {"PYTHONVERBOSE": "1"},
        "stdout": str(output),
        "stderr": str(errors),
        "preload": preload,
        "preload_teardown": teardown,
        "preload_spare": False,  # a spare's own imports would add to the worker's stderr
    }
    daemon = start_daemon(settings, env={"EXIT_LOG": str(exit_log)})
    status = daemon.wait_ready(1)
    (pid,) = [w["pid"] for w in status["workers"] if w["index"] == 0]
    errors.write_text("")  # from here on: the worker's exit
    result = daemon.cli("stop")
    assert result.returncode == 0, result.stderr
    steps = [line.split()[0] for line in exit_log.read_text().splitlines() if line.split()[1] == str(pid)]
    # The thread finishes 0.2 s after the shutdown, well after the server stopped: the
    # exit waited for it before the atexit hooks, as the interpreter's own exit does.
    assert steps == ["thread", "atexit"], steps
    assert f"unflushed stdout of {pid}\n" in output.read_text()
    assert ("# cleanup[2] removing" in errors.read_text()) is torn_down


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except FileNotFoundError:
        return None


def test_preload_refuses_per_worker_placeholders_in_the_command(tmp_path: Path) -> None:
    config = tmp_path / "sockherd.toml"
    config.write_text(f'command = ["app", "--bind", "{{socket}}"]\ntmp_dir = "{tmp_path}/run"\npreload = true\n')
    result = _cli("config", "-c", str(config))
    assert result.returncode == 2
    assert "key 'command': {socket} differs between workers" in result.stderr
    assert "preload = true" in result.stderr


def test_the_fork_server_variable_is_the_one_the_library_reads() -> None:
    from sockherd import preload

    assert preload.PRELOAD_FD_VAR == PRELOAD_FD_VAR


def _cli(*args: str) -> Any:
    import subprocess

    return subprocess.run([sys.executable, "-m", "sockherd", *args], capture_output=True, text=True, check=False)
