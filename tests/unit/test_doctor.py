"""`sockherd doctor`: one nginx config per mistake, the documented configs clean, local checks."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from sockherd import cli, doctor
from sockherd.daemon import publish
from sockherd.doctor_nginx import App, Finding, Version, check_nginx, nginx_time, parse_nginx_version
from sockherd.doctor_worker import KeepAlive, worker_keepalive
from sockherd.init import nginx_listen_snippet, nginx_snippet
from sockherd.nginx_conf import parse_file, parse_text
from support.daemon import write_config

REPO = Path(__file__).resolve().parents[2]
APP = App(Path("/run/myapp"), "app.", ".sock", 2, (), worker_keepalive(["python", "-m", "sockherd.uvicorn", "a:b"]))
OLD: Version = (1, 22, 1)  # this host's nginx: HTTP/1.0, Connection: close, keep-alive only with `keepalive`
NEW: Version = (1, 30, 0)  # since 1.29.7: keepalive 32 local in every upstream, HTTP/1.1, no Connection: close
GOOD_LOCATION = """
    server {
        listen 80;
        location / {
            proxy_pass http://myapp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
"""


def nginx_findings(conf: str, app: App = APP, version: Version | None = OLD) -> list[Finding]:
    return check_nginx(parse_text(conf, "site.conf", prefix="/nonexistent"), app, version)


def line_of(conf: str, marker: str) -> int:
    return next(n for n, line in enumerate(conf.splitlines(), 1) if marker in line)


def upstream(*servers: str, extra: str = "keepalive 32;") -> str:
    lines = "".join(f"        server {s};\n" for s in servers)
    return f"    upstream myapp {{\n{lines}        {extra}\n    }}\n"


SLOTS = ("unix:/run/myapp/app.0.sock max_fails=0", "unix:/run/myapp/app.1.sock max_fails=0")


def test_the_config_sockherd_init_prints_has_no_finding() -> None:
    assert nginx_findings("http {\n" + nginx_snippet("myapp", "/run/myapp", 2) + "}\n") == []
    listener = App(Path("/run/myapp"), "app.", ".sock", 2, ("/run/myapp/myapp.sock",), APP.keepalive)
    conf = "http {\n" + nginx_listen_snippet("myapp", "unix:///run/myapp/myapp.sock") + "}\n"
    assert nginx_findings(conf, listener) == []


def test_the_nginx_config_deployment_md_tells_users_to_write_has_no_finding() -> None:
    text = (REPO / "docs" / "deployment.md").read_text()
    block = text[text.index("## nginx") :]
    conf = re.search(r"```nginx\n(.*?)```", block, re.DOTALL)
    assert conf is not None
    assert nginx_findings("http {\n" + conf[1] + "}\n") == []


def test_a_multi_server_upstream_without_max_fails_0_is_an_error_per_server_line() -> None:
    conf = "http {\n" + upstream("unix:/run/myapp/app.0.sock", "unix:/run/myapp/app.1.sock max_fails=3") + "}\n"
    found = nginx_findings(conf + GOOD_LOCATION.join(["http {", "}"]))
    assert [(f.check, f.severity, f.line) for f in found] == [("max_fails", "error", 3), ("max_fails", "error", 4)]
    assert found[0].fix == "server unix:/run/myapp/app.0.sock max_fails=0;"
    assert found[1].fix == "server unix:/run/myapp/app.1.sock max_fails=0;"
    assert "default max_fails=1" in found[0].message and "max_fails=3" in found[1].message


def test_a_single_server_upstream_needs_no_max_fails() -> None:
    listener = App(Path("/run/myapp"), "app.", ".sock", 2, ("/run/myapp/myapp.sock",), APP.keepalive)
    conf = "http {\n" + upstream("unix:/run/myapp/myapp.sock") + GOOD_LOCATION + "}\n"
    assert nginx_findings(conf, listener) == []


def test_keepalive_without_http_1_1_and_connection_header() -> None:
    conf = (
        "http {\n"
        + upstream(*SLOTS)
        + "    server {\n        location / {\n            proxy_pass http://myapp;  # <- pass\n"
        + "        }\n    }\n}\n"
    )
    found = {f.check: f for f in nginx_findings(conf)}
    assert set(found) == {"keepalive_http_version", "keepalive_connection"}
    assert found["keepalive_http_version"].line == line_of(conf, "<- pass")
    assert found["keepalive_http_version"].fix == "proxy_http_version 1.1; (in this location)"
    assert found["keepalive_connection"].fix == 'proxy_set_header Connection ""; (in this location)'
    assert all(f.severity == "warning" for f in found.values())


def test_connection_header_at_server_level_is_not_inherited_by_a_location_with_its_own_headers() -> None:
    conf = (
        "http {\n"
        + upstream(*SLOTS)
        + "    server {\n"
        + '        proxy_set_header Connection "";  # <- outer\n'
        + "        proxy_http_version 1.1;\n"
        + "        location / {\n"
        + "            proxy_set_header Host $host;  # <- inner\n"
        + "            proxy_pass http://myapp;\n"
        + "        }\n"
        + "        location /ok { proxy_pass http://myapp; }\n"
        + "    }\n}\n"
    )
    found = nginx_findings(conf)
    assert [(f.check, f.line) for f in found] == [("keepalive_connection", line_of(conf, "<- inner"))]
    assert f"site.conf:{line_of(conf, '<- outer')} is not inherited" in found[0].message
    assert found[0].fix == 'proxy_set_header Connection ""; (next to this line)'


def test_a_connection_header_that_closes_is_flagged_at_its_line() -> None:
    conf = "http {\n" + upstream(*SLOTS) + GOOD_LOCATION.replace('Connection ""', "Connection close") + "}\n"
    found = nginx_findings(conf)
    assert [(f.check, f.line) for f in found] == [("keepalive_connection", line_of(conf, "Connection close"))]


def test_proxy_next_upstream_without_error_is_an_error() -> None:
    location = GOOD_LOCATION.replace("proxy_http_version", "proxy_next_upstream timeout http_502;\n proxy_http_version")
    conf = "http {\n" + upstream(*SLOTS) + location + "}\n"
    found = nginx_findings(conf)
    assert [(f.check, f.severity, f.line) for f in found] == [
        ("proxy_next_upstream", "error", line_of(conf, "proxy_next_upstream"))
    ]
    assert found[0].fix == "proxy_next_upstream error timeout http_502;"


def test_proxy_next_upstream_set_at_http_level_is_inherited_and_flagged_there() -> None:
    conf = "http {\n    proxy_next_upstream off;\n" + upstream(*SLOTS) + GOOD_LOCATION + "}\n"
    found = nginx_findings(conf)
    assert [(f.check, f.line) for f in found] == [("proxy_next_upstream", 2)]


@pytest.mark.parametrize(
    ("command", "timeout_line", "fix"),
    [
        (["uvicorn", "--uds", "{socket}", "app:app"], "", "keepalive_timeout 4s;"),  # uvicorn's default: 5 s
        (  # gunicorn's default: 2 s; a pool shorter than that saves little: keep connections longer first
            ["gunicorn", "-k", "gthread", "app:app"],
            "keepalive_timeout 65s;",
            "run the worker with --keep-alive 80, or keepalive_timeout 1s;",
        ),
        (["uvicorn", "--timeout-keep-alive", "1", "a:b"], "", "run the worker with --timeout-keep-alive 75, or "),
        (["python", "-m", "sockherd.uvicorn", "app:app"], "keepalive_timeout 2m;", "keepalive_timeout 74s;"),
        (["hypercorn", "--keep-alive", "30.5", "a:b"], "", "keepalive_timeout 30s;"),
    ],
)
def test_a_worker_closing_idle_connections_before_nginx_is_an_error(
    command: list[str], timeout_line: str, fix: str
) -> None:
    app = App(APP.tmp_dir, "app.", ".sock", 2, (), worker_keepalive(command))
    conf = "http {\n" + upstream(*SLOTS, extra="keepalive 8; " + timeout_line) + GOOD_LOCATION + "}\n"
    found = nginx_findings(conf, app)
    assert [(f.check, f.severity, f.line) for f in found] == [
        ("keepalive_timeout", "error", line_of(conf, "keepalive"))
    ]
    assert found[0].fix is not None and found[0].fix.startswith(fix)


@pytest.mark.parametrize(("worker", "below"), [(5, 4.0), (2, 1.0), (1.5, 0.75), (1, 0.5), (60, 59.0)])
def test_the_suggested_keepalive_timeout_is_strictly_below_the_workers(worker: float, below: float) -> None:
    app = App(APP.tmp_dir, "app.", ".sock", 2, (), KeepAlive("uvicorn", worker, "--timeout-keep-alive {seconds}"))
    found = nginx_findings("http {\n" + upstream(*SLOTS) + GOOD_LOCATION + "}\n", app)
    assert [f.check for f in found] == ["keepalive_timeout"] and found[0].fix is not None
    suggested = re.search(r"keepalive_timeout (\S+);", found[0].fix)
    assert suggested is not None and nginx_time(suggested[1]) == below < worker


def test_keep_alive_timeouts_read_from_worker_commands() -> None:
    def read(command: list[str]) -> tuple[str, float | None] | None:
        found = worker_keepalive(command)
        return None if found is None else (found.server, found.timeout)

    assert read(["python", "-m", "sockherd.uvicorn", "app:app"]) == ("python -m sockherd.uvicorn", 75)
    assert read(["uvicorn", "--timeout-keep-alive=90", "a:b"]) == ("uvicorn", 90)
    assert read(["/venv/bin/gunicorn", "--threads", "4", "a:b"]) == ("gunicorn", 2)
    assert read(["sh", "-c", "exec hypercorn --keep-alive 70 a:b"]) == ("hypercorn", 70)
    assert read(["gunicorn", "a:b"]) is None  # the sync worker closes after every response
    assert read(["node", "server.js"]) == ("", None)  # not a server doctor knows: unknown


def test_runner_default_matches_the_uvicorn_runner() -> None:
    uvicorn_runner = pytest.importorskip("sockherd.uvicorn")
    assert worker_keepalive(["python", "-m", "sockherd.uvicorn"]) == KeepAlive(
        "python -m sockherd.uvicorn", uvicorn_runner.DEFAULT_TIMEOUT_KEEP_ALIVE, "--timeout-keep-alive {seconds}"
    )


def test_nginx_time() -> None:
    assert [nginx_time(t) for t in ("60", "75s", "1m30s", "500ms", "1h", "x", "")] == [
        60,
        75,
        90,
        0.5,
        3600,
        None,
        None,
    ]


def test_worker_sockets_and_slot_counts_in_the_upstream() -> None:
    conf = (
        "http {\n"
        + upstream(
            "unix:/run/myapp/app.0-3f9a1c.sock max_fails=0",  # <- worker
            "unix:/run/myapp/app.2.sock max_fails=0",
        )
        + GOOD_LOCATION
        + "}\n"
    )
    found = {(f.check, f.line): f for f in nginx_findings(conf)}
    assert set(found) == {("worker_socket", 3), ("slots", 4), ("slots", 2)}
    assert found["worker_socket", 3].severity == "error"
    assert "slot(s) 0, 1" in found["slots", 2].message


def test_an_nginx_config_without_this_app_is_a_warning() -> None:
    conf = "http {\n    upstream other { server unix:/run/other/app.0.sock; server 127.0.0.1:1; }\n}\n"
    assert [f.check for f in nginx_findings(conf)] == ["no_upstream"]


def test_direct_proxy_pass_to_a_unix_socket_counts_as_this_app() -> None:
    conf = "http { server { location / { proxy_pass http://unix:/run/myapp/app.0.sock:/; } } }\n"
    assert nginx_findings(conf) == []


# --- nginx's version: its defaults changed in 1.29.7 ----------------------------------------------

UVICORN_5S = App(APP.tmp_dir, "app.", ".sock", 2, (), worker_keepalive(["uvicorn", "a:b"]))
BARE_LOCATION = (
    "    server {\n        location / {\n            proxy_pass http://myapp;  # <- pass\n        }\n    }\n"
)


def test_since_1_29_7_an_upstream_without_keepalive_keeps_connections() -> None:
    conf = "http {\n" + upstream(*SLOTS, extra="") + BARE_LOCATION + "}\n"
    found = nginx_findings(conf, UVICORN_5S, NEW)
    assert [(f.check, f.severity, f.line) for f in found] == [("keepalive_timeout", "error", 2)]  # the upstream
    assert "nginx's default keepalive 32" in found[0].message and "closes them after 5s" in found[0].message
    assert nginx_findings(conf, UVICORN_5S, OLD) == []  # before 1.29.7: no keep-alive without `keepalive`


def test_since_1_29_7_http_1_1_and_no_connection_close_need_no_lines() -> None:
    conf = "http {\n" + upstream(*SLOTS) + BARE_LOCATION + "}\n"
    assert nginx_findings(conf, APP, NEW) == []
    assert {f.check for f in nginx_findings(conf, APP, OLD)} == {"keepalive_http_version", "keepalive_connection"}
    explicit = conf.replace("proxy_pass", "proxy_http_version 1.0; proxy_pass")
    assert [f.check for f in nginx_findings(explicit, APP, NEW)] == ["keepalive_http_version"]


def test_keepalive_0_turns_upstream_keep_alive_off_on_1_29_7() -> None:
    conf = "http {\n" + upstream(*SLOTS, extra="keepalive 0;") + BARE_LOCATION + "}\n"
    assert nginx_findings(conf, UVICORN_5S, NEW) == []


def test_an_unknown_version_checks_the_old_defaults_and_warns_for_the_new_one() -> None:
    conf = "http {\n" + upstream(*SLOTS, extra="") + BARE_LOCATION + "}\n"
    found = {f.check: f for f in nginx_findings(conf, UVICORN_5S, None)}
    assert set(found) == {"keepalive_timeout", "nginx_version"}
    assert found["keepalive_timeout"].severity == "warning"  # loses requests only if nginx is 1.29.7+
    assert found["keepalive_timeout"].message.startswith("if nginx is 1.29.7 or later, upstream myapp keeps")
    assert found["nginx_version"].severity == "info" and "--nginx-version" in found["nginx_version"].message
    assert "defaults of nginx before 1.29.7" in found["nginx_version"].message
    explicit = "http {\n" + upstream(*SLOTS) + BARE_LOCATION + "}\n"  # keepalive 32: the old defaults apply
    assert {f.check for f in nginx_findings(explicit, APP, None)} == {
        "keepalive_http_version",
        "keepalive_connection",
        "nginx_version",
    }


def test_nginx_versions_as_nginx_v_prints_them() -> None:
    assert parse_nginx_version("nginx version: nginx/1.22.1\n") == (1, 22, 1)
    assert parse_nginx_version("nginx version: openresty/1.25.3.1\n") == (1, 25, 3)  # nginx 1.25.3 inside
    assert parse_nginx_version("1.30.0") == (1, 30, 0)
    assert parse_nginx_version("nginx: [emerg] something") is None


def test_nginx_that_cannot_be_run_gives_no_version_and_no_traceback(tmp_path: Path) -> None:
    assert doctor._nginx_says(str(tmp_path / "missing-nginx"), "-v") == ""  # OSError
    hangs = tmp_path / "slow-nginx"
    hangs.write_text("#!/bin/sh\nexec sleep 60\n")
    hangs.chmod(0o755)
    with pytest.MonkeyPatch.context() as m:
        real_run = subprocess.run
        m.setattr(subprocess, "run", lambda *a, **k: real_run(*a, **{**k, "timeout": 0.2}))
        assert doctor._nginx_says(str(hangs), "-V") == ""  # TimeoutExpired


# --- the Connection header -----------------------------------------------------------------------

UPGRADE_MAP = """    map $http_upgrade $connection_upgrade {{
        default upgrade;
        {empty}
    }}
"""


@pytest.mark.parametrize("version", [OLD, NEW])
def test_connection_upgrade_from_the_usual_map_closes_every_ordinary_request(version: Version) -> None:
    location = GOOD_LOCATION.replace(
        'Connection ""', "Upgrade $http_upgrade;\n proxy_set_header Connection $connection_upgrade"
    )
    conf = "http {\n" + UPGRADE_MAP.format(empty="'' close;  # <- empty") + upstream(*SLOTS) + location + "}\n"
    found = nginx_findings(conf, APP, version)
    assert [(f.check, f.line) for f in found] == [
        ("keepalive_connection", line_of(conf, "Connection $connection_upgrade"))
    ]
    assert f"the map at site.conf:{line_of(conf, '<- empty')} gives `close`" in found[0].message
    assert found[0].fix is not None and found[0].fix.startswith("'' \"\"; in the map at site.conf:2")
    fixed = conf.replace("'' close;", "'' \"\";")
    assert nginx_findings(fixed, APP, version) == []
    no_empty_entry = conf.replace("default upgrade;", "default close;").replace("'' close;", "")
    assert [f.check for f in nginx_findings(no_empty_entry, APP, version)] == ["keepalive_connection"]


def test_only_a_connection_value_with_close_is_flagged() -> None:
    for value, flagged in (("keep-alive", False), ("Close", True), ('"upgrade, close"', True), ("$http_x", False)):
        conf = "http {\n" + upstream(*SLOTS) + GOOD_LOCATION.replace('Connection ""', f"Connection {value}") + "}\n"
        assert [f.check for f in nginx_findings(conf)] == (["keepalive_connection"] if flagged else []), value


# --- a conf.d fragment: no http block --------------------------------------------------------------

# /tmp/rev/doc/myapp.conf, the reviewer's reproduction: a site file as in /etc/nginx/conf.d
FRAGMENT = """\
upstream myapp {
    server unix:/run/myapp/app.0.sock;
    server unix:/run/myapp/app.1.sock;
    keepalive 8;
}
server {
    listen 80;
    location / { proxy_pass http://myapp; proxy_next_upstream off; }
}
"""


def test_a_fragment_without_an_http_block_is_checked_as_the_inside_of_one(tmp_path: Path) -> None:
    site = tmp_path / "myapp.conf"
    site.write_text(FRAGMENT)
    directives, _ = parse_file(site)
    found = check_nginx(directives, UVICORN_5S, OLD)
    assert [(f.severity, f.check, f.line) for f in found] == [
        ("info", "fragment", None),
        ("error", "max_fails", 2),
        ("error", "max_fails", 3),
        ("error", "keepalive_timeout", 4),
        ("error", "proxy_next_upstream", 8),
        ("warning", "keepalive_http_version", 8),
        ("warning", "keepalive_connection", 8),
    ]
    assert f"{site} has no `http` block" in found[0].message and "its includes" not in found[0].message


def test_a_fragments_includes_are_read_from_its_directory_and_the_finding_says_nginx_differs(tmp_path: Path) -> None:
    (tmp_path / "params").write_text('proxy_http_version 1.1;\nproxy_set_header Connection "";\n')
    site = tmp_path / "myapp.conf"
    site.write_text(FRAGMENT.replace("proxy_next_upstream off;", "include params;"))
    directives, files = parse_file(site)
    assert files == [str(site), str(tmp_path / "params")]
    found = check_nginx(directives, APP, OLD)
    assert [f.check for f in found] == ["fragment", "max_fails", "max_fails"]
    assert "nginx resolves a relative include against its prefix" in found[0].message
    assert str(tmp_path / "params") in found[0].message


# --- the command: local checks and exit codes ----------------------------------------------------


def run_doctor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, list[dict[str, object]], str]:
    code = cli.main(["doctor", "-c", str(tmp_path / "sockherd.toml"), "--json", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else [], err


def clean_nginx(tmp_path: Path, tmp_dir: Path) -> str:
    path = tmp_path / "nginx.conf"
    path.write_text("user root;\nhttp {\n" + nginx_snippet("myapp", str(tmp_dir), 1) + "}\n")
    return str(path)


def test_a_clean_setup_exits_0(tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(
        tmp_path / "sockherd.toml",
        {"command": ["uvicorn", "a:b", "--timeout-keep-alive", "75"], "tmp_dir": str(tmp_dir)},
    )
    code, findings, _ = run_doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, tmp_dir))
    assert code == 0
    # the daemon is not running: not an error; nginx's version is not known from a file alone
    assert [(f["severity"], f["check"]) for f in findings] == [("info", "daemon"), ("info", "nginx_version")]
    assert set(findings[0]) == {"severity", "check", "file", "line", "message", "fix"}


def test_a_group_writable_tmp_dir_is_an_error(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(tmp_dir)})
    tmp_dir.chmod(0o770)
    code, findings, _ = run_doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, tmp_dir))
    assert code == 1
    errors = [f for f in findings if f["severity"] == "error"]
    assert [(f["check"], f["file"], f["fix"]) for f in errors] == [("tmp_dir", str(tmp_dir), f"chmod 2750 {tmp_dir}")]
    assert "writable by its group (mode 770)" in str(errors[0]["message"])


def test_a_too_long_socket_path_is_a_config_finding_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": "/tmp/" + "d" * 100})
    code, findings, _ = run_doctor(tmp_path, capsys, "--nginx", "/dev/null")
    assert code == 1
    assert [(f["check"], f["file"]) for f in findings] == [("config", str(tmp_path / "sockherd.toml"))]
    assert "key 'tmp_dir'" in str(findings[0]["message"]) and "108" not in str(findings[0]["message"])
    assert "over the 107-byte limit" in str(findings[0]["message"])


def test_a_stale_symlink_is_a_warning(tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(tmp_dir)})
    os.symlink("app.0-0badc0.sock", tmp_dir / "app.0.sock")  # to nothing: its worker is gone
    os.symlink("app.0-0badc0.sock", tmp_dir / ".app.0.sock.0123abcd")  # an interrupted swap
    code, findings, _ = run_doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, tmp_dir))
    assert code == 0
    stale = [(f["severity"], f["file"]) for f in findings if f["check"] == "stale"]
    assert stale == [("warning", str(tmp_dir / ".app.0.sock.0123abcd")), ("warning", str(tmp_dir / "app.0.sock"))]


def test_nginx_user_that_cannot_traverse_tmp_dir_is_an_error(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(tmp_dir)})
    tmp_dir.chmod(0o750)  # group root: nobody is not in it
    conf = tmp_path / "nginx.conf"
    conf.write_text("user nobody;\nhttp {\n" + nginx_snippet("myapp", str(tmp_dir), 1) + "}\n")
    code, findings, _ = run_doctor(tmp_path, capsys, "--nginx", str(conf))
    assert code == 1
    access = [f for f in findings if f["check"] == "nginx_access"]
    assert len(access) == 1 and f"nginx's user nobody (`user` at {conf}:1) cannot traverse {tmp_dir}" in str(
        access[0]["message"]
    )


def test_text_output_is_one_line_per_finding_then_a_summary(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(tmp_dir), "workers": 2})
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        "user root;\nhttp {\n" + nginx_snippet("myapp", str(tmp_dir), 2).replace(" max_fails=0", "") + "}\n"
    )
    code = cli.main(["doctor", "-c", str(tmp_path / "sockherd.toml"), "--nginx", str(conf)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[0] == (
        f"{conf}:4: error: upstream myapp has 2 servers and nginx's default max_fails=1: one failed connect while a "
        "worker is replaced takes this socket out for fail_timeout (10 s by default); measured 73-78 % failed "
        f"requests with a worker killed every 2.5 s; write: server unix:{tmp_dir}/app.0.sock max_fails=0;"
    )
    assert lines[1].startswith(f"{conf}:5: error: ")
    assert lines[-1].startswith("2 error(s), 0 warning(s): requests would be lost")


def test_a_malformed_nginx_config_exits_2_naming_file_and_line(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(tmp_dir)})
    conf = tmp_path / "nginx.conf"
    conf.write_text("http {\n    upstream a {\n        server unix:/x.sock\n    }\n}\n")
    code, findings, err = run_doctor(tmp_path, capsys, "--nginx", str(conf))
    assert (code, findings) == (2, [])
    assert err == f'sockherd: doctor: {conf}:4: unexpected "}}": "server" needs a ";" first\n'
    code, _, err = run_doctor(tmp_path, capsys, "--nginx", str(tmp_path / "missing.conf"))
    assert code == 2 and "missing.conf: cannot read: No such file or directory" in err


def test_without_a_config_doctor_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["doctor"]) == 2
    assert "no sockherd config in" in capsys.readouterr().err


def test_nginx_version_given_for_a_file_sets_the_defaults(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["uvicorn", "a:b"], "tmp_dir": str(tmp_dir)})
    conf = tmp_path / "nginx.conf"
    conf.write_text("user root;\nhttp {\n" + upstream(f"unix:{tmp_dir}/app.0.sock", extra="") + BARE_LOCATION + "}\n")
    config = tmp_path / "sockherd.toml"
    assert doctor.main(config, nginx=str(conf), as_json=False, nginx_version="1.22.1") == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"nginx: {conf} (1 file(s)), nginx 1.22.1)")
    assert doctor.main(config, nginx=str(conf), as_json=True, nginx_version="1.30.0") == 1
    found = json.loads(capsys.readouterr().out)
    assert [(f["check"], f["line"]) for f in found if f["severity"] == "error"] == [("keepalive_timeout", 3)]
    assert "nginx_version" not in {f["check"] for f in found}
    assert doctor.main(config, nginx=str(conf), as_json=True, nginx_version="1.30") == 2
    assert "--nginx-version '1.30': expected nginx's version as X.Y.Z" in capsys.readouterr().err


def test_tmp_dir_owned_by_another_uid_and_parents_checked_against_the_daemons_user(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.getuid() != 0:
        pytest.skip("chown needs root")
    run = tmp_dir / "run"
    run.mkdir(mode=0o750)
    os.chown(run, 12345, 12345)
    os.chown(tmp_dir, 12345, 12345)  # tmp_dir's owner, but not the daemon's user (this one: no daemon runs)
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(run)})
    code, findings, _ = run_doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, run))
    assert code == 1
    errors = [(f["file"], f["fix"]) for f in findings if f["check"] == "tmp_dir"]
    assert errors == [(str(run), f"chown root {run}"), (str(tmp_dir), "put tmp_dir under /run/<app>")]
    messages = [str(f["message"]) for f in findings if f["check"] == "tmp_dir"]
    assert "owned by uid 12345, not by this user (uid 0) or root" in messages[0]
    assert "checked as uid 0, this user's: run doctor as the daemon's user" in messages[0]
    assert f"{tmp_dir} above it belongs to uid 12345" in messages[1]


def test_tmp_dir_not_writable_by_the_daemons_user_who_owns_its_ipc_socket(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.getuid() != 0:
        pytest.skip("chown needs root")
    tmp_dir.chmod(0o755)  # root's: accepted for the owner, but uid 12345 cannot create its sockets there
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(tmp_dir)})
    with socket.socket(socket.AF_UNIX) as ipc:
        ipc.bind(str(tmp_dir / "sockherd.ipc"))
        ipc.listen()
        os.chown(tmp_dir / "sockherd.ipc", 12345, 12345)
        code, findings, _ = run_doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, tmp_dir))
    assert code == 1
    assert any(f["check"] == "daemon" and "a daemon answers on" in str(f["message"]) for f in findings)
    errors = [f for f in findings if f["check"] == "tmp_dir"]
    assert [(f["file"], f["fix"]) for f in errors] == [(str(tmp_dir), f"chown 12345 {tmp_dir}")]
    assert f"tmp_dir {tmp_dir}: not writable by this user (uid 12345)" in str(errors[0]["message"])
    assert f"checked as uid 12345, the daemon's: the owner of {tmp_dir}/sockherd.ipc" in str(errors[0]["message"])


def test_paths_in_suggested_commands_are_shell_quoted(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spaced = tmp_dir / "my run"
    spaced.mkdir()
    spaced.chmod(0o770)
    os.symlink("app.0-0badc0.sock", spaced / "app.0.sock")
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(spaced)})
    _, findings, _ = run_doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, spaced))
    fixes = {f["check"]: f["fix"] for f in findings if f["fix"]}
    assert fixes["tmp_dir"] == f"chmod 2750 '{spaced}'"
    assert fixes["stale"] == f"rm '{spaced}/app.0.sock'"


def test_a_socket_this_user_may_not_connect_to_is_unknown_not_dead(tmp_dir: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root, to probe as another user")
    path = tmp_dir / "app.0-0badc0.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        path.chmod(0o600)
        assert publish.socket_state(path) is True
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the probe as another user, who gets EACCES
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.write(write, repr(publish.socket_state(path)).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as answer:
            assert answer.read() == b"None"
    assert publish.socket_state(path) is False  # closed: refused, so dead


# --- the worker's keep-alive from gunicorn's configuration ----------------------------------------


def test_gunicorn_keepalive_is_read_from_the_flask_examples_gunicorn_conf_py() -> None:
    example = REPO / "examples" / "flask"
    found = worker_keepalive(["gunicorn", "app:app"], example, {})
    assert found == KeepAlive("gunicorn", 75, f"keepalive = {{seconds}} in {example / 'gunicorn.conf.py'}")


def test_gunicorn_settings_in_order_file_then_gunicorn_cmd_args_then_command_line(tmp_path: Path) -> None:
    (tmp_path / "gunicorn.conf.py").write_text('worker_class = "gthread"\nkeepalive = 30\n')
    assert worker_keepalive(["gunicorn", "a:b"], tmp_path, {}) == KeepAlive(
        "gunicorn", 30, f"keepalive = {{seconds}} in {tmp_path / 'gunicorn.conf.py'}"
    )
    env = {"GUNICORN_CMD_ARGS": "--keep-alive 9"}
    assert worker_keepalive(["gunicorn", "a:b"], tmp_path, env) == KeepAlive("gunicorn", 9, "--keep-alive {seconds}")
    assert worker_keepalive(["gunicorn", "--keep-alive=3", "a:b"], tmp_path, env) == KeepAlive(
        "gunicorn", 3, "--keep-alive {seconds}"
    )
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "g.py").write_text("threads = 4\n")  # the sync worker with threads is gthread
    found = worker_keepalive(["gunicorn", "-c", "conf/g.py", "a:b"], tmp_path, {})
    assert found is not None and (found.server, found.timeout) == ("gunicorn", 2)
    (tmp_path / "conf" / "g.py").write_text("workers = 4\n")  # sync: no connection kept
    assert worker_keepalive(["gunicorn", "-c", "conf/g.py", "a:b"], tmp_path, {}) is None


def test_a_gunicorn_setting_that_is_not_a_plain_assignment_is_unknown_and_reported_as_info(tmp_path: Path) -> None:
    (tmp_path / "gunicorn.conf.py").write_text(
        'import os\nworker_class = "gthread"\nkeepalive = int(os.environ.get("KEEPALIVE", "75"))\n'
    )
    found = worker_keepalive(["gunicorn", "a:b"], tmp_path, {})
    assert found is not None and (found.server, found.timeout) == ("gunicorn", None)
    assert found.unknown == f"{tmp_path / 'gunicorn.conf.py'} sets keepalive in a way not read here"
    app = App(APP.tmp_dir, "app.", ".sock", 2, (), found)
    result = nginx_findings("http {\n" + upstream(*SLOTS) + GOOD_LOCATION + "}\n", app)
    assert [(f.check, f.severity) for f in result] == [("keepalive_timeout", "info")]
    assert "how long the worker (gunicorn) keeps them is unknown" in result[0].message
    assert found.unknown in result[0].message
    (tmp_path / "gunicorn.conf.py").write_text('if True:\n    worker_class = "gevent"\n')
    unknown_class = worker_keepalive(["gunicorn", "a:b"], tmp_path, {})
    assert unknown_class is not None and unknown_class.timeout is None
    (tmp_path / "gunicorn.conf.py").write_text("keepalive = (\n")
    broken = worker_keepalive(["gunicorn", "a:b"], tmp_path, {})
    assert broken is not None and "cannot be read (it does not parse)" in broken.unknown


def test_doctor_reads_the_workers_gunicorn_settings_from_its_cwd_and_environment(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The keep-alive doctor compares with nginx's is the one the worker will run with: its
    `cwd`'s gunicorn.conf.py, overridden by GUNICORN_CMD_ARGS from the config's `environment`."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "gunicorn.conf.py").write_text('worker_class = "uvicorn_worker.UvicornWorker"\nkeepalive = 3\n')
    settings = {"command": ["gunicorn", "-b", "unix:{socket}", "a:b"], "tmp_dir": str(tmp_dir), "cwd": str(app)}
    for environment, seconds in (({}, "3"), ({"GUNICORN_CMD_ARGS": "--keep-alive 7"}, "7")):
        write_config(tmp_path / "sockherd.toml", {**settings, "environment": environment})
        _, findings, _ = run_doctor(
            tmp_path, capsys, "--nginx", clean_nginx(tmp_path, tmp_dir), "--nginx-version", "1.22.1"
        )
        timeouts = [f for f in findings if f["check"] == "keepalive_timeout"]
        assert len(timeouts) == 1 and f"closes them after {seconds}s" in str(timeouts[0]["message"]), findings
