"""`sockherd doctor`: one nginx config per mistake, the documented configs clean, local checks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sockherd import cli
from sockherd.doctor_nginx import RUNNER_KEEP_ALIVE, App, Finding, check_nginx, nginx_time, worker_keepalive
from sockherd.init import nginx_listen_snippet, nginx_snippet
from sockherd.nginx_conf import parse_text
from support.daemon import write_config

REPO = Path(__file__).resolve().parents[2]
APP = App(Path("/run/myapp"), "app.", ".sock", 2, (), ("python -m sockherd.uvicorn", 75))
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


def nginx_findings(conf: str, app: App = APP) -> list[Finding]:
    return check_nginx(parse_text(conf, "site.conf", prefix="/nonexistent"), app)


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
        (["gunicorn", "-k", "gthread", "app:app"], "keepalive_timeout 65s;", "keepalive_timeout 1s;"),  # 2 s
        (["python", "-m", "sockherd.uvicorn", "app:app"], "keepalive_timeout 2m;", "keepalive_timeout 74s;"),
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


def test_keep_alive_timeouts_read_from_worker_commands() -> None:
    assert worker_keepalive(["python", "-m", "sockherd.uvicorn", "app:app"]) == ("python -m sockherd.uvicorn", 75)
    assert worker_keepalive(["uvicorn", "--timeout-keep-alive=90", "a:b"]) == ("uvicorn", 90)
    assert worker_keepalive(["/venv/bin/gunicorn", "--threads", "4", "a:b"]) == ("gunicorn", 2)
    assert worker_keepalive(["sh", "-c", "exec hypercorn --keep-alive 70 a:b"]) == ("hypercorn", 70)
    assert worker_keepalive(["gunicorn", "a:b"]) is None  # the sync worker closes after every response
    assert worker_keepalive(["node", "server.js"]) is None


def test_runner_default_matches_the_uvicorn_runner() -> None:
    uvicorn_runner = pytest.importorskip("sockherd.uvicorn")
    assert uvicorn_runner.DEFAULT_TIMEOUT_KEEP_ALIVE == RUNNER_KEEP_ALIVE


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


# --- the command: local checks and exit codes ----------------------------------------------------


def doctor(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, object]], str]:
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
    code, findings, _ = doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, tmp_dir))
    assert code == 0
    assert [f["severity"] for f in findings] == ["info"]  # the daemon is not running: not an error
    assert set(findings[0]) == {"severity", "check", "file", "line", "message", "fix"}


def test_a_group_writable_tmp_dir_is_an_error(
    tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(tmp_dir)})
    tmp_dir.chmod(0o770)
    code, findings, _ = doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, tmp_dir))
    assert code == 1
    errors = [f for f in findings if f["severity"] == "error"]
    assert [(f["check"], f["file"], f["fix"]) for f in errors] == [("tmp_dir", str(tmp_dir), f"chmod 2750 {tmp_dir}")]
    assert "writable by its group (mode 770)" in str(errors[0]["message"])


def test_a_too_long_socket_path_is_a_config_finding_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": "/tmp/" + "d" * 100})
    code, findings, _ = doctor(tmp_path, capsys, "--nginx", "/dev/null")
    assert code == 1
    assert [(f["check"], f["file"]) for f in findings] == [("config", str(tmp_path / "sockherd.toml"))]
    assert "key 'tmp_dir'" in str(findings[0]["message"]) and "108" not in str(findings[0]["message"])
    assert "over the 107-byte limit" in str(findings[0]["message"])


def test_a_stale_symlink_is_a_warning(tmp_path: Path, tmp_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(tmp_path / "sockherd.toml", {"command": ["x"], "tmp_dir": str(tmp_dir)})
    os.symlink("app.0-0badc0.sock", tmp_dir / "app.0.sock")  # to nothing: its worker is gone
    os.symlink("app.0-0badc0.sock", tmp_dir / ".app.0.sock.0123abcd")  # an interrupted swap
    code, findings, _ = doctor(tmp_path, capsys, "--nginx", clean_nginx(tmp_path, tmp_dir))
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
    code, findings, _ = doctor(tmp_path, capsys, "--nginx", str(conf))
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
    code, findings, err = doctor(tmp_path, capsys, "--nginx", str(conf))
    assert (code, findings) == (2, [])
    assert err == f'sockherd: doctor: {conf}:4: unexpected "}}": "server" needs a ";" first\n'
    code, _, err = doctor(tmp_path, capsys, "--nginx", str(tmp_path / "missing.conf"))
    assert code == 2 and "missing.conf: cannot read: No such file or directory" in err


def test_without_a_config_doctor_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["doctor"]) == 2
    assert "no sockherd config in" in capsys.readouterr().err
