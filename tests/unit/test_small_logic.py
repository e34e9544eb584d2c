"""Pure decisions: crash backoff, sd_notify parsing, status formatting, starter files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sockherd.cli import format_status
from sockherd.daemon.environment import worker_environment
from sockherd.daemon.healing import BACKOFF_CAP, crash_backoff
from sockherd.daemon.notify import parse_notify
from sockherd.daemon.process import describe_exit, new_worker_id
from sockherd.init import nginx_snippet, run_init


def test_first_crash_is_replaced_at_once_then_backoff_doubles_to_a_cap() -> None:
    delays = [crash_backoff(n) for n in range(1, 15)]
    assert delays[0] == 0.0
    assert delays[1:4] == [0.1, 0.2, 0.4]
    assert max(delays) == BACKOFF_CAP
    assert delays == sorted(delays)


def test_parse_notify() -> None:
    assert parse_notify(b"READY=1\nSTATUS=serving 4 conns\n") == {"READY": "1", "STATUS": "serving 4 conns"}
    assert parse_notify(b"junk\n=nokey\nA=\n") == {"A": ""}
    assert parse_notify(b"\xff\xfeREADY=1") == {"\ufffd\ufffdREADY": "1"}


def test_describe_exit() -> None:
    assert describe_exit(3) == "status 3"
    assert describe_exit(-9) == "signal SIGKILL"


def test_worker_ids_carry_the_slot_and_fit_the_name_pattern() -> None:
    assert new_worker_id(3).startswith("3-") and len(new_worker_id(3)) == 8
    assert new_worker_id(None).startswith("s-")


def test_status_table() -> None:
    now = time.time()
    status = {
        "daemon": {"name": "app", "pid": 1, "state": "running", "generation": 2, "workers": 1, "started_at": now},
        "workers": [
            {
                "id": "0-abcdef",
                "pid": 42,
                "index": 0,
                "state": "online",
                "generation": 2,
                "started_at": now - 75,
                "restarts": 1,
                "symlink": "/run/app/app.0.sock",
            }
        ],
        "slots": [{"index": 1, "crash_loop": 4, "next_attempt_at": now + 0.8, "restarts": 4}],
    }
    text = format_status(status)
    assert "generation 2" in text
    assert "0-abcdef  42   0      online  2    1m15s   1         app.0.sock" in text
    assert "slot 1: crash loop (4 in a row)" in text


def test_nginx_snippet_disables_max_fails_and_retries_on_error() -> None:
    snippet = nginx_snippet("shop", "/run/shop", 2)
    assert "server unix:/run/shop/app.0.sock max_fails=0;" in snippet
    assert "server unix:/run/shop/app.1.sock max_fails=0;" in snippet
    assert "proxy_next_upstream error timeout;" in snippet


def test_init_writes_a_config_that_loads(tmp_path: Path) -> None:
    from sockherd.config import load_config

    assert run_init(tmp_path) == 0
    assert run_init(tmp_path) == 1, "never overwrites without --force"
    config = load_config(tmp_path / "sockherd.toml")
    assert config.workers == 2


def test_init_listen_writes_a_shared_listener_config_and_a_one_server_upstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sockherd.config import load_config

    app = tmp_path / "shop"
    app.mkdir()
    assert run_init(app, listen=True) == 0
    config = load_config(app / "sockherd.toml")
    assert config.listen == ("unix:///run/shop/shop.sock",) and config.standby == 0
    out = capsys.readouterr().out
    assert "    server unix:/run/shop/shop.sock;\n" in out  # one line, nginx's defaults
    assert "max_fails=" not in out.split("# systemd")[0]
    assert "ListenStream=/run/shop/shop.sock" in out  # the optional socket-activation unit


def test_the_systemd_unit_lets_workers_outlive_a_crashed_daemon_for_adoption(tmp_path: Path) -> None:
    from sockherd.init import systemd_unit

    unit = systemd_unit("shop", tmp_path, "/srv/shop/venv/bin/sockherd")
    assert "\nKillMode=process\n" in unit  # a crash leaves the workers to the next daemon
    assert "\nRestart=on-failure\n" in unit  # every crash, never a clean terminate


def test_environment_allow_list(tmp_path: Path) -> None:
    from sockherd.config import load_config

    (tmp_path / "sockherd.toml").write_text(
        'command = ["x"]\ntmp_dir = "/tmp/sh-envtest"\nenv = ["KEEP"]\n[environment]\nSET = "1"\n'
    )
    spec = load_config(tmp_path / "sockherd.toml").worker
    env = worker_environment(
        spec,
        {"PATH": "/bin", "KEEP": "k", "AWS_SECRET_ACCESS_KEY": "no", "LC_ALL": "C", "HOME": "/root"},
        {"SOCKHERD_SOCKET": "/s"},
    )
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["KEEP"] == "k" and env["SET"] == "1" and env["LC_ALL"] == "C" and env["SOCKHERD_SOCKET"] == "/s"
