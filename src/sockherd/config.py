"""Load sockherd's TOML config: find the file, follow ``extends``, check every key.

The result is a tree of frozen dataclasses, so a generation of workers can keep the exact
spec it was started with while a reload builds the next one. Every problem is a
:class:`ConfigError` naming the file and the key: the daemon must refuse a bad config (or
keep the running one on reload) with a reason the user can act on, never a traceback.

The keys themselves (checks, defaults, docs) are defined once in
:mod:`sockherd.config_settings`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from sockherd import config_files
from sockherd.config_files import CONFIG_NAMES, ConfigError, load_layers, merge
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

TEMP_SUFFIX_LEN: Final = 9  # "." + 8 hex characters after a temporary symlink's name


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
    preload_teardown: bool = False  # forked workers run the interpreter's teardown at exit (preload.exit_forked_worker)


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
    preload_spare: bool = True  # with preload: a spare fork server between deploys (daemon/forkservers.py)

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
            "preload_teardown": spec.preload_teardown,
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
            "preload_spare": self.preload_spare,
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
    layers = load_layers(str(first), str(cwd), home, KEYS)
    values, origins = merge(layers)
    ctx = Context(first.parent, home)
    parsed = {setting.key: _parse(setting, values, origins, ctx, layers[-1].shown) for setting in SETTINGS}
    _check_socket_paths(parsed, origins["tmp_dir"])
    _check_listener_mode(parsed, origins, layers[-1].shown)
    _check_preload(parsed, origins, layers[-1].shown)
    return _build(first, tuple(Path(layer.path) for layer in layers), parsed)


def find_config(cwd: Path) -> Path:
    """The config file for a directory (see :func:`sockherd.config_files.find_config`)."""
    return Path(config_files.find_config(str(cwd)))


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
        preload_teardown=values["preload_teardown"],
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
        preload_spare=values["preload_spare"],
    )
