"""nginx as its own user reaches the sockets, whatever group the worker gave its socket.

The case that cost a newcomer time: nginx runs as www-data; the app server (gunicorn
does this) sets its socket's owner and group itself, so a setgid tmp_dir is not
enough. `socket_group` makes the daemon own the group, and a tmp_dir the daemon
creates gets it too.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonFactory, NginxFactory
from support.daemon import REPO, tinyapp_command
from support.http import tcp_get

pytestmark = pytest.mark.e2e
NGINX_GROUP = "www-data"  # Debian's; nginx-light's workers run as this user


@pytest.fixture
def fresh_tmp_dir() -> Iterator[Path]:
    """A tmp_dir that does not exist yet, under a parent nginx's user may traverse."""
    parent = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent / "run"
    shutil.rmtree(parent, ignore_errors=True)


def test_nginx_as_www_data_reaches_sockets_their_server_made_private(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, fresh_tmp_dir: Path
) -> None:
    gid = grp.getgrnam(NGINX_GROUP).gr_gid
    daemon = start_daemon(
        {
            "command": tinyapp_command("--own-socket"),  # root:root, 0600, as gunicorn leaves it
            "workers": 2,
            "socket_group": NGINX_GROUP,
            "tmp_dir": str(fresh_tmp_dir),
        }
    )
    status = daemon.wait_ready(2)
    st = os.stat(fresh_tmp_dir)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2750, gid)  # created for nginx's group
    for worker in status["workers"]:
        sock = os.stat(worker["socket"])
        assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, gid)
    nginx = start_nginx([fresh_tmp_dir / f"app.{i}.sock" for i in range(2)], keepalive=False, user=NGINX_GROUP)
    for _ in range(4):
        assert tcp_get(nginx.port, "/").status == 200
    assert nginx.errors() == []


def test_without_socket_group_the_log_names_the_command_that_gives_nginx_access(
    start_daemon: DaemonFactory, fresh_tmp_dir: Path
) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "tmp_dir": str(fresh_tmp_dir)})
    daemon.wait_log(
        rf"nginx's user www-data cannot reach the sockets in {fresh_tmp_dir} .*set socket_group = \"www-data\" "
        rf".*`chgrp www-data {fresh_tmp_dir} && chmod 2750 {fresh_tmp_dir}`"
    )


def test_an_unmodified_gunicorn_behind_nginx_as_www_data_with_no_manual_step(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, fresh_tmp_dir: Path
) -> None:
    """The newcomer's setup: gunicorn as it comes (it reports READY=1 over sd_notify and
    sets its socket's owner and group itself), a tmp_dir the daemon creates, nginx as
    www-data. No chgrp, no chmod, no ready = "socket"."""
    gunicorn = [str(Path(sys.executable).parent / "gunicorn"), "--bind", "unix:{socket}", "--workers", "2"]
    daemon = start_daemon(
        {
            "command": [
                *gunicorn,
                "--no-control-socket",
                "--worker-class",
                "gthread",
                "--keep-alive",
                "75",
                "wsgi_app:app",
            ],
            "cwd": str(REPO / "tests" / "apps"),
            "workers": 2,
            "socket_group": NGINX_GROUP,
            "tmp_dir": str(fresh_tmp_dir),
        }
    )
    before = daemon.wait_ready(2, timeout=30)
    nginx = start_nginx([fresh_tmp_dir / f"app.{i}.sock" for i in range(2)], keepalive=True, user=NGINX_GROUP)
    assert all(tcp_get(nginx.port, "/").status == 200 for _ in range(4))
    assert daemon.cli("restart").returncode == 0  # the new generation's sockets get the group too
    assert not {w["pid"] for w in before["workers"]} & daemon.published_pids()
    assert all(tcp_get(nginx.port, "/").status == 200 for _ in range(4))
    assert nginx.errors() == []
