"""The spare fork server: the next deploy's preload process, started between deploys.

Real daemons; each test first waits until the spare is warm (status shows its pid),
then deploys, and tells from the fork server's pid and the workers' answers whether the
deploy took the spare or started afresh, and what code the workers run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
from pathlib import Path

import psutil

from conftest import DaemonFactory
from sockherd import preload
from sockherd.daemon.forkserver import SPARE_VAR
from support.daemon import RunningDaemon, wait_for, write_config
from support.preloaded import APPS, answer, flip, fork_server, fork_servers, gone, preloaded, start_preloaded


def warm_spare(daemon: RunningDaemon) -> int:
    """The pid of the daemon's spare fork server, once it is warm."""
    pid: int = wait_for(lambda: daemon.status()["daemon"]["preload_spare"], 30, "a warm spare")
    return pid


def test_a_deploy_takes_the_warm_spare_and_imports_the_new_release_in_it(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    daemon, release = start_preloaded(start_daemon, tmp_path)
    first_server = fork_server(daemon)
    spare = warm_spare(daemon)
    assert spare != first_server
    release.write_text("2")  # new code on disk after the spare started: it has not imported the app yet
    mark = daemon.mark()
    assert daemon.cli("restart").returncode == 0
    daemon.wait_log(rf"fork server pid {spare} ready \(a spare", start=mark)
    assert list(fork_servers(daemon).values()) == [spare]
    for i in range(2):
        result = answer(daemon, i)
        assert (result["release"], result["imported_in"]) == ("2", spare)
    assert warm_spare(daemon) not in (spare, first_server)  # the next deploy's, started once this one ended


def test_a_spare_whose_loaded_files_changed_is_not_used(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    """An upgraded package under the spare (here a module it imported before its warm point,
    standing in for uvicorn after `pip install -U`): the deploy starts a fork server afresh."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "server_dependency.py").write_text("VERSION = 1\n")
    command = [sys.executable, "-c", "import server_dependency, sockherd.uvicorn; sockherd.uvicorn.main()"]
    settings, env, release = preloaded(tmp_path, command=[*command, "preload_app:app"])
    daemon = start_daemon({**settings, "environment": {"PYTHONPATH": str(lib)}}, env=env)
    daemon.wait_ready(2)
    spare = warm_spare(daemon)
    (lib / "server_dependency.py").write_text("VERSION = 2  # upgraded\n")
    release.write_text("2")
    mark = daemon.mark()
    assert daemon.cli("restart").returncode == 0
    daemon.wait_log(rf"spare preload process pid {spare} not used \(.*server_dependency.py changed\)", start=mark)
    server = fork_server(daemon)
    assert server != spare
    wait_for(functools.partial(gone, spare), 10, "the stale spare to exit")
    for i in range(2):
        result = answer(daemon, i)
        assert (result["release"], result["imported_in"]) == ("2", server)


def test_a_spare_started_in_another_release_directory_is_not_used(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    """`cwd` through a `current` symlink that a deploy flips to the next release: the spare
    started in the old directory (its sys.path, usually its virtualenv) must not serve it."""
    releases = [tmp_path / "releases" / name for name in ("r1", "r2")]
    for directory in releases:
        directory.mkdir(parents=True)
        shutil.copy(APPS / "preload_app.py", directory)
    current = tmp_path / "current"
    current.symlink_to(releases[0])
    settings, env, _ = preloaded(tmp_path, cwd=str(current))
    daemon = start_daemon(settings, env=env)
    daemon.wait_ready(2)
    assert answer(daemon, 0)["module_file"] == str(releases[0] / "preload_app.py")
    spare = warm_spare(daemon)
    flip(current, releases[1])
    mark = daemon.mark()
    assert daemon.cli("restart").returncode == 0
    daemon.wait_log(rf"spare preload process pid {spare} not used \(the working directory is now", start=mark)
    for i in range(2):
        assert answer(daemon, i)["module_file"] == str(releases[1] / "preload_app.py")


def test_a_release_that_fails_to_import_in_the_spare_fails_the_deploy_with_its_traceback(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    log = tmp_path / "workers.log"
    settings, env, release = preloaded(tmp_path, stderr=str(log))
    daemon = start_daemon(settings, env=env)
    old = {w["pid"] for w in daemon.wait_ready(2)["workers"]}
    spare = warm_spare(daemon)
    release.write_text("broken")
    result = daemon.cli("restart")
    assert result.returncode != 0
    assert "could not be forked: its preload process exited with status 1" in result.stderr
    assert "release 'broken' does not import" in result.stderr  # the log's last lines, from the spare
    wait_for(functools.partial(gone, spare), 10, "the spare that failed to import to be gone")
    assert {w["pid"] for w in daemon.status()["workers"]} == old  # the old generation serves on
    release.write_text("3")
    assert daemon.cli("restart").returncode == 0
    assert answer(daemon, 0)["release"] == "3"


def test_the_spare_exits_with_the_daemon(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    daemon, _ = start_preloaded(start_daemon, tmp_path)
    spare = warm_spare(daemon)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    wait_for(functools.partial(gone, spare), 10, "the spare to exit")


def test_no_spare_for_a_program_without_a_warm_point(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    """A program that calls only fork_point says so when ready: the daemon starts no spare
    (a spare of it would import the whole app between deploys)."""
    command = [
        sys.executable,
        "-c",
        "from sockherd import preload; import preload_app; preload.fork_point(); "
        "import sockherd.uvicorn; sockherd.uvicorn.run(preload_app.app)",
    ]
    daemon, _ = start_preloaded(start_daemon, tmp_path, command=command)
    result = answer(daemon, 0)
    assert result["imported_in"] != result["pid"]  # forked from a fork server: it is preloaded
    assert daemon.cli("restart").returncode == 0
    daemon.wait_ready(2)
    assert daemon.status()["daemon"]["preload_spare"] is None
    assert not any("spare" in line for line in daemon.lines)  # the policy itself: tests/unit/test_spare_policy.py


def test_the_spare_variable_is_the_one_the_library_reads() -> None:
    assert preload.SPARE_VAR == SPARE_VAR


def test_preload_spare_false_keeps_none_and_a_reload_to_it_retires_the_spare(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    settings, env, _ = preloaded(tmp_path)
    daemon = start_daemon(settings, env=env)
    daemon.wait_ready(2)
    spare = warm_spare(daemon)
    write_config(daemon.config_path, {**settings, "tmp_dir": str(daemon.tmp_dir), "preload_spare": False})
    result = daemon.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "preload_spare" in result.stdout
    wait_for(functools.partial(gone, spare), 10, "the spare to be retired")
    assert daemon.cli("restart").returncode == 0
    daemon.wait_ready(2)
    assert daemon.status()["daemon"]["preload_spare"] is None
    assert sum("spare preload process" in line for line in daemon.lines) == 1  # the first one's "warm" only


def test_a_spare_imports_from_a_path_entry_created_after_it_started(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """The import system caches what it found in each directory (and that a PYTHONPATH
    entry did not exist): the spare drops that before it imports the app, as a fresh
    interpreter would not have it. Release 2 needs a module from a directory its deploy
    created."""
    app_dir, lib = tmp_path / "app", tmp_path / "lib"
    app_dir.mkdir()
    shutil.copy(APPS / "preload_app.py", app_dir)
    (app_dir / "app_entry.py").write_text(
        "import os\n"
        "if open(os.environ['RELEASE_FILE']).read().strip() == '2':\n"
        "    import extra_dependency  # new in release 2\n"
        "from preload_app import app\n"
    )
    settings, env, release = preloaded(tmp_path, cwd=str(app_dir))
    settings["command"] = [sys.executable, "-m", "sockherd.uvicorn", "app_entry:app"]
    daemon = start_daemon({**settings, "environment": {"PYTHONPATH": str(lib)}}, env=env)
    daemon.wait_ready(2)
    spare = warm_spare(daemon)
    lib.mkdir()
    (lib / "extra_dependency.py").write_text("")
    release.write_text("2")
    result = daemon.cli("restart")
    assert result.returncode == 0, result.stderr
    assert (answer(daemon, 0)["release"], answer(daemon, 0)["imported_in"]) == ("2", spare)


def test_a_script_reached_through_a_flipped_symlink_is_another_release_even_hard_linked(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """`python /srv/current/run.py` with run.py the same inode in both releases (rsync
    --link-dest): the spare's sys.path[0] is the old release's directory, so it must not
    serve the new one."""
    releases = [tmp_path / "releases" / name for name in ("r1", "r2")]
    releases[0].mkdir(parents=True)
    (releases[0] / "run.py").write_text("import sockherd.uvicorn\nsockherd.uvicorn.main()\n")
    shutil.copy(APPS / "preload_app.py", releases[0])
    releases[1].mkdir()
    os.link(releases[0] / "run.py", releases[1] / "run.py")
    shutil.copy(APPS / "preload_app.py", releases[1])
    current = tmp_path / "current"
    current.symlink_to(releases[0])
    settings, env, _ = preloaded(
        tmp_path, cwd=str(tmp_path), command=[sys.executable, str(current / "run.py"), "preload_app:app"]
    )
    daemon = start_daemon(settings, env=env)
    daemon.wait_ready(2)
    spare = warm_spare(daemon)
    flip(current, releases[1])
    mark = daemon.mark()
    assert daemon.cli("restart").returncode == 0
    daemon.wait_log(rf"spare preload process pid {spare} not used \(.*run.py now leads to", start=mark)
    assert answer(daemon, 0)["module_file"] == str(releases[1] / "preload_app.py")


def test_a_spare_still_starting_when_the_daemon_quits_does_not_outlive_it(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """The spare here takes 30 s to start (it sleeps when it sees SOCKHERD_PRELOAD_SPARE):
    a quit meanwhile kills it instead of leaving it to finish starting with nobody to use it."""
    slow_spare = (
        "import os, time; os.environ.get('SOCKHERD_PRELOAD_SPARE') and time.sleep(30); "
        "import sockherd.uvicorn; sockherd.uvicorn.main()"
    )
    daemon, _ = start_preloaded(start_daemon, tmp_path, command=[sys.executable, "-c", slow_spare, "preload_app:app"])

    def starting_spare() -> int | None:
        for child in psutil.Process(daemon.proc.pid).children():
            with contextlib.suppress(psutil.Error):
                if SPARE_VAR in child.environ():
                    return child.pid
        return None

    spare: int = wait_for(starting_spare, 20, "the spare to be started")
    assert daemon.status()["daemon"]["preload_spare"] is None  # not warm
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    wait_for(functools.partial(gone, spare), 5, "the starting spare to be gone")
