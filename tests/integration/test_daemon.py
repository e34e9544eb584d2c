"""The daemon with real worker processes, real signals and real UNIX sockets (no nginx)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import DaemonFactory
from sockherd.client import Client, CommandFailed
from support.daemon import RunningDaemon, tinyapp_command, wait_for, without_metrics
from support.http import unix_get


def ignored_signals(pid: int) -> int:
    """The SigIgn mask of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)


def published(daemon_tmp: Path, index: int) -> Path:
    return daemon_tmp / f"app.{index}.sock"


def test_workers_publish_unique_sockets_through_relative_symlinks(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    status = daemon.wait_ready(2)
    workers = {w["index"]: w for w in status["workers"]}
    for index in (0, 1):
        link = published(daemon.tmp_dir, index)
        assert stat.S_ISLNK(os.lstat(link).st_mode)
        target = os.readlink(link)
        assert "/" not in target, "symlinks are relative by default"
        assert daemon.tmp_dir / target == Path(workers[index]["socket"])
        assert stat.S_IMODE(os.stat(link).st_mode) == 0o660
        assert unix_get(str(link)).pid == workers[index]["pid"]
    assert workers[0]["socket"] != workers[1]["socket"]
    assert status["daemon"]["generation"] == 1


def test_worker_environment_is_built_from_an_allow_list(
    start_daemon: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAEMON_SECRET", "hunter2")
    monkeypatch.setenv("PASSED_ON", "yes")
    daemon = start_daemon({"command": tinyapp_command(), "env": ["PASSED_ON"], "environment": {"APP_MODE": "test"}})
    worker = daemon.wait_ready(1)["workers"][0]
    env = psutil.Process(worker["pid"]).environ()
    assert "DAEMON_SECRET" not in env
    assert env["PASSED_ON"] == "yes"
    assert env["APP_MODE"] == "test"
    assert env["SOCKHERD_SOCKET"] == worker["socket"]
    assert env["SOCKHERD_WORKER_ID"] == worker["id"]
    assert env["SOCKHERD_INDEX"] == "0"
    assert env["SOCKHERD_IPC"] == str(daemon.ipc)
    assert env["SOCKHERD_SUSPENDED"] == "0"
    assert env["NOTIFY_SOCKET"].startswith(str(daemon.tmp_dir))


def test_workers_run_in_their_own_session_with_default_signal_handling(start_daemon: DaemonFactory) -> None:
    # A daemon started from nohup or `cmd &` has SIGINT ignored; exec keeps ignored
    # signals ignored, so without a reset its workers would never stop on SIGINT.
    daemon = start_daemon({"command": tinyapp_command()})
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    assert os.getsid(pid) == pid
    ignored = ignored_signals(pid)
    assert not ignored & (1 << (signal.SIGINT - 1))
    assert not ignored & (1 << (signal.SIGHUP - 1))


def test_daemon_started_with_sigint_ignored_still_gives_workers_default_sigint(tmp_path: Path) -> None:
    from support.daemon import running_daemon

    wrapper = tmp_path / "ignoring.py"
    wrapper.write_text(
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'sockherd', *sys.argv[1:]])\n"
    )
    with running_daemon(tmp_path, {"command": tinyapp_command()}) as daemon:
        daemon.wait_ready(1)
        daemon.stop()
    # Run the same config through the wrapper.
    proc = subprocess.Popen([sys.executable, str(wrapper), "daemon", "-c", str(daemon.config_path)], cwd=tmp_path)
    try:
        from support.daemon import RunningDaemon  # noqa: F401  (same helpers, different launcher)

        client_ipc = daemon.ipc

        def worker_pid() -> int | None:
            try:
                with Client(client_ipc) as client:
                    workers = client.call("status")["workers"]
            except Exception:
                return None
            return next((w["pid"] for w in workers if w["state"] == "online"), None)

        pid = wait_for(worker_pid, 15, "a worker")
        ignored = ignored_signals(pid)
        assert not ignored & (1 << (signal.SIGINT - 1)), "the worker inherited an ignored SIGINT"
        assert not ignored & (1 << (signal.SIGHUP - 1))
    finally:
        proc.terminate()
        proc.wait(30)


def test_restart_replaces_the_generation_and_ends_the_old_one(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2, "linger": 0.05})
    old = daemon.wait_ready(2)
    old_pids = {w["pid"] for w in old["workers"]}
    result = daemon.cli("restart")
    assert result.returncode == 0, result.stderr
    new = daemon.status()
    new_pids = {w["pid"] for w in new["workers"] if w["published"]}
    assert len(new_pids) == 2 and not new_pids & old_pids
    assert new["daemon"]["generation"] == 2
    for pid in old_pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for index in (0, 1):
        assert unix_get(str(published(daemon.tmp_dir, index))).pid in new_pids


def test_sigusr2_restarts(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "linger": 0.05})
    old_pid = daemon.wait_ready(1)["workers"][0]["pid"]
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGUSR2)
    daemon.wait_log(r"generation 2 is serving", start=mark)
    assert daemon.published_pids() != {old_pid}


def test_failed_deploy_keeps_the_old_generation_serving(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    marker = tmp_path / "broken-release"
    daemon = start_daemon({"command": tinyapp_command("--fail-if-file", str(marker)), "workers": 2, "linger": 0.05})
    old_pids = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    marker.touch()
    result = daemon.cli("restart", "--max-attempts", "2")
    assert result.returncode == 1
    assert "exited with status 1 before it reported ready" in result.stderr
    assert "crashing at start-up on purpose" in daemon.log
    status = daemon.status()
    assert {w["pid"] for w in status["workers"]} == old_pids, "the failed generation was torn down"
    assert status["daemon"]["generation"] == 1
    for index in (0, 1):
        assert unix_get(str(published(daemon.tmp_dir, index))).pid in old_pids
    # Died before ready is a failed start: max_attempts tries per slot, no respawn loop.
    assert daemon.log.count("failed to start (attempt") == 4 or "attempt 2/2" in result.stderr
    marker.unlink()
    result = daemon.cli("restart")
    assert result.returncode == 0, result.stderr
    new_pids = daemon.published_pids()
    assert not new_pids & old_pids
    wait_for(lambda: not any(psutil.pid_exists(p) for p in old_pids), 10, "old workers to be gone")


def test_failed_start_output_lines_are_reported(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    marker = tmp_path / "broken-release"
    log_file = tmp_path / "app.log"
    daemon = start_daemon(
        {"command": tinyapp_command("--fail-if-file", str(marker)), "stderr": str(log_file), "linger": 0.05}
    )
    daemon.wait_ready(1)
    marker.touch()
    result = daemon.cli("restart")
    assert result.returncode == 1
    assert "| tinyapp: crashing at start-up on purpose" in result.stderr


def test_a_worker_that_never_reports_ready_times_out(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = start_daemon({"command": tinyapp_command("--ready", "none"), "online_timeout": 0.5}, "--no-start")
    wait_for(daemon.ipc.exists, 10, "the IPC socket")
    started = time.monotonic()
    result = daemon.cli("start")
    assert result.returncode == 1
    assert "did not report ready within online_timeout (0.5s)" in result.stderr
    assert time.monotonic() - started < 5
    assert daemon.status()["workers"] == []


def test_socket_readiness_for_servers_without_the_library(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command("--ready", "none", "--start-delay", "0.3"), "ready": "socket"})
    worker = daemon.wait_ready(1)["workers"][0]
    assert unix_get(str(published(daemon.tmp_dir, 0))).pid == worker["pid"]


def test_a_crashed_worker_is_replaced_and_republished(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    status = daemon.wait_ready(2)
    victim = next(w for w in status["workers"] if w["index"] == 0)
    mark = daemon.mark()
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    daemon.wait_log(r"published worker #0 .* as app\.0\.sock", start=mark)
    replaced_in = time.monotonic() - killed_at
    response = unix_get(str(published(daemon.tmp_dir, 0)))
    assert response.pid != victim["pid"]
    after = daemon.status()
    replacement = next(w for w in after["workers"] if w["index"] == 0)
    assert replacement["restarts"] == 1
    assert replaced_in < 5


def test_crash_loop_backs_off(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    marker = tmp_path / "broken"
    daemon = start_daemon({"command": tinyapp_command("--fail-if-file", str(marker))})
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    marker.touch()
    mark = daemon.mark()
    os.kill(pid, signal.SIGKILL)
    daemon.wait_log(r"crash loop \(3 in a row\); next attempt in 0\.2s", start=mark)
    status = daemon.status()
    assert status["slots"][0]["crash_loop"] >= 3
    spawned = sum("spawned" in line for line in daemon.lines[mark:])
    assert spawned <= 4, "backoff, not a fork loop"
    marker.unlink()
    daemon.wait_log(r"published worker #0", start=mark, timeout=20)


def test_stop_ladder_escalates_to_sigkill_for_a_worker_ignoring_sigterm(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon(
        {"command": tinyapp_command("--ignore-term"), "shutdown_timeout": 0.3, "kill_timeout": 0.3, "linger": 0}
    )
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    started = time.monotonic()
    result = daemon.cli("stop")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 5
    assert not psutil.pid_exists(pid)
    daemon.wait_log(r"still running 0\.3s after SIGTERM: sending SIGTERM")
    daemon.wait_log(r"ignored SIGTERM for 0\.3s: sending SIGKILL")


def test_stop_ladder_kills_a_worker_that_hangs_in_shutdown(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon(
        {"command": tinyapp_command("--hang-on-shutdown"), "shutdown_timeout": 0.2, "kill_timeout": 0.2, "linger": 0}
    )
    pid = daemon.wait_ready(1)["workers"][0]["pid"]
    assert daemon.cli("terminate").returncode == 0
    assert daemon.proc.wait(10) == 0
    assert not psutil.pid_exists(pid)


def test_sigterm_quits_gracefully_and_cleans_tmp_dir(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2, "linger": 0.05})
    pids = [w["pid"] for w in daemon.wait_ready(2)["workers"]]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert sorted(os.listdir(daemon.tmp_dir)) == []


def _swap_to_stop(daemon: RunningDaemon, mark: int, old_pid: int) -> float:
    """Seconds from the symlink's move to the old worker's stop, from the daemon's log."""
    swapped: list[float] = []
    stopped: list[float] = []
    for line in daemon.lines[mark:]:
        stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
        if "published worker #0" in line:
            swapped.append(stamp)
        if f"pid {old_pid}) stopping: sent" in line:
            stopped.append(stamp)
    assert swapped and stopped
    return stopped[0] - swapped[0]


@contextlib.contextmanager
def _restart_while_a_connection_waits(daemon: RunningDaemon) -> Iterator[tuple[int, int]]:
    """A restart whose old worker is frozen with a connection in its queue (nginx
    connected just before the swap, and the worker cannot accept it), held until the
    daemon has sent the old worker its stop: yields (old pid, log mark of the restart).
    On leaving, the worker runs again and the restart must succeed."""
    old = daemon.status()["workers"][0]
    os.kill(old["pid"], signal.SIGSTOP)
    waiting = socket.socket(socket.AF_UNIX)
    try:
        waiting.connect(old["socket"])  # queued: the frozen worker cannot accept it
        mark = daemon.mark()
        restart = daemon.cli_background("restart")
        daemon.wait_log(rf"pid {old['pid']}\) stopping: sent", start=mark)
        yield old["pid"], mark
    finally:
        os.kill(old["pid"], signal.SIGCONT)
        waiting.close()
    restart.communicate(timeout=30)
    assert restart.returncode == 0


def test_the_linger_lasts_while_the_old_socket_has_connections_waiting(start_daemon: DaemonFactory) -> None:
    """After the swap, the old worker's stop waits until its listen queue has been empty
    for a moment, `linger` at most: with nothing queued it does not wait the whole linger;
    with a connection waiting (the worker frozen, so it cannot accept) it waits it all."""
    daemon = start_daemon({"command": tinyapp_command(), "linger": 3.0})
    old_pid = daemon.wait_ready(1)["workers"][0]["pid"]
    mark = daemon.mark()
    assert daemon.cli("restart").returncode == 0
    assert _swap_to_stop(daemon, mark, old_pid) < 1.5  # nothing queued: no 3 s wait

    with _restart_while_a_connection_waits(daemon) as (old_pid, mark):
        assert _swap_to_stop(daemon, mark, old_pid) >= 2.9


def test_the_shutdown_message_says_whether_the_linger_saw_the_queue_empty(start_daemon: DaemonFactory) -> None:
    """`backlog_drained` in the shutdown message: true when the old socket's queue was seen
    empty after the swap (sockherd's servers then close their listener at once), false
    when the linger ran out with a connection still waiting (they keep accepting)."""
    daemon = start_daemon({"command": tinyapp_command("--ready", "library"), "linger": 1.0})
    old_pid = daemon.wait_ready(1)["workers"][0]["pid"]
    mark = daemon.mark()
    assert daemon.cli("restart").returncode == 0
    daemon.wait_log(rf"tinyapp {old_pid}: shutdown message, backlog drained: True", start=mark)

    with _restart_while_a_connection_waits(daemon) as (old_pid, mark):
        pass  # stopped with the connection still queued: the linger ran out
    daemon.wait_log(rf"tinyapp {old_pid}: shutdown message, backlog drained: False", start=mark)


def test_concurrent_deploys_get_busy_and_stop_preempts_a_restart(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command("--start-delay", "3"), "online_timeout": 20}, "--no-start")
    wait_for(daemon.ipc.exists, 10, "the IPC socket")
    first = subprocess.Popen(
        [sys.executable, "-m", "sockherd", "start", "-c", str(daemon.config_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: daemon.status()["daemon"]["operation"] == "start", 10, "the start to begin")
    second = daemon.cli("restart")
    assert second.returncode == 1
    assert "busy: a start is in progress" in second.stderr
    stopped = daemon.cli("stop")
    assert stopped.returncode == 0
    _, err = first.communicate(timeout=10)
    assert first.returncode == 1
    assert "interrupted by a stop" in err
    assert daemon.status()["workers"] == []


def test_ipc_socket_is_owner_only(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command()})
    daemon.wait_ready(1)
    assert stat.S_IMODE(os.stat(daemon.ipc).st_mode) == 0o600


def _raw_ipc(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_garbage_and_oversized_frames_close_only_that_connection(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command()})
    before = daemon.wait_ready(1)
    bystander = daemon.client()
    for junk in (b"\x00\xff garbage\n", b"[1,2,3]\n", b'{"no_type": 1}\n', b'{"type": "status", "id": 1}\n'):
        with _raw_ipc(daemon.ipc) as sock:
            sock.sendall(junk)
            assert _closed(sock)
    with _raw_ipc(daemon.ipc) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"x" * (1 << 20) + b"y" * 4096)
        assert _closed(sock)
    with pytest.raises(CommandFailed, match="unknown request type 'format-disk'"):
        bystander.call("format-disk", {"really": True})
    assert without_metrics(bystander.call("status")["workers"]) == without_metrics(before["workers"])
    bystander.close()
    assert daemon.proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_another_uid_cannot_use_the_ipc_socket(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command()})
    daemon.wait_ready(1)
    probe = str(Path(__file__).resolve().parents[1] / "apps" / "ipc_probe.py")
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, probe]
    out = subprocess.run([*as_nobody, str(daemon.ipc)], capture_output=True, text=True, check=False, timeout=30)
    assert out.stdout.strip() == "denied", out
    # Even with the file mode opened up, SO_PEERCRED refuses the other uid.
    os.chmod(daemon.tmp_dir, 0o755)
    os.chmod(daemon.ipc, 0o666)
    out = subprocess.run([*as_nobody, str(daemon.ipc)], capture_output=True, text=True, check=False, timeout=30)
    assert out.stdout.strip() == "answer: b''", out
    assert "refused a connection from uid" in daemon.log
    assert daemon.proc.poll() is None


def test_sweep_removes_stale_entries_and_nothing_else(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    from support.daemon import short_tmp_dir

    tmp_dir = short_tmp_dir()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_dir / "app.0-abcdef.sock"))
    stale.close()  # a socket file nobody listens on
    os.symlink("app.0-abcdef.sock", tmp_dir / "app.0.sock")
    os.symlink("app.9-123456.sock", tmp_dir / ".app.0.sock.deadbeef")  # a crash mid-swap
    os.symlink(str(outside), tmp_dir / "app.1.sock")  # points outside tmp_dir
    (tmp_dir / "notes.txt").write_text("not ours")
    daemon = start_daemon({"command": tinyapp_command(), "tmp_dir": str(tmp_dir), "workers": 2})
    daemon.wait_ready(2)
    names = set(os.listdir(tmp_dir))
    assert "app.0-abcdef.sock" not in names
    assert ".app.0.sock.deadbeef" not in names
    assert "notes.txt" in names
    assert outside.read_text() == "keep me"
    assert not os.readlink(tmp_dir / "app.1.sock").startswith("/")


def test_a_second_daemon_on_the_same_tmp_dir_is_refused(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command()})
    daemon.wait_ready(1)
    result = daemon.cli("daemon")
    assert result.returncode == 1
    assert "another sockherd daemon is already running" in result.stderr


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "sockherd.toml"
    config.write_text('command = ["x"]\ntmp_dir = "/tmp/' + "d" * 100 + '"\n')
    result = subprocess.run(
        [sys.executable, "-m", "sockherd", "daemon", "-c", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "sockherd.toml" in result.stderr and "tmp_dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_table_and_json(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    table = daemon.cli("status").stdout
    assert "ID" in table and "app.0.sock" in table and "online" in table
    import json

    data = json.loads(daemon.cli("status", "--json").stdout)
    for field in ("id", "pid", "index", "state", "socket", "started_at", "restarts"):
        assert field in data["workers"][0]
    assert {"daemon", "workers"} <= set(data)


def _listen_backlog(path: str) -> int:
    """Send-Q of a listening UNIX socket in `ss` is its listen() backlog."""
    out = subprocess.run(["ss", "-xlH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if path in fields:
            return int(fields[3])
    raise AssertionError(f"{path} is not a listening socket:\n{out}")


def test_worker_sockets_listen_with_the_configured_backlog(start_daemon: DaemonFactory) -> None:
    # Python's default listen() backlog is 100; a full UNIX backlog makes nginx fail at
    # once with EAGAIN (puma #1449), so the library passes the configured one.
    example = Path(__file__).resolve().parents[2] / "examples" / "hello"
    command = [sys.executable, "-m", "sockherd.uvicorn", "hello:app"]
    daemon = start_daemon({"command": command, "cwd": str(example), "backlog": 777})
    worker = daemon.wait_ready(1, timeout=30)["workers"][0]
    assert _listen_backlog(worker["socket"]) == 777
    assert worker["integrated"], "the library connected to the daemon"


def test_default_backlog_is_somaxconn(tmp_path: Path) -> None:
    from sockherd.config import load_config

    (tmp_path / "sockherd.toml").write_text('command = ["x"]\ntmp_dir = "/tmp/sh-x"\n')
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert load_config(tmp_path / "sockherd.toml").worker.backlog == somaxconn


def test_a_worker_that_served_a_while_is_replaced_at_once_every_time(start_daemon: DaemonFactory) -> None:
    """Only a tight loop backs off: killed every few seconds, a slot keeps coming back at once."""
    daemon = start_daemon({"command": tinyapp_command()})
    daemon.wait_ready(1)
    for _ in range(3):
        worker = daemon.status()["workers"][0]
        online_at: float = worker["online_at"]
        wait_for(lambda: time.time() - online_at > 1.1, 5, "the worker to serve for a second")  # noqa: B023
        mark = daemon.mark()
        os.kill(worker["pid"], signal.SIGKILL)
        daemon.wait_log(r"published worker #0", start=mark)
        assert not any("crash loop" in line for line in daemon.lines[mark:])


def test_an_unusable_log_file_is_named_and_leaves_nothing_behind(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = start_daemon(
        {"command": tinyapp_command(), "stderr": str(tmp_path / "missing-dir" / "app.log")}, "--no-start"
    )
    wait_for(daemon.ipc.exists, 10, "the IPC socket")
    result = daemon.cli("start", "--max-attempts", "2")
    assert result.returncode == 1
    assert (
        f"cannot open its log file {tmp_path / 'missing-dir' / 'app.log'}: No such file or directory" in result.stderr
    )
    assert daemon.status()["workers"] == [], "workers that never ran leave no dead rows behind"


def test_a_command_that_cannot_be_executed(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon({"command": ["/nonexistent/server", "{socket}"]}, "--no-start")
    wait_for(daemon.ipc.exists, 10, "the IPC socket")
    result = daemon.cli("start")
    assert result.returncode == 1
    assert "could not execute '/nonexistent/server'" in result.stderr
    assert daemon.status()["workers"] == []
