"""`sockherd doctor` against a real daemon's sockets and a real nginx's `nginx -T`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonFactory, NginxFactory
from sockherd import doctor as doctor_module
from sockherd.doctor_nginx import parse_nginx_version
from support.daemon import RunningDaemon, tinyapp_command
from support.http import tcp_get
from support.nginx import NGINX

pytestmark = pytest.mark.e2e

SITE = """\
upstream myapp {{
    server unix:{tmp_dir}/app.0.sock;
    server unix:{tmp_dir}/app.1.sock;
    keepalive 32;
}}
server {{
    listen 127.0.0.1:1;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    location / {{
        proxy_set_header Host $host;
        proxy_pass http://myapp;
    }}
}}
"""


def nginx_dash_t(conf: Path) -> str:
    done = subprocess.run(
        [NGINX, "-T", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def doctor(daemon: RunningDaemon, *args: str) -> tuple[int, list[dict[str, Any]]]:
    done = daemon.cli("doctor", "--json", *args)
    assert done.stderr == ""
    return done.returncode, json.loads(done.stdout)


def test_doctor_reads_nginx_dash_t_and_flags_each_mistake_at_its_file_and_line(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    (tmp_path / "conf.d").mkdir()
    site = tmp_path / "conf.d" / "myapp.conf"
    site.write_text(SITE.format(tmp_dir=daemon.tmp_dir))
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"user root;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        "http {\n    access_log off;\n    include conf.d/*.conf;\n}\n"
    )
    dump = tmp_path / "nginx-T.txt"
    dump.write_text(nginx_dash_t(conf))

    code, findings = doctor(daemon, "--nginx", str(dump))
    assert code == 1
    assert [(f["severity"], f["check"], f["file"], f["line"]) for f in findings] == [
        ("error", "max_fails", str(site), 2),
        ("error", "max_fails", str(site), 3),
        ("warning", "keepalive_connection", str(site), 11),  # its own proxy_set_header hides line 9's
        ("info", "daemon", str(daemon.ipc), None),
        ("info", "keepalive_timeout", str(site), 4),  # tinyapp's keep-alive cannot be read from its command
        ("info", "nginx_version", None, None),  # a file says nothing of it: the defaults before 1.29.7 assumed
    ]
    assert f"{site}:9 is not inherited" in findings[2]["message"]
    assert "a daemon answers" in findings[3]["message"]  # live sockets: nothing stale, nginx (root) reaches them
    # The file itself, with its include, reads the same: same files, same lines.
    assert doctor(daemon, "--nginx", str(conf)) == (code, findings)
    # The conf.d file alone (no http block) is read as the inside of one: the same nginx findings.
    fragment_code, from_fragment = doctor(daemon, "--nginx", str(site))
    nginx_checks = {"max_fails", "keepalive_connection", "keepalive_timeout", "nginx_version"}
    assert fragment_code == 1
    assert [f for f in from_fragment if f["check"] in nginx_checks] == [
        f for f in findings if f["check"] in nginx_checks
    ]
    assert [(f["check"], f["file"]) for f in from_fragment if f["check"] == "fragment"] == [("fragment", str(site))]


def test_the_configuration_the_suite_serves_through_has_no_finding(
    start_daemon: DaemonFactory, start_nginx: NginxFactory
) -> None:
    daemon = start_daemon({"command": tinyapp_command(), "workers": 2})
    daemon.wait_ready(2)
    nginx = start_nginx([daemon.tmp_dir / f"app.{i}.sock" for i in range(2)], keepalive=True)
    assert tcp_get(nginx.port, "/").status == 200
    done = subprocess.run(
        [sys.executable, "-m", "sockherd", "doctor", "-c", str(daemon.config_path), "--nginx", "-"],
        input=nginx_dash_t(nginx.conf),
        capture_output=True,
        text=True,
        cwd=daemon.workdir,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert [line for line in lines if ": error: " in line or ": warning: " in line] == []
    assert lines[-1].startswith("0 error(s), 0 warning(s): nothing found would lose requests")
    assert "nginx: nginx -T from stdin" in lines[-1]


def test_the_version_of_the_nginx_installed_here_is_read() -> None:
    binary = doctor_module._nginx_binary()
    assert binary is not None, "nginx is not installed: scripts/test installs it (e2e tests never skip)"
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    expected = re.search(r"nginx/([0-9]+)\.([0-9]+)\.([0-9]+)", done.stderr)
    assert expected is not None
    assert parse_nginx_version(doctor_module._nginx_says(binary, "-v")) == tuple(int(n) for n in expected.groups())
