"""Config loading: discovery, extends, path resolution, defaults and every validation message."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockherd.config import (
    CONFIG_NAMES,
    MAX_WORKER_ID_LEN,
    Config,
    ConfigError,
    find_config,
    format_size,
    load_config,
    parse_size,
    render_command,
    socket_names,
)
from sockherd.config_settings import KEYS, SETTINGS, Context, Invalid, kernel_somaxconn, settings_table

ROOT = Path(__file__).resolve().parents[2]
BASE = {"command": 'command = ["app", "--bind", "{socket}"]', "tmp_dir": 'tmp_dir = "run"'}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(directory: Path, text: str, file_name: str = "sockherd.toml") -> Config:
    """Write one config (adding the required keys it does not set) and load it hermetically."""
    if file_name != "pyproject.toml":
        own_keys = tomllib.loads(text)
        text = "\n".join([*(line for key, line in BASE.items() if key not in own_keys), text])
    write(directory / file_name, text + "\n")
    return load_config(cwd=directory, environ={"HOME": "/home/someone"})


def error(directory: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(directory, text)
    return str(info.value)


# --- discovery --------------------------------------------------------------------------

DISCOVERY_ORDER = [*CONFIG_NAMES, "pyproject.toml"]


@pytest.mark.parametrize("position", range(len(DISCOVERY_ORDER)))
def test_discovery_first_found_wins(tmp_path: Path, position: int) -> None:
    for file_name in DISCOVERY_ORDER[position:]:
        text = "[tool.sockherd]\nname = 'x'\n" if file_name == "pyproject.toml" else "name = 'x'\n"
        write(tmp_path / file_name, text)
    assert find_config(tmp_path) == tmp_path / DISCOVERY_ORDER[position]


def test_pyproject_without_table_is_not_a_config(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[project]\nname = 'someone-else'\n[tool.ruff]\nline-length = 99\n")
    with pytest.raises(ConfigError) as info:
        find_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"no sockherd config in {tmp_path} (looked for ")
    assert all(file_name in message for file_name in CONFIG_NAMES)
    assert "[tool.sockherd] in pyproject.toml" in message


def test_pyproject_table_is_loaded(tmp_path: Path) -> None:
    text = '[project]\nname = "shop"\n[tool.sockherd]\ncommand = "app {socket}"\ntmp_dir = "run"\nworkers = 3\n'
    config = load(tmp_path, text, "pyproject.toml")
    assert config.path == tmp_path / "pyproject.toml"
    assert config.workers == 3
    assert config.worker.command == ("app", "{socket}")


def test_pyproject_errors_name_the_file(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[tool.sockherd]\ncommand = "app"\ntmp_dir = "run"\nworkers = 0\n')
    with pytest.raises(ConfigError, match=r"^pyproject\.toml: key 'workers': expected a positive integer"):
        load_config(cwd=tmp_path)


def test_pyproject_sockherd_must_be_a_table(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool]\nsockherd = 5\n")
    with pytest.raises(ConfigError) as info:
        find_config(tmp_path)
    assert str(info.value) == "pyproject.toml: key 'tool.sockherd': expected a table, got 5"


def test_explicit_pyproject_without_table(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[project]\nname = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(Path("pyproject.toml"), cwd=tmp_path)
    assert str(info.value) == "pyproject.toml: no [tool.sockherd] table"


def test_explicit_path_is_relative_to_cwd(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "prod.toml", 'command = "app"\ntmp_dir = "run"\n')
    config = load_config(Path("conf/prod.toml"), cwd=tmp_path)
    assert config.path == tmp_path / "conf" / "prod.toml"
    assert config.files == (config.path,)
    assert config.tmp_dir == tmp_path / "conf" / "run"


def test_files_outside_cwd_are_named_in_full(tmp_path: Path) -> None:
    config_file = write(tmp_path / "etc" / "app.toml", 'command = "app"\ntmp_dir = "run"\nstandby = -1\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_file, cwd=tmp_path / "elsewhere")
    assert str(info.value).startswith(f"{config_file}: key 'standby'")


# --- extends ---------------------------------------------------------------------------


def test_extends_depth_first_and_overrides(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'command = "a"\ntmp_dir = "run"\nworkers = 1\nstandby = 1\nname = "a"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\nworkers = 2\nname = "b"\n')
    write(tmp_path / "sockherd.toml", 'extends = "b.toml"\nname = "c"\n')
    config = load_config(cwd=tmp_path)
    assert config.files == (tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "sockherd.toml")
    assert config.path == tmp_path / "sockherd.toml"
    assert (config.name, config.workers, config.standby, config.worker.command) == ("c", 2, 1, ("a",))


def test_extends_merges_environment_by_variable(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", 'command = "a"\ntmp_dir = "run"\n[environment]\nA = "base"\nB = "base"\n')
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\n[environment]\nB = "local"\nC = 3\n')
    config = load_config(cwd=tmp_path)
    assert config.worker.environment == (("A", "base"), ("B", "local"), ("C", "3"))


def test_extends_other_keys_replace_whole_values(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", 'command = "a"\ntmp_dir = "run"\nenv = ["A", "B"]\n')
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\nenv = ["C"]\n')
    assert load_config(cwd=tmp_path).worker.env == ("C",)


def test_extends_is_relative_to_the_file_that_says_it(tmp_path: Path) -> None:
    write(tmp_path / "shared" / "common.toml", 'command = "a"\ntmp_dir = "run"\n')
    write(tmp_path / "shared" / "web" / "base.toml", 'extends = "../common.toml"\nworkers = 4\n')
    write(tmp_path / "app" / "sockherd.toml", 'extends = "../shared/web/base.toml"\n')
    config = load_config(cwd=tmp_path / "app")
    assert config.files[0] == tmp_path / "shared" / "common.toml"
    assert config.workers == 4


def test_extended_pyproject_uses_its_table(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n[tool.sockherd]\ncommand = "a"\ntmp_dir = "run"\n')
    write(tmp_path / "sockherd.local.toml", 'extends = "pyproject.toml"\nworkers = 2\n')
    config = load_config(cwd=tmp_path)
    assert config.path == tmp_path / "sockherd.local.toml"
    assert (config.workers, config.worker.command) == (2, ("a",))


def test_extended_pyproject_without_table(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n')
    write(tmp_path / "sockherd.toml", 'extends = "pyproject.toml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == "pyproject.toml: no [tool.sockherd] table"


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\n')
    write(tmp_path / "base.toml", 'extends = "sockherd.toml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == "base.toml: key 'extends': cycle sockherd.toml -> base.toml -> sockherd.toml"


def test_extends_itself(tmp_path: Path) -> None:
    write(tmp_path / "sockherd.toml", 'extends = "./sockherd.toml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == "sockherd.toml: key 'extends': cycle sockherd.toml -> sockherd.toml"


def test_extends_missing_file(tmp_path: Path) -> None:
    message = error(tmp_path, 'extends = "nope.toml"')
    assert message == f"sockherd.toml: key 'extends': no such file: {tmp_path / 'nope.toml'}"


def test_errors_name_the_file_the_key_came_from(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", 'command = "a"\ntmp_dir = "run"\nworkers = "lots"\n[environment]\nP = [1]\n')
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\n[environment]\nQ = "fine"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == 'base.toml: key \'workers\': expected a positive integer or "auto", got "lots"'
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\nworkers = 2\n[environment]\nQ = "fine"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == "base.toml: key 'environment.P': expected a string, number or boolean, got [1]"


def test_unknown_key_in_extended_file(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", "standbys = 1\n")
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\ncommand = "a"\ntmp_dir = "run"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == "base.toml: unknown key 'standbys' (did you mean 'standby'?)"


def test_missing_required_key_names_the_first_file(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", 'command = "a"\n')
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == "sockherd.toml: missing required key 'tmp_dir'"


# --- paths ------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_first_file(tmp_path: Path) -> None:
    write(
        tmp_path / "shared" / "base.toml",
        'command = "a"\ntmp_dir = "run"\ncwd = "src"\nstdout = "log/out.log"\nstderr = "../err.log"\n'
        'listen = ["unix://sock/app.sock"]\n',
    )
    write(tmp_path / "app" / "sockherd.toml", 'extends = "../shared/base.toml"\n')
    config = load_config(cwd=tmp_path / "app")
    app = tmp_path / "app"
    assert config.tmp_dir == app / "run"
    assert config.worker.cwd == app / "src"
    assert config.worker.stdout == app / "log" / "out.log"
    assert config.worker.stderr == tmp_path / "err.log"
    assert config.listen == (f"unix://{app / 'sock' / 'app.sock'}",)


def test_home_is_expanded_from_environ(tmp_path: Path) -> None:
    config = load(tmp_path, 'tmp_dir = "~/run"\ncwd = "~"\nstdout = "/var/log/app.log"')
    assert config.tmp_dir == Path("/home/someone/run")
    assert config.worker.cwd == Path("/home/someone")
    assert config.worker.stdout == Path("/var/log/app.log")


def test_paths_are_normalised_not_resolved(tmp_path: Path) -> None:
    (tmp_path / "releases" / "7").mkdir(parents=True)
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "7")
    write(tmp_path / "current" / "sockherd.toml", 'command = "a"\ntmp_dir = "./x/../run"\n')
    config = load_config(cwd=tmp_path / "current")
    assert config.tmp_dir == tmp_path / "current" / "run"
    assert config.worker.cwd == tmp_path / "current"


def test_false_unsets_optional_values(tmp_path: Path) -> None:
    write(
        tmp_path / "base.toml",
        'command = "a"\ntmp_dir = "r"\nstdout = "o"\nstderr = "e"\nmax_memory = 5\nmax_age = 9\n',
    )
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\nstdout = false\nstderr = false\nmax_memory = false\n')
    config = load_config(cwd=tmp_path)
    assert (config.worker.stdout, config.worker.stderr, config.max_memory, config.max_age) == (None, None, None, 9.0)


# --- defaults ---------------------------------------------------------------------------


def test_every_default(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.as_dict() == {
        "command": ["app", "--bind", "{socket}"],
        "tmp_dir": str(tmp_path / "run"),
        "name": "app",
        "socket_file": "app.{worker}.sock",
        "ipc_file": "sockherd.ipc",
        "workers": 1,
        "standby": 0,
        "ready": "notify",
        "preload": False,
        "preload_teardown": False,
        "env": [],
        "environment": {},
        "cwd": str(tmp_path),
        "listen": [],
        "dev_server": None,
        "stdout": None,
        "stderr": None,
        "spawn_timeout": 2.0,
        "online_timeout": 10.0,
        "shutdown_timeout": 10.0,
        "kill_timeout": 5.0,
        "max_start_attempts": 1,
        "strategy": "atomic",
        "symlinks": "relative",
        "stop_signal": "SIGTERM",
        "socket_mode": "0o660",
        "socket_group": False,
        "linger": 0.25,
        "backlog": kernel_somaxconn(),
        "max_memory": None,
        "max_age": None,
        "pidfile": None,
        "keep_previous": None,
        "preload_spare": True,
    }
    assert config.worker.stop_signal is signal.SIGTERM
    assert config.worker.socket_mode == 0o660


def test_as_dict_is_json_with_toml_key_names(tmp_path: Path) -> None:
    config = load(tmp_path, 'stop_signal = "INT"\nsocket_mode = "600"\nmax_memory = "1GiB"\ndev_server = true')
    data = json.loads(json.dumps(config.as_dict()))
    assert set(data) == set(KEYS) - {"extends"}
    assert (data["stop_signal"], data["socket_mode"], data["max_memory"], data["dev_server"]) == (
        "SIGINT",
        "0o600",
        2**30,
        8000,
    )


def test_config_is_frozen_hashable_and_reproducible(tmp_path: Path) -> None:
    config = load(tmp_path, "[environment]\nA = 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 3  # type: ignore[misc]
    assert load_config(cwd=tmp_path, environ={"HOME": "/home/someone"}) == config
    assert hash(config.worker) == hash(load_config(cwd=tmp_path, environ={}).worker)


def test_socket_paths(tmp_path: Path) -> None:
    config = load(tmp_path, 'socket_file = "web.{worker}.sock"\nipc_file = "ctl"')
    run = tmp_path / "run"
    assert config.ipc_path == run / "ctl"
    assert config.notify_path == run / "ctl.notify"
    assert config.symlink_path(3) == run / "web.3.sock"
    assert config.worker_socket_path("a1b2") == run / "web.a1b2.sock"


@pytest.mark.parametrize(("content", "expected"), [("1024\n", 1024), ("junk", 4096), ("0", 4096), (None, 4096)])
def test_kernel_somaxconn(tmp_path: Path, content: str | None, expected: int) -> None:
    source = tmp_path / "somaxconn"
    if content is not None:
        source.write_text(content)
    assert kernel_somaxconn(source) == expected


# --- valid forms ------------------------------------------------------------------------


def test_workers_auto_counts_usable_cpus(tmp_path: Path) -> None:
    assert load(tmp_path, 'workers = "auto"').workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0o660", 0o660),
        ('"660"', 0o660),
        ('"0660"', 0o660),
        ('"0o600"', 0o600),
        ('"0O640"', 0o640),
        ("0", 0),
        ('"777"', 0o777),
        ("0o777", 0o777),
        ("432", 0o660),
    ],
)
def test_socket_mode_forms(tmp_path: Path, value: str, expected: int) -> None:
    assert load(tmp_path, f"socket_mode = {value}").worker.socket_mode == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"SIGTERM"', signal.SIGTERM),
        ('"TERM"', signal.SIGTERM),
        ('"sigint"', signal.SIGINT),
        ('"quit"', signal.SIGQUIT),
        ("9", signal.SIGKILL),
        ('"15"', signal.SIGTERM),
        ('"SIGHUP"', signal.SIGHUP),
    ],
)
def test_stop_signal_forms(tmp_path: Path, value: str, expected: signal.Signals) -> None:
    assert load(tmp_path, f"stop_signal = {value}").worker.stop_signal is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        ("100", 100),
        ("100B", 100),
        ("100K", 102_400),
        ("100KiB", 102_400),
        ("100KB", 100_000),
        ("100kb", 100_000),
        ("500MB", 500_000_000),
        ("512MiB", 512 * 2**20),
        ("512 MiB", 512 * 2**20),
        ("1GiB", 2**30),
        ("1.5G", 3 * 2**29),
        ("2TB", 2 * 10**12),
        ("1T", 2**40),
    ],
)
def test_max_memory_units(value: int | str, expected: int) -> None:
    assert parse_size(value) == expected


def test_max_memory_in_config(tmp_path: Path) -> None:
    assert load(tmp_path, 'max_memory = "512MiB"').max_memory == 512 * 2**20


@given(st.integers(min_value=1, max_value=2**60))
def test_size_format_roundtrip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["KiB", "MiB", "GiB", "K", "M", "G"]))
def test_size_format_uses_the_largest_exact_unit(count: int, unit: str) -> None:
    size = parse_size(f"{count}{unit}")
    match = re.fullmatch(r"([0-9]+)(B|KiB|MiB|GiB|TiB)", format_size(size))
    assert match is not None
    assert int(match[1]) * parse_size(f"1{match[2]}") == size
    assert match[2] == "TiB" or int(match[1]) % 1024 != 0


def test_dev_server_forms(tmp_path: Path) -> None:
    assert load(tmp_path, "dev_server = true").dev_server == 8000
    assert load(tmp_path, "dev_server = 9000").dev_server == 9000
    assert load(tmp_path, "dev_server = false").dev_server is None


def test_environment_values_become_strings(tmp_path: Path) -> None:
    config = load(tmp_path, '[environment]\nZ = "z"\nPORT = 8000\nRATIO = 0.5\nDEBUG = true\nQUIET = false')
    assert config.worker.environment == (
        ("DEBUG", "true"),
        ("PORT", "8000"),
        ("QUIET", "false"),
        ("RATIO", "0.5"),
        ("Z", "z"),
    )


def test_env_names_are_deduplicated_in_order(tmp_path: Path) -> None:
    assert load(tmp_path, 'env = ["B", "A", "B"]').worker.env == ("B", "A")


def test_listen_forms(tmp_path: Path) -> None:
    text = 'listen = ["tcp://127.0.0.1:8000", "tcp://[::1]:8001", "tcp://localhost:80", "unix:///run/app.sock"]'
    text += '\ncommand = "gunicorn app:wsgi"'
    assert load(tmp_path, text).listen == (
        "tcp://127.0.0.1:8000",
        "tcp://[::1]:8001",
        "tcp://localhost:80",
        "unix:///run/app.sock",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"app --bind {socket}"', ("app", "--bind", "{socket}")),
        ("\"app --name 'my app' -w{index}\"", ("app", "--name", "my app", "-w{index}")),
        ('["sh", "-c", "exec app ${SOCKHERD_SOCKET} {id}"]', ("sh", "-c", "exec app ${SOCKHERD_SOCKET} {id}")),
        ('["app", "--json", "{\\"a\\": {}}", "{1}", "{}"]', ("app", "--json", '{"a": {}}', "{1}", "{}")),
    ],
)
def test_command_forms(tmp_path: Path, value: str, expected: tuple[str, ...]) -> None:
    assert load(tmp_path, f"command = {value}").worker.command == expected


def test_render_command() -> None:
    command = ("app", "--bind=unix:{socket}", "--id", "{id}", "{index}/{index}", '{"socket": {}}', "${HOME}")
    assert render_command(command, socket="/run/a.sock", worker_id="w1", index="3") == [
        "app",
        "--bind=unix:/run/a.sock",
        "--id",
        "w1",
        "3/3",
        '{"socket": {}}',
        "${HOME}",
    ]


# --- invalid configs: the exact message for each ----------------------------------------

SIGNALS = '"SIGTERM" or a signal number'
MODE = 'a mode from 0o000 to 0o777 (written 0o660 or "660")'
SIZE = 'a positive number of bytes or a size such as "512MiB"'
LISTEN = 'a list of "tcp://host:port", "tcp://[v6]:port" or "unix:///path" addresses'
SOCKET_FILE = 'a file name with "{worker}" exactly once and no "/"'
COMMAND = "a non-empty list of non-empty strings or a command string"
PLACEHOLDER = "(known: {socket}, {id}, {index})"
NAME = 'a name of letters, digits, "_", "." and "-"'

INVALID = [
    ("workers = -1", "key 'workers': expected a positive integer or \"auto\", got -1"),
    ("workers = 0", "key 'workers': expected a positive integer or \"auto\", got 0"),
    ('workers = "many"', 'key \'workers\': expected a positive integer or "auto", got "many"'),
    ("workers = true", "key 'workers': expected a positive integer or \"auto\", got true"),
    ("workers = 1.5", "key 'workers': expected a positive integer or \"auto\", got 1.5"),
    ("standby = -1", "key 'standby': expected an integer >= 0, got -1"),
    ('name = "my app"', f"key 'name': expected {NAME}, got \"my app\""),
    ('name = ""', f"key 'name': expected {NAME}, got \"\""),
    ('socket_file = "app.sock"', f"key 'socket_file': expected {SOCKET_FILE}, got \"app.sock\""),
    (
        'socket_file = "a.{worker}.{worker}"',
        f"key 'socket_file': expected {SOCKET_FILE}, got \"a.{{worker}}.{{worker}}\"",
    ),
    ('socket_file = "r/{worker}.sock"', f"key 'socket_file': expected {SOCKET_FILE}, got \"r/{{worker}}.sock\""),
    ('socket_file = "{worker!r}"', f"key 'socket_file': expected {SOCKET_FILE}, got \"{{worker!r}}\""),
    ('socket_file = "{worker:>3}"', f"key 'socket_file': expected {SOCKET_FILE}, got \"{{worker:>3}}\""),
    ('socket_file = "{worker}.{x}"', f"key 'socket_file': expected {SOCKET_FILE}, got \"{{worker}}.{{x}}\""),
    ('socket_file = "{worker"', f"key 'socket_file': expected {SOCKET_FILE}, got \"{{worker\""),
    ('ipc_file = "a/b"', 'key \'ipc_file\': expected a file name (no "/"), got "a/b"'),
    ('ipc_file = ".."', 'key \'ipc_file\': expected a file name (no "/"), got ".."'),
    ('ready = "yes"', 'key \'ready\': expected one of "notify", "socket", got "yes"'),
    ('strategy = "blue-green"', 'key \'strategy\': expected one of "atomic", "rolling", got "blue-green"'),
    ("symlinks = 1", 'key \'symlinks\': expected one of "relative", "absolute", got 1'),
    ('env = "PATH"', "key 'env': expected a list of variable names, got \"PATH\""),
    ('env = ["A=B"]', "key 'env': invalid environment variable name \"A=B\""),
    ('env = ["SOCKHERD_SOCKET"]', "key 'env': SOCKHERD_SOCKET is set by sockherd for each worker"),
    ("environment = 5", "key 'environment': expected a table of variables, got 5"),
    ("[environment]\nPORT = [8000]", "key 'environment.PORT': expected a string, number or boolean, got [8000]"),
    (
        "[environment]\nWHEN = 1979-05-27",
        "key 'environment.WHEN': expected a string, number or boolean, got 1979-05-27",
    ),
    (
        '[environment]\nNOTIFY_SOCKET = "x"',
        "key 'environment.NOTIFY_SOCKET': NOTIFY_SOCKET is set by sockherd for each worker",
    ),
    ('[environment]\n"A=B" = "x"', "key 'environment.A=B': invalid environment variable name \"A=B\""),
    ("cwd = 5", "key 'cwd': expected a path, got 5"),
    ('cwd = ""', "key 'cwd': expected a path, got \"\""),
    ('listen = "tcp://a:1"', f"key 'listen': expected {LISTEN}, got \"tcp://a:1\""),
    ('listen = ["http://localhost:8000"]', f"key 'listen': expected {LISTEN}, got \"http://localhost:8000\""),
    ('listen = ["tcp://localhost"]', f"key 'listen': expected {LISTEN}, got \"tcp://localhost\""),
    ('listen = ["unix://"]', f"key 'listen': expected {LISTEN}, got \"unix://\""),
    ("listen = [8000]", f"key 'listen': expected {LISTEN}, got 8000"),
    ('listen = ["tcp://localhost:0"]', "key 'listen': \"tcp://localhost:0\": port must be from 1 to 65535"),
    ('listen = ["tcp://a:70000"]', "key 'listen': \"tcp://a:70000\": port must be from 1 to 65535"),
    ('listen = ["tcp://[::g]:80"]', "key 'listen': \"tcp://[::g]:80\": '::g' is not an IPv6 address"),
    ('listen = ["tcp://a:1", "tcp://a:1"]', "key 'listen': \"tcp://a:1\" is listed twice"),
    (
        f'listen = ["unix:///{"x" * 107}"]',
        "~: socket path is 108 bytes, over the 107-byte limit of a UNIX socket address",
    ),
    ("dev_server = 0", "key 'dev_server': expected false, true or a port from 1 to 65535, got 0"),
    ("dev_server = 70000", "key 'dev_server': expected false, true or a port from 1 to 65535, got 70000"),
    ('dev_server = "yes"', "key 'dev_server': expected false, true or a port from 1 to 65535, got \"yes\""),
    ("stdout = 1", "key 'stdout': expected a path or false, got 1"),
    ("stderr = true", "key 'stderr': expected a path or false, got true"),
    ("spawn_timeout = 0", "key 'spawn_timeout': expected a positive number of seconds, got 0"),
    ("online_timeout = -1", "key 'online_timeout': expected a positive number of seconds, got -1"),
    ('shutdown_timeout = "10s"', "key 'shutdown_timeout': expected a positive number of seconds, got \"10s\""),
    ("kill_timeout = inf", "key 'kill_timeout': expected a positive number of seconds, got inf"),
    ("kill_timeout = nan", "key 'kill_timeout': expected a positive number of seconds, got nan"),
    ("kill_timeout = true", "key 'kill_timeout': expected a positive number of seconds, got true"),
    ("linger = -0.5", "key 'linger': expected a number of seconds >= 0, got -0.5"),
    ("max_start_attempts = 0", "key 'max_start_attempts': expected a positive integer, got 0"),
    ('stop_signal = "SIGFOO"', f"key 'stop_signal': expected a signal name such as {SIGNALS}, got \"SIGFOO\""),
    ("stop_signal = 0", f"key 'stop_signal': expected a signal name such as {SIGNALS}, got 0"),
    ("stop_signal = 1000", f"key 'stop_signal': expected a signal name such as {SIGNALS}, got 1000"),
    ("stop_signal = true", f"key 'stop_signal': expected a signal name such as {SIGNALS}, got true"),
    ("socket_mode = 660", f"key 'socket_mode': expected {MODE}, got 660"),
    ("socket_mode = -1", f"key 'socket_mode': expected {MODE}, got -1"),
    ('socket_mode = "0o1777"', f"key 'socket_mode': expected {MODE}, got \"0o1777\""),
    ('socket_mode = "rw"', f"key 'socket_mode': expected {MODE}, got \"rw\""),
    ('socket_mode = "0x1a"', f"key 'socket_mode': expected {MODE}, got \"0x1a\""),
    ('socket_mode = "68"', f"key 'socket_mode': expected {MODE}, got \"68\""),
    ("socket_mode = true", f"key 'socket_mode': expected {MODE}, got true"),
    ("backlog = 0", "key 'backlog': expected a positive integer, got 0"),
    ("backlog = 3000000000", "key 'backlog': expected a positive integer, got 3000000000"),
    ('max_memory = "lots"', f"key 'max_memory': expected {SIZE}, got \"lots\""),
    ('max_memory = "12PB"', f"key 'max_memory': expected {SIZE}, got \"12PB\""),
    ('max_memory = "-5M"', f"key 'max_memory': expected {SIZE}, got \"-5M\""),
    ('max_memory = "0.1B"', f"key 'max_memory': expected {SIZE}, got \"0.1B\""),
    ("max_memory = 0", f"key 'max_memory': expected {SIZE}, got 0"),
    ("max_memory = true", f"key 'max_memory': expected {SIZE}, got true"),
    ("max_memory = 1.5", f"key 'max_memory': expected {SIZE}, got 1.5"),
    ("max_age = 0", "key 'max_age': expected a positive number of seconds or false, got 0"),
    ("max_age = true", "key 'max_age': expected a positive number of seconds or false, got true"),
    ("command = []", f"key 'command': expected {COMMAND}, got []"),
    ('command = ""', f"key 'command': expected {COMMAND}, got \"\""),
    ('command = "  "', f"key 'command': expected {COMMAND}, got \"  \""),
    ('command = ["app", ""]', f'key \'command\': expected {COMMAND}, got ["app", ""]'),
    ('command = ["app", 1]', f"key 'command': expected {COMMAND}, got [\"app\", 1]"),
    ('command = "app \'open"', "key 'command': cannot split \"app 'open\": No closing quotation"),
    ('command = ["app", "--bind={sockets}"]', f"key 'command': unknown placeholder '{{sockets}}' {PLACEHOLDER}"),
    ('command = "app {worker}"', f"key 'command': unknown placeholder '{{worker}}' {PLACEHOLDER}"),
    ('command = "app {ID}"', f"key 'command': unknown placeholder '{{ID}}' {PLACEHOLDER}"),
    ("tmp_dir = 5", "key 'tmp_dir': expected a path, got 5"),
    ('tmp_dir = "a\\u0000b"', "key 'tmp_dir': expected a path, got \"a\\u0000b\""),
    ("extends = 5", "key 'extends': expected a file path, got 5"),
    ("worker = 2", "unknown key 'worker' (did you mean 'workers'?)"),
    ("shutdown_timout = 2", "unknown key 'shutdown_timout' (did you mean 'shutdown_timeout'?)"),
    ("zzz = 1", "unknown key 'zzz'"),
]


@pytest.mark.parametrize(("text", "message"), INVALID, ids=[text.split("\n")[-1][:40] for text, _ in INVALID])
def test_invalid_config(tmp_path: Path, text: str, message: str) -> None:
    """Exact messages; one starting with "~" is a fragment (the full one holds a long value)."""
    actual = error(tmp_path, text)
    if message.startswith("~"):
        assert actual.startswith("sockherd.toml: key '")
        assert message[1:] in actual
    else:
        assert actual == f"sockherd.toml: {message}"


def test_missing_command(tmp_path: Path) -> None:
    write(tmp_path / "sockherd.toml", 'tmp_dir = "run"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == "sockherd.toml: missing required key 'command'"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "sockherd.toml", 'command = "app"\ntmp_dir = "run"\nworkers 4\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    message = str(info.value)
    assert message.startswith("sockherd.toml: invalid TOML: ")
    assert "(at line 3, column 9)" in message


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    write(tmp_path / "sockherd.toml", "workers = 1\nworkers = 2\n")
    with pytest.raises(ConfigError, match=r"^sockherd\.toml: invalid TOML: .*\(at line 2"):
        load_config(cwd=tmp_path)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "sockherd.toml").write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    assert str(info.value) == "sockherd.toml: invalid TOML: not UTF-8 text"


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "conf.toml").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(Path("conf.toml"), cwd=tmp_path)
    assert str(info.value) == "conf.toml: cannot read: Is a directory"


def test_parsers_raise_only_invalid() -> None:
    """Whatever TOML can hold, a parser answers with Invalid, never another exception."""
    values: list[object] = [None, True, False, -1, 0, 1, 2**70, 1.5, float("inf"), "", "x", "{", [], [1], ["a"], {}]
    values.append({"A": {"B": 1}})
    ctx = Context(Path("/srv/app"), "/home/someone")
    for setting in SETTINGS:
        if setting.parse is None:
            continue
        for value in values:
            with contextlib.suppress(Invalid):
                setting.parse(value, ctx)


# --- the sun_path limit -----------------------------------------------------------------


def test_sun_path_boundary(tmp_path: Path) -> None:
    """With the defaults the longest name is a worker socket: "app." + 16 + ".sock" = 25 bytes."""
    assert MAX_WORKER_ID_LEN == 16
    fits = "/" + "d" * 80  # 81 + "/" + 25 = 107
    assert load(tmp_path, f'tmp_dir = "{fits}"').tmp_dir == Path(fits)
    message = error(tmp_path, f'tmp_dir = "{fits}e"')
    longest = f"{fits}e/app.{'x' * 16}.sock"
    assert message == (
        "sockherd.toml: key 'tmp_dir': socket paths in it can be 108 bytes, over the 107-byte limit of a UNIX "
        f"socket address (longest: {longest}); use a shorter tmp_dir, socket_file or ipc_file"
    )


def test_sun_path_counts_relative_tmp_dir_after_resolution(tmp_path: Path) -> None:
    budget = 107 - len(str(tmp_path)) - 1 - 26
    if budget < 1:
        pytest.skip("tmp_path is too long for this test")
    load(tmp_path, f'tmp_dir = "{"r" * budget}"')
    assert "key 'tmp_dir': socket paths in it can be 108 bytes" in error(tmp_path, f'tmp_dir = "{"r" * (budget + 1)}"')


@pytest.mark.parametrize(
    ("text", "longest_name"),
    [
        ('ipc_file = "' + "i" * 95 + '"', "i" * 95 + ".notify"),
        ('socket_file = "' + "s" * 85 + '{worker}"', "s" * 85 + "x" * 16),
        ('socket_file = "{worker}' + "s" * 85 + '"', "x" * 16 + "s" * 85),
    ],
)
def test_sun_path_counts_every_socket_name(tmp_path: Path, text: str, longest_name: str) -> None:
    message = error(tmp_path, f'tmp_dir = "/run/app"\n{text}')
    assert message.startswith("sockherd.toml: key 'tmp_dir': socket paths in it can be ")
    assert f"(longest: /run/app/{longest_name})" in message


def test_sun_path_error_names_the_file_that_set_tmp_dir(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", f'command = "a"\ntmp_dir = "/{"t" * 90}"\n')
    write(tmp_path / "sockherd.toml", 'extends = "base.toml"\n')
    with pytest.raises(ConfigError, match=r"^base\.toml: key 'tmp_dir': socket paths in it can be 117 bytes"):
        load_config(cwd=tmp_path)


def test_temporary_symlink_names_are_counted() -> None:
    assert socket_names("app.{worker}.sock", "sockherd.ipc") == [
        "sockherd.ipc",
        "sockherd.ipc.notify",
        "app.xxxxxxxxxxxxxxxx.sock",
        "app.99999.sock",
        ".app.99999.sock.ffffffff",
    ]


# --- the settings table and its docs ----------------------------------------------------


def test_settings_table_is_complete() -> None:
    assert len(KEYS) == len(set(KEYS))
    assert all(setting.type and setting.help and setting.default_text for setting in SETTINGS)


def test_docs_table_matches_the_settings() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    table = doc.split("<!-- settings:start -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert table == settings_table(), "docs/config.md is out of date: run scripts/gen_config_docs.py"
    assert all(f"| `{key}` |" in table for key in KEYS)


def test_docs_generator_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_socket_group_takes_a_name_or_a_gid(tmp_path: Path) -> None:
    import grp

    www = grp.getgrnam("www-data").gr_gid
    assert load(tmp_path, 'socket_group = "www-data"').worker.socket_group == www
    assert load(tmp_path, "socket_group = 0").worker.socket_group == 0
    assert load(tmp_path, "socket_group = false").worker.socket_group is None
    message = error(tmp_path, 'socket_group = "no-such-group"')
    assert "socket_group" in message and 'no group named "no-such-group" on this machine' in message


# --- shared listeners -------------------------------------------------------------------


def test_listen_with_standby_is_refused_naming_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sockherd.toml: key 'standby': standby workers need per-worker sockets"):
        load(tmp_path, 'listen = ["tcp://127.0.0.1:8000"]\nstandby = 1\ncommand = "app"')


def test_listen_with_a_socket_placeholder_is_refused_with_the_fd_way(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'command': `\{socket\}` is a per-worker socket.*uvicorn --fd 3"):
        load(tmp_path, 'listen = ["tcp://127.0.0.1:8000"]\ncommand = "app --bind {socket}"')


def test_listen_with_the_dev_server_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'dev_server': not with `listen`.*tcp://127.0.0.1:8000"):
        load(tmp_path, 'listen = ["tcp://127.0.0.1:8000"]\ndev_server = true\ncommand = "app"')


def test_listen_and_pidfile_cannot_change_on_reload(tmp_path: Path) -> None:
    from sockherd.daemon.reload import plan_reload

    old = load(tmp_path, 'listen = ["tcp://127.0.0.1:8000"]\ncommand = "app"')
    new = load(tmp_path, 'listen = ["tcp://127.0.0.1:8001"]\ncommand = "app"')
    with pytest.raises(ConfigError, match="key 'listen' cannot change while the daemon runs"):
        plan_reload(old, new, workers=1, standby=0)
    new = load(tmp_path, 'listen = ["tcp://127.0.0.1:8000"]\ncommand = "app"\npidfile = "/run/x.pid"')
    with pytest.raises(ConfigError, match="key 'pidfile' cannot change"):
        plan_reload(old, new, workers=1, standby=0)
