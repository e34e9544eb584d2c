"""The CLI's fast path: what it accepts, and that it finds the same IPC socket as the full config loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sockherd import cli_fast, protocol
from sockherd.config import load_config
from sockherd.config_settings import SETTINGS

NONE: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status"], ("status", NONE, None, None)),
        (["status", "--json"], ("status", frozenset({"--json"}), None, None)),
        (["-c", "x.toml", "status"], ("status", NONE, "x.toml", None)),
        (["status", "--config=x.toml", "--json"], ("status", frozenset({"--json"}), "x.toml", None)),
        (["--ipc", "/run/a.ipc", "health"], ("health", NONE, None, "/run/a.ipc")),
        (["health", "-i", "/run/a.ipc"], ("health", NONE, None, "/run/a.ipc")),
        (["restart"], ("restart", NONE, None, None)),
        (["-c", "x.toml", "restart", "--json"], ("restart", frozenset({"--json"}), "x.toml", None)),
        (["start", "--suspended"], ("start", frozenset({"--suspended"}), None, None)),
        (["restart", "--suspended", "--json"], ("restart", frozenset({"--suspended", "--json"}), None, None)),
    ],
)
def test_the_forms_it_serves(argv: list[str], expected: tuple[str, frozenset[str], str | None, str | None]) -> None:
    assert cli_fast._parse(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["stop"],
        ["status", "--watch"],
        ["status", "-h"],
        ["--json", "status"],  # the full CLI's argparse says where --json belongs
        ["health", "--json"],
        ["status", "status"],
        ["status", "--json", "--json"],
        ["status", "--suspended"],
        ["-c", "a.toml", "-i", "b.ipc", "status"],  # mutually exclusive: the full CLI refuses it
        ["status", "-c"],
        ["--version"],
        ["restart", "--upgrade"],
        ["restart", "--canary", "1"],
        ["restart", "--keep-previous", "5m"],
        ["restart", "--max-attempts", "2"],
        ["restart", "--suspended", "--suspended"],
        ["restart", "-h"],
        ["restart", "status"],
    ],
)
def test_anything_else_goes_to_the_full_cli(argv: list[str]) -> None:
    assert cli_fast._parse(argv) is None


def test_its_constants_are_the_protocols_and_the_configs() -> None:
    assert cli_fast.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert next(s.default for s in SETTINGS if s.key == "ipc_file") == cli_fast.DEFAULT_IPC_FILE


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("files", "config_arg"),
    [
        ({"sockherd.toml": 'command = "a"\ntmp_dir = "run"\n'}, None),
        ({"sockherd.toml": 'command = "a"\ntmp_dir = "~/run"\nipc_file = "x.ipc"\n'}, None),
        ({"sockherd.toml": 'command = "a"\ntmp_dir = "./a/../run/"\n'}, None),
        ({".sockherd.local.toml": 'command = "a"\ntmp_dir = "/tmp/abs"\n', "sockherd.toml": "broken ="}, None),
        ({"pyproject.toml": '[tool.sockherd]\ncommand = "a"\ntmp_dir = "run"\n'}, None),
        (
            {
                "base/common.toml": 'command = "a"\ntmp_dir = "shared"\nipc_file = "base.ipc"\n',
                "sockherd.toml": 'extends = "base/common.toml"\nipc_file = "mine.ipc"\n',
            },
            None,
        ),
        ({"conf/app.toml": 'command = "a"\ntmp_dir = "run"\n'}, "conf/app.toml"),
        ({"conf/app.toml": 'command = "a"\ntmp_dir = "~"\n'}, "conf/app.toml"),
    ],
)
def test_it_locates_the_ipc_socket_as_the_config_loader_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str], config_arg: str | None
) -> None:
    for name, text in files.items():
        write(tmp_path / name, text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = load_config(Path(config_arg) if config_arg else None, environ=os.environ).ipc_path
    assert cli_fast._locate_ipc(config_arg) == str(expected)
