"""Shared listeners (`listen`): one socket for every worker, owned by the daemon.

Real daemons, real workers (the uvicorn runner, unmodified gunicorn and uvicorn, the
echo example), real TCP and UNIX sockets under concurrent load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import DaemonFactory
from support.daemon import REPO, bump, installable_copy, wait_for
from support.http import LoadGenerator, tcp_get, unix_get
from support.nginx import free_port

APPS = REPO / "tests" / "apps"
ECHO = REPO / "examples" / "echo"
BIN = Path(sys.executable).parent
RUNNER = [sys.executable, "-m", "sockherd.uvicorn", "asgi_app:app"]
GUNICORN = [str(BIN / "gunicorn"), "--workers", "2", "--worker-class", "gthread", "--keep-alive", "75"]
GUNICORN += ["--no-control-socket", "--graceful-timeout", "10", "wsgi_app:app"]


def listening(port: int, **settings: Any) -> dict[str, Any]:
    return {"command": RUNNER, "cwd": str(APPS), "workers": 2, "listen": [f"tcp://127.0.0.1:{port}"], **settings}


def socket_inodes(pid: int) -> dict[int, int]:
    """fd -> socket inode, for every socket ``pid`` holds."""
    found = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(entry)] = int(target[8:-1])
    return found


def listener_inode(daemon: Any) -> int:
    recorded = daemon.state_file()["listeners"]
    assert len(recorded) == 1
    inode: int = recorded[0]["inode"]
    return inode


def test_a_worker_gets_the_listeners_as_systemd_hands_them_on(start_daemon: DaemonFactory) -> None:
    port = free_port()
    # A descriptor the daemon inherited open (a leaky parent's): posix_spawn passes every
    # descriptor that is not close-on-exec, so the daemon must mark it at start-up.
    leaked, other_end = socket.socketpair()
    leaked.set_inheritable(True)
    daemon = start_daemon(listening(port, workers=1), pass_fds=(leaked.fileno(),))
    leaked_inode = os.fstat(leaked.fileno()).st_ino
    status = daemon.wait_ready(1)
    assert status["daemon"]["listeners"] == [f"tcp://127.0.0.1:{port}"]
    (row,) = status["workers"]
    pid = row["pid"]
    env = psutil.Process(pid).environ()
    assert env["LISTEN_PID"] == str(pid)  # its own pid: the shim's, kept by the exec
    assert (env["LISTEN_FDS"], env["LISTEN_FDNAMES"]) == ("1", f"tcp-127.0.0.1-{port}")
    assert "SOCKHERD_SOCKET" not in env
    assert socket_inodes(pid)[3] == listener_inode(daemon)
    # Nothing else of the daemon's crossed into the worker (posix_spawn closes only
    # close-on-exec descriptors): not its IPC listener, not its notify socket.
    daemon_sockets = set(socket_inodes(daemon.proc.pid).values()) - {listener_inode(daemon)}
    assert leaked_inode in daemon_sockets
    assert not daemon_sockets & set(socket_inodes(pid).values())
    leaked.close()
    other_end.close()
    assert row["symlink"] is None and row["socket"] is None
    assert not list(daemon.tmp_dir.glob("app.*"))  # no per-worker sockets, no symlinks
    assert tcp_get(port, "/").pid == pid


@pytest.mark.parametrize("server", ["runner", "gunicorn"])
def test_restarts_under_keepalive_load_on_a_tcp_port_fail_nothing(start_daemon: DaemonFactory, server: str) -> None:
    port = free_port()
    command = RUNNER if server == "runner" else GUNICORN
    daemon = start_daemon(listening(port, command=command))
    daemon.wait_ready(2, timeout=30)
    inode = listener_inode(daemon)
    with LoadGenerator(port, concurrency=16) as load:
        load.wait_requests(200)
        for _ in range(4):
            before = daemon.published_pids()
            restart = daemon.cli("restart")
            assert restart.returncode == 0, restart.stderr
            assert not before & daemon.published_pids()
            load.wait_requests(200)
    result = load.result
    assert result.failures == [], result.failures[:5]
    assert result.methods["POST"] > 0 and result.total > 1000
    assert listener_inode(daemon) == inode  # one socket for the daemon's whole life


@pytest.mark.parametrize("base", ["asyncio", "threaded"])
def test_echo_clients_through_restarts_are_never_refused_or_cut(start_daemon: DaemonFactory, base: str) -> None:
    """The bundled echo example (asyncio streams), and the same on the threaded base."""
    port = free_port()
    command, cwd = (
        ([sys.executable, "echo.py"], ECHO) if base == "asyncio" else ([sys.executable, "threaded_echo.py"], APPS)
    )
    daemon = start_daemon({"command": command, "cwd": str(cwd), "workers": 2, "listen": [f"tcp://127.0.0.1:{port}"]})
    daemon.wait_ready(2)
    stop = threading.Event()
    errors: list[str] = []
    sessions = [0]

    async def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                greeting = await asyncio.wait_for(reader.readline(), 10)
                if not greeting.startswith(b"hello from worker"):
                    errors.append(f"greeting {greeting!r}")
                for k in range(3):
                    line = f"client {n} session {i} line {k}\n".encode()
                    writer.write(line)
                    await writer.drain()
                    echoed = await asyncio.wait_for(reader.readline(), 10)
                    if echoed != line:
                        errors.append(f"sent {line!r}, got {echoed!r}")
                writer.close()
                await writer.wait_closed()
                sessions[0] += 1
            except (OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    def run() -> None:
        async def main() -> None:
            await asyncio.gather(*(client(n) for n in range(16)))

        asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: sessions[0] > 50, 10, "echo sessions")
        for _ in range(4):
            before = daemon.published_pids()
            assert daemon.cli("restart").returncode == 0
            assert not before & daemon.published_pids()
            done = sessions[0]
            wait_for(lambda done=done: sessions[0] > done + 50, 10, "echo sessions after the restart")  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(30)
    assert errors == [], errors[:5]
    assert sessions[0] > 250


def test_a_unix_listener_is_created_with_the_mode_and_removed_at_exit(
    start_daemon: DaemonFactory, tmp_dir: Path
) -> None:
    path = tmp_dir / "shared.sock"
    daemon = start_daemon(listening(0, listen=[f"unix://{path}"], socket_mode=0o660, workers=1))
    daemon.wait_ready(1)
    assert oct(path.stat().st_mode & 0o777) == oct(0o660)
    assert unix_get(str(path), "/").status == 200
    daemon.cli("terminate")
    assert daemon.proc.wait(20) == 0
    assert not path.exists()


def test_a_unix_listener_path_in_use_or_not_a_socket_is_refused(start_daemon: DaemonFactory, tmp_dir: Path) -> None:
    from support.daemon import run_daemon_once, write_config

    planted = tmp_dir / "file.sock"
    planted.write_text("mine")
    config = write_config(
        tmp_dir / "a.toml",
        {"command": RUNNER, "tmp_dir": str(tmp_dir / "run"), "listen": [f"unix://{planted}"]},
    )
    result = run_daemon_once(config)
    assert result.returncode != 0
    assert f"unix://{planted} exists and is not a socket; refusing to touch it" in result.stderr
    assert planted.read_text() == "mine"

    live = tmp_dir / "live.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(live))
    holder.listen()
    try:
        write_config(config, {"command": RUNNER, "tmp_dir": str(tmp_dir / "run"), "listen": [f"unix://{live}"]})
        result = run_daemon_once(config)
        assert "something already accepts connections on" in result.stderr
    finally:
        holder.close()
    # Now stale (nobody accepts): replaced.
    daemon = start_daemon(listening(0, listen=[f"unix://{live}"], workers=1))
    daemon.wait_ready(1)
    daemon.wait_log(r"removed the stale socket")
    assert unix_get(str(live), "/").status == 200


def test_a_tcp_port_in_use_is_refused_naming_the_way_to_find_out(tmp_dir: Path) -> None:
    from support.daemon import run_daemon_once, write_config

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write_config(
            tmp_dir / "a.toml",
            {"command": RUNNER, "tmp_dir": str(tmp_dir / "run"), "listen": [f"tcp://127.0.0.1:{port}"]},
        )
        result = run_daemon_once(config)
    assert result.returncode != 0
    assert f"listen: cannot bind tcp://127.0.0.1:{port}: Address already in use" in result.stderr
    assert "ss -ltnp" in result.stderr


def test_a_killed_daemon_takes_the_very_listener_back_under_load(start_daemon: DaemonFactory) -> None:
    """After SIGKILL the listener lives on in the workers; the next daemon copies it out
    of one (pidfd_getfd) instead of binding anew, so nothing queued meanwhile is lost."""
    port = free_port()
    settings = listening(port)
    daemon = start_daemon(settings)
    pids = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    inode = listener_inode(daemon)
    with LoadGenerator(port, concurrency=16) as load:
        load.wait_requests(100)
        daemon.proc.kill()
        daemon.proc.wait()
        load.wait_requests(100)  # the workers serve on without their daemon
        again = start_daemon({**settings, "tmp_dir": str(daemon.tmp_dir)})
        again.wait_log(r"listening on tcp://127.0.0.1:\d+ \(taken back from a running worker\)")
        assert {w["pid"] for w in again.wait_ready(2)["workers"]} == pids
        assert listener_inode(again) == inode
        assert again.cli("restart").returncode == 0
        assert not pids & again.published_pids()
        load.wait_requests(200)
    assert load.result.failures == [], load.result.failures[:5]


def test_restart_upgrade_keeps_the_listener(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    site = installable_copy(tmp_path / "site", "0.1.0")
    port = free_port()
    daemon = start_daemon(listening(port), env={"PYTHONPATH": str(site)})
    daemon.wait_ready(2)
    inode = listener_inode(daemon)
    bump(site, "0.2.0")
    with LoadGenerator(port, concurrency=8) as load:
        load.wait_requests(100)
        result = daemon.cli("restart", "--upgrade")
        assert result.returncode == 0, result.stderr
        after = daemon.wait_ready(2)
        load.wait_requests(100)
    assert after["daemon"]["version"] == "0.2.0" and after["daemon"]["pid"] == daemon.proc.pid
    assert listener_inode(daemon) == inode
    daemon.wait_log(r"listening on tcp://127.0.0.1:\d+ \(kept across the upgrade\)")
    assert load.result.failures == [], load.result.failures[:5]


def test_socket_activation_serves_on_the_activated_socket_and_survives_a_restart(tmp_path: Path, tmp_dir: Path) -> None:
    from support.daemon import write_config

    port = free_port()
    config = write_config(tmp_path / "sockherd.toml", {**listening(port), "listen": [], "tmp_dir": str(tmp_dir)})
    activator = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            sys.executable,
            "-m",
            "sockherd",
            "daemon",
            "-c",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cli = [sys.executable, "-m", "sockherd", "-c", str(config)]
    assert activator.stdout is not None
    output = activator.stdout.readline()  # "Listening on 127.0.0.1:PORT as 3.": bound, not yet started
    try:
        assert "Listening on" in output, output
        # systemd-socket-activate starts the daemon on the first connection: this one.
        assert tcp_get(port, "/", timeout=30).status == 200
        status = subprocess.run([*cli[:3], "status", "--json", *cli[3:]], capture_output=True, text=True, check=True)
        assert f"tcp://127.0.0.1:{port}" in status.stdout

        def started() -> bool:
            # One worker answering on the shared socket does not mean the start is over.
            result = subprocess.run(
                [*cli[:3], "status", "--json", *cli[3:]], capture_output=True, text=True, check=False
            )
            return result.returncode == 0 and json.loads(result.stdout)["daemon"]["operation"] is None

        wait_for(started, 30, "the first start to finish")
        assert subprocess.run([*cli[:3], "restart", *cli[3:]], capture_output=True, check=False).returncode == 0
        assert tcp_get(port, "/").status == 200
        subprocess.run([*cli[:3], "terminate", *cli[3:]], capture_output=True, check=False)
        output += activator.communicate(timeout=30)[0]
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
    assert f"listening on tcp://127.0.0.1:{port} (from systemd socket activation)" in output


def test_ready_socket_with_plain_uvicorn_on_fd_3(start_daemon: DaemonFactory) -> None:
    """An unmodified server that never reports: online once it waits on the listener."""
    port = free_port()
    plain = [sys.executable, "-m", "uvicorn", "--fd", "3", "--timeout-graceful-shutdown", "5", "plain_asgi:app"]
    daemon = start_daemon(listening(port, command=plain, ready="socket"))
    before = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    assert tcp_get(port, "/").status == 200
    assert daemon.cli("restart").returncode == 0
    assert not before & daemon.published_pids()
    assert tcp_get(port, "/").status == 200


def test_ready_socket_sees_a_server_blocked_in_accept(start_daemon: DaemonFactory) -> None:
    """No event loop at all: a thread blocked in accept(2) on the listener counts too."""
    port = free_port()
    blocking = [sys.executable, "blocking_accept.py"]
    daemon = start_daemon(listening(port, command=blocking, ready="socket", workers=1))
    daemon.wait_ready(1)
    assert tcp_get(port, "/").body == b"ok"


def test_a_worker_that_never_accepts_fails_its_start_with_what_it_did_not_do(start_daemon: DaemonFactory) -> None:
    port = free_port()
    never = [sys.executable, "-c", "import time; time.sleep(60)"]
    daemon = start_daemon(listening(port, command=never, ready="socket", online_timeout=1, workers=1), "--no-start")
    daemon.wait_log(r"daemon .* ready")
    result = daemon.cli("start")
    assert result.returncode == 1
    assert "did not wait for connections on the shared listeners within online_timeout (1.0s)" in result.stderr


def test_standby_is_refused_at_runtime_too(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon(listening(free_port(), workers=1))
    daemon.wait_ready(1)
    result = daemon.cli("set-standby", "1")
    assert result.returncode == 1
    assert "standby workers need per-worker sockets" in result.stderr


def test_the_pidfile_names_the_daemon_while_it_runs(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    daemon = start_daemon(listening(free_port(), workers=1, pidfile=str(pidfile)))
    daemon.wait_ready(1)
    assert pidfile.read_text() == f"{daemon.proc.pid}\n"
    daemon.cli("terminate")
    assert daemon.proc.wait(20) == 0
    assert not pidfile.exists()


@pytest.mark.parametrize("app", ["echo.py", "threaded_echo.py"])
def test_the_socket_server_base_serves_a_worker_socket_too(start_daemon: DaemonFactory, app: str) -> None:
    """Without `listen`, the same server binds the worker's own socket behind a symlink."""
    cwd = ECHO if app == "echo.py" else APPS
    daemon = start_daemon({"command": [sys.executable, app], "cwd": str(cwd), "workers": 1})
    daemon.wait_ready(1)
    for _ in range(2):
        with socket.socket(socket.AF_UNIX) as conn, contextlib.closing(conn.makefile("rwb")) as lines:
            conn.connect(str(daemon.tmp_dir / "app.0.sock"))
            assert lines.readline().startswith(b"hello from worker 0-")
            lines.write(b"ping\n")
            lines.flush()
            assert lines.readline() == b"ping\n"
        assert daemon.cli("restart").returncode == 0


def test_a_failed_deploy_leaves_the_old_generation_serving_the_same_socket(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    port = free_port()
    release = tmp_path / "release"
    release.write_text("1")
    daemon = start_daemon(listening(port, environment={"RELEASE_FILE": str(release)}))
    pids = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    release.unlink()  # the new code cannot start: asgi_app reads the marker at import
    with LoadGenerator(port, concurrency=8) as load:
        load.wait_requests(100)
        result = daemon.cli("restart")
        load.wait_requests(100)
    assert result.returncode == 1
    assert "restart failed" in result.stderr
    assert daemon.published_pids() == pids
    assert load.result.failures == [], load.result.failures[:5]
    assert set(load.result.pids) <= pids


def test_a_suspended_restart_holds_requests_on_the_shared_socket_until_resume(start_daemon: DaemonFactory) -> None:
    port = free_port()
    daemon = start_daemon(listening(port))
    old = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    result = daemon.cli("restart", "--suspended")
    assert result.returncode == 0, result.stderr
    new = daemon.published_pids()
    assert not old & new
    held: list[Any] = []
    thread = threading.Thread(target=lambda: held.append(tcp_get(port, "/", timeout=30)))
    thread.start()
    thread.join(1.0)
    assert thread.is_alive(), "the request was answered before resume"
    assert daemon.cli("resume").returncode == 0
    thread.join(10)
    assert held and held[0].status == 200 and held[0].pid in new


def test_recycling_by_age_on_a_shared_listener_fails_nothing(start_daemon: DaemonFactory) -> None:
    port = free_port()
    daemon = start_daemon(listening(port, max_age=1.5))
    first = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    with LoadGenerator(port, concurrency=8) as load:
        wait_for(lambda: not first & daemon.published_pids(), 20, "both workers recycled")
        load.wait_requests(100)
    assert load.result.failures == [], load.result.failures[:5]
    daemon.wait_log(r"max_age")
