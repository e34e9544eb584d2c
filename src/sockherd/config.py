"""Load sockherd's TOML config: find the file, follow ``extends``, check every key.

The result is a tree of frozen dataclasses, so a generation of workers can keep the exact
spec it was started with while a reload builds the next one. Every problem is a
:class:`ConfigError` naming the file and the key: the daemon must refuse a bad config (or
keep the running one on reload) with a reason the user can act on, never a traceback.

The keys themselves (checks, defaults, docs) are defined once in
:mod:`sockherd.config_settings`.
"""

from __future__ import annotations

import difflib
import os
import signal
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from sockherd.config_settings import (
    KEYS,
    MAX_INDEX_DIGITS,
    MAX_WORKER_ID_LEN,
    PLACEHOLDERS,
    REQUIRED,
    SETTINGS,
    SUN_PATH_MAX,
    Context,
    Invalid,
    Setting,
    format_size,
    parse_size,
    resolve_path,
    show,
)

__all__ = [
    "CONFIG_NAMES",
    "MAX_WORKER_ID_LEN",
    "PLACEHOLDERS",
    "SETTINGS",
    "SUN_PATH_MAX",
    "Config",
    "ConfigError",
    "Setting",
    "Timeouts",
    "WorkerSpec",
    "find_config",
    "format_size",
    "load_config",
    "parse_size",
    "render_command",
]

CONFIG_NAMES: Final = ("sockherd.local.toml", ".sockherd.local.toml", "sockherd.toml", ".sockherd.toml")
PYPROJECT: Final = "pyproject.toml"
TEMP_SUFFIX_LEN: Final = 9  # "." + 8 hex characters after a temporary symlink's name


class ConfigError(Exception):
    """A config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a generation of workers runs. Snapshotted per generation, so a reload that
    changes it affects only workers started afterwards."""

    command: tuple[str, ...]
    cwd: Path
    env: tuple[str, ...]  # names passed through from the daemon's environment
    environment: tuple[tuple[str, str], ...]  # sorted pairs: hashable and comparable
    ready: Literal["notify", "socket"]
    stdout: Path | None
    stderr: Path | None
    stop_signal: signal.Signals
    socket_mode: int
    backlog: int
    socket_group: int | None = None  # gid; None: tmp_dir's group
    preload: bool = False  # fork workers from one process per generation (sockherd.preload)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds for each rung of the start and shutdown ladders."""

    spawn: float
    online: float
    shutdown: float
    kill: float
    linger: float


@dataclass(frozen=True, slots=True)
class Config:
    """A checked config. Paths are absolute; ``files`` lists extended files first."""

    path: Path
    files: tuple[Path, ...]
    name: str
    tmp_dir: Path
    socket_file: str
    ipc_file: str
    workers: int
    standby: int
    worker: WorkerSpec
    timeouts: Timeouts
    max_start_attempts: int
    strategy: Literal["atomic", "rolling"]
    symlinks: Literal["relative", "absolute"]
    listen: tuple[str, ...]
    dev_server: int | None
    max_memory: int | None
    max_age: float | None
    pidfile: Path | None = None
    keep_previous: float | None = None

    @property
    def ipc_path(self) -> Path:
        return self.tmp_dir / self.ipc_file

    @property
    def state_path(self) -> Path:
        """The herd, persisted after every change (see daemon/state_file.py)."""
        return self.tmp_dir / (self.ipc_file + ".state.json")

    @property
    def notify_path(self) -> Path:
        return self.tmp_dir / (self.ipc_file + ".notify")

    def symlink_path(self, index: int) -> Path:
        """The published name nginx connects to for slot ``index``."""
        return self.tmp_dir / self.socket_file.format(worker=index)

    def worker_socket_path(self, worker_id: str) -> Path:
        """The socket one worker binds; unique per worker so a swap never reuses a path."""
        return self.tmp_dir / self.socket_file.format(worker=worker_id)

    def as_dict(self) -> dict[str, Any]:
        """Flat and JSON-serialisable, with TOML key names (for ``sockherd config`` and status)."""
        spec, timeouts = self.worker, self.timeouts
        return {
            "command": list(spec.command),
            "tmp_dir": str(self.tmp_dir),
            "name": self.name,
            "socket_file": self.socket_file,
            "ipc_file": self.ipc_file,
            "workers": self.workers,
            "standby": self.standby,
            "ready": spec.ready,
            "preload": spec.preload,
            "env": list(spec.env),
            "environment": dict(spec.environment),
            "cwd": str(spec.cwd),
            "listen": list(self.listen),
            "dev_server": self.dev_server,
            "stdout": None if spec.stdout is None else str(spec.stdout),
            "stderr": None if spec.stderr is None else str(spec.stderr),
            "spawn_timeout": timeouts.spawn,
            "online_timeout": timeouts.online,
            "shutdown_timeout": timeouts.shutdown,
            "kill_timeout": timeouts.kill,
            "max_start_attempts": self.max_start_attempts,
            "strategy": self.strategy,
            "symlinks": self.symlinks,
            "stop_signal": spec.stop_signal.name,
            "socket_mode": f"0o{spec.socket_mode:03o}",
            "socket_group": spec.socket_group if spec.socket_group is not None else False,
            "linger": timeouts.linger,
            "backlog": spec.backlog,
            "max_memory": self.max_memory,
            "max_age": self.max_age,
            "pidfile": None if self.pidfile is None else str(self.pidfile),
            "keep_previous": self.keep_previous,
        }


def render_command(spec_command: tuple[str, ...], *, socket: str, worker_id: str, index: str) -> list[str]:
    """A worker's argv. Plain replacement of the three placeholders only, so other braces
    (JSON, shell ``${VAR}``) in arguments pass through untouched."""
    values = dict(zip(PLACEHOLDERS, (socket, worker_id, index), strict=True))

    def render(arg: str) -> str:
        for placeholder, value in values.items():
            arg = arg.replace(f"{{{placeholder}}}", value)
        return arg

    return [render(arg) for arg in spec_command]


# --- discovery and reading ---------------------------------------------------------------


def find_config(cwd: Path) -> Path:
    """The config file for a directory: the first of CONFIG_NAMES, then a pyproject.toml
    that has a ``[tool.sockherd]`` table (one without it belongs to someone else)."""
    cwd = cwd.absolute()
    for file_name in CONFIG_NAMES:
        if (cwd / file_name).is_file():
            return cwd / file_name
    pyproject = cwd / PYPROJECT
    if pyproject.is_file() and _read_table(pyproject, PYPROJECT) is not None:
        return pyproject
    names = ", ".join(CONFIG_NAMES)
    raise ConfigError(
        f"no sockherd config in {cwd} (looked for {names} and [tool.sockherd] in {PYPROJECT}); "
        "run `sockherd init` to write one, or pass -c PATH"
    )


def _read_table(path: Path, shown: str) -> dict[str, Any] | None:
    """The sockherd table of one file; None for a pyproject.toml without one."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line N, column M)"
        raise ConfigError(f"{shown}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{shown}: invalid TOML: not UTF-8 text") from None
    if path.name != PYPROJECT:
        return data
    tool = data.get("tool")
    table = tool.get("sockherd") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{shown}: key 'tool.sockherd': expected a table, got {show(table)}")
    return table


@dataclass(frozen=True, slots=True)
class _Layer:
    path: Path
    shown: str
    table: dict[str, Any]


def _load_layers(first: Path, cwd: Path, home: str | None) -> list[_Layer]:
    """The first file and everything it extends, extended files first (the merge order)."""

    def shown(path: Path) -> str:
        return os.path.relpath(path, cwd) if path.is_relative_to(cwd) else str(path)

    layers: list[_Layer] = []
    seen: list[Path] = []
    path: Path | None = first
    while path is not None:
        identity = Path(os.path.realpath(path))  # never raises, even on a symlink loop
        if identity in seen:
            chain = " -> ".join([*(layer.shown for layer in layers), shown(path)])
            raise ConfigError(f"{layers[-1].shown}: key 'extends': cycle {chain}")
        seen.append(identity)
        table = _read_table(path, shown(path))
        if table is None:
            raise ConfigError(f"{shown(path)}: no [tool.sockherd] table")
        for key in table:
            if key not in KEYS:
                hint = difflib.get_close_matches(key, KEYS, n=1)
                suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"{shown(path)}: unknown key '{key}'{suffix}")
        layers.append(_Layer(path, shown(path), table))
        path = _extended(layers[-1], home)
    return layers[::-1]


def _extended(layer: _Layer, home: str | None) -> Path | None:
    target = layer.table.get("extends")
    if target is None:
        return None
    if not isinstance(target, str) or not target or "\0" in target:
        raise ConfigError(f"{layer.shown}: key 'extends': expected a file path, got {show(target)}")
    path = resolve_path(target, Context(layer.path.parent, home))
    if not path.is_file():
        raise ConfigError(f"{layer.shown}: key 'extends': no such file: {path}")
    return path


def _merge(layers: list[_Layer]) -> tuple[dict[str, Any], dict[str, str]]:
    """Later layers win per top-level key; ``environment`` merges variable by variable.
    Returns the values and, per key (``environment.NAME`` too), the file it came from."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer in layers:
        for key, value in layer.table.items():
            origins[key] = layer.shown
            if key == "environment" and isinstance(value, dict):
                base = values.get(key)
                values[key] = {**base, **value} if isinstance(base, dict) else dict(value)
                origins.update((f"{key}.{name}", layer.shown) for name in value)
            else:
                values[key] = value
    return values, origins


# --- validation --------------------------------------------------------------------------


def load_config(
    path: Path | None = None, *, cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Find (or read ``path``), merge and check a config. ``cwd`` is where a relative ``path``
    and discovery start and what file names in messages are relative to; ``environ`` supplies
    $HOME for ``~`` (both default to the process's own, and exist so tests stay hermetic)."""
    cwd = (cwd or Path.cwd()).absolute()
    environ = os.environ if environ is None else environ
    home = environ.get("HOME")
    first = find_config(cwd) if path is None else resolve_path(str(path), Context(cwd, home))
    layers = _load_layers(first, cwd, home)
    values, origins = _merge(layers)
    ctx = Context(first.parent, home)
    parsed = {setting.key: _parse(setting, values, origins, ctx, layers[-1].shown) for setting in SETTINGS}
    _check_socket_paths(parsed, origins["tmp_dir"])
    _check_listener_mode(parsed, origins, layers[-1].shown)
    _check_preload(parsed, origins, layers[-1].shown)
    return _build(first, tuple(layer.path for layer in layers), parsed)


def _parse(setting: Setting, values: dict[str, Any], origins: dict[str, str], ctx: Context, first: str) -> Any:
    if setting.parse is None:
        return None
    if setting.key in values:
        raw, origin = values[setting.key], origins[setting.key]
    elif setting.default is REQUIRED:
        raise ConfigError(f"{first}: missing required key '{setting.key}'")
    else:
        raw, origin = setting.default() if callable(setting.default) else setting.default, first
    try:
        return setting.parse(raw, ctx)
    except Invalid as exc:
        key = setting.key if exc.subkey is None else f"{setting.key}.{exc.subkey}"
        raise ConfigError(f"{origins.get(key, origin)}: key '{key}': {exc.message}") from None


def socket_names(socket_file: str, ipc_file: str) -> list[str]:
    """Every name the daemon creates in tmp_dir that a socket address may have to hold,
    at its longest: IPC and notify sockets, worker sockets, published and temporary symlinks."""
    symlink = socket_file.format(worker="9" * MAX_INDEX_DIGITS)
    return [
        ipc_file,
        ipc_file + ".notify",
        socket_file.format(worker="x" * MAX_WORKER_ID_LEN),
        symlink,
        "." + symlink + "." + "f" * (TEMP_SUFFIX_LEN - 1),
    ]


def _check_socket_paths(parsed: dict[str, Any], origin: str) -> None:
    """sun_path holds 107 bytes: a longer path fails only when a socket is bound, so refuse
    it at load instead of in the middle of a deploy."""
    paths = [parsed["tmp_dir"] / name for name in socket_names(parsed["socket_file"], parsed["ipc_file"])]
    longest = max(paths, key=lambda p: len(os.fsencode(p)))
    size = len(os.fsencode(longest))
    if size > SUN_PATH_MAX:
        raise ConfigError(
            f"{origin}: key 'tmp_dir': socket paths in it can be {size} bytes, over the {SUN_PATH_MAX}-byte "
            f"limit of a UNIX socket address (longest: {longest}); use a shorter tmp_dir, socket_file or ipc_file"
        )


def _check_listener_mode(parsed: dict[str, Any], origins: dict[str, str], first: str) -> None:
    """What has no meaning when every worker accepts from the daemon's shared listeners."""
    if not parsed["listen"]:
        return
    if parsed["standby"]:
        raise ConfigError(
            f"{origins.get('standby', first)}: key 'standby': standby workers need per-worker sockets, not `listen`: "
            "a standby on the shared listener would take connections before it is promoted (and with `listen` a "
            "dead worker's connections wait in the queue for the others, so no standby is needed); set standby = 0"
        )
    if any("{socket}" in arg for arg in parsed["command"]):
        raise ConfigError(
            f"{origins.get('command', first)}: key 'command': `{{socket}}` is a per-worker socket, and with `listen` "
            "workers have none: they get the shared listeners as LISTEN_FDS from fd 3 (gunicorn takes them as they "
            "are; `uvicorn --fd 3`, `hypercorn --bind fd://3`)"
        )
    if parsed["keep_previous"] is not None:
        raise ConfigError(
            f"{origins.get('keep_previous', first)}: key 'keep_previous': not with `listen`: every worker accepts "
            "from the shared socket, so a kept generation would still take connections"
        )
    if parsed["dev_server"] is not None:
        raise ConfigError(
            f"{origins.get('dev_server', first)}: key 'dev_server': not with `listen`: the workers already serve "
            f"on {', '.join(parsed['listen'])}; connect there (a `tcp://127.0.0.1:8000` listener serves locally)"
        )


def _check_preload(parsed: dict[str, Any], origins: dict[str, str], first: str) -> None:
    """Preload starts the command once per generation and forks every worker from it, so
    the command cannot carry what differs between workers."""
    if not parsed["preload"]:
        return
    used = sorted({name for arg in parsed["command"] for name in PLACEHOLDERS if "{" + name + "}" in arg})
    if used:
        names = ", ".join("{" + name + "}" for name in used)
        raise ConfigError(
            f"{origins.get('command', first)}: key 'command': {names} differs between workers, and with "
            "`preload = true` the command runs once per generation and the workers are forked from it; a "
            "preloading program reads its worker's values from the environment (SOCKHERD_SOCKET, "
            "SOCKHERD_WORKER_ID, SOCKHERD_INDEX) after `sockherd.preload.fork_point()`"
        )


def _build(path: Path, files: tuple[Path, ...], values: dict[str, Any]) -> Config:
    worker = WorkerSpec(
        command=values["command"],
        cwd=values["cwd"],
        env=values["env"],
        environment=values["environment"],
        ready=values["ready"],
        stdout=values["stdout"],
        stderr=values["stderr"],
        stop_signal=values["stop_signal"],
        socket_mode=values["socket_mode"],
        backlog=values["backlog"],
        socket_group=values["socket_group"],
        preload=values["preload"],
    )
    timeouts = Timeouts(
        spawn=values["spawn_timeout"],
        online=values["online_timeout"],
        shutdown=values["shutdown_timeout"],
        kill=values["kill_timeout"],
        linger=values["linger"],
    )
    return Config(
        path=path,
        files=files,
        name=values["name"],
        tmp_dir=values["tmp_dir"],
        socket_file=values["socket_file"],
        ipc_file=values["ipc_file"],
        workers=values["workers"],
        standby=values["standby"],
        worker=worker,
        timeouts=timeouts,
        max_start_attempts=values["max_start_attempts"],
        strategy=values["strategy"],
        symlinks=values["symlinks"],
        listen=values["listen"],
        dev_server=values["dev_server"],
        max_memory=values["max_memory"],
        max_age=values["max_age"],
        pidfile=values["pidfile"],
        keep_previous=values["keep_previous"],
    )
