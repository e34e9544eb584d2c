"""The table of sockherd's config keys: how each one is checked, its default and its docs.

One definition drives three things so they cannot drift apart: the validator in
:mod:`sockherd.config`, the unknown-key check with its did-you-mean hint, and the key
reference in docs/config.md (rewritten by scripts/gen_config_docs.py, checked by a test).

Parsers take the raw TOML value and return the checked, normalised one, or raise
:class:`Invalid` with what was expected; the loader adds the file and the key.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import re
import shlex
import signal
import string
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

from sockherd.config_files import anchor_path, show

__all__ = [
    "KEYS",
    "MAX_INDEX_DIGITS",
    "MAX_WORKER_ID_LEN",
    "PLACEHOLDERS",
    "REQUIRED",
    "SETTINGS",
    "SUN_PATH_MAX",
    "WORKER_ENV_NAMES",
    "Context",
    "Invalid",
    "Setting",
    "format_size",
    "kernel_somaxconn",
    "parse_size",
    "resolve_path",
    "settings_table",
    "show",
]

SUN_PATH_MAX: Final = 107  # sun_path is 108 bytes including the terminating NUL
MAX_WORKER_ID_LEN: Final = 16
MAX_INDEX_DIGITS: Final = 5
PLACEHOLDERS: Final = ("socket", "id", "index")
DEFAULT_BACKLOG: Final = 4096
SOMAXCONN_PATH: Final = Path("/proc/sys/net/core/somaxconn")
# Set by the daemon for every worker: a value from the config would be silently overridden.
WORKER_ENV_NAMES: Final = frozenset(
    {"SOCKHERD_SOCKET", "SOCKHERD_WORKER_ID", "SOCKHERD_INDEX", "SOCKHERD_IPC", "SOCKHERD_SUSPENDED"}
    | {"SOCKHERD_SOCKET_MODE", "SOCKHERD_BACKLOG"}
    | {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)


class Invalid(Exception):
    """A value a parser rejects. ``subkey`` narrows the key (``environment.FOO``)."""

    def __init__(self, message: str, *, subkey: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.subkey = subkey


@dataclass(frozen=True, slots=True)
class Context:
    """What parsers need besides the value: where relative paths start, and $HOME for ``~``."""

    base_dir: Path
    home: str | None


Parser = Callable[[Any, Context], Any]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()


@dataclass(frozen=True, slots=True)
class Setting:
    """One config key. ``default`` is a TOML value fed through ``parse`` (so defaults obey the
    same rules as user values), a zero-argument callable computed at load, or REQUIRED.
    ``parse`` is None for keys the loader handles itself (``extends``)."""

    key: str
    type: str
    default: object
    help: str
    parse: Parser | None
    default_doc: str | None = None

    @property
    def default_text(self) -> str:
        if self.default_doc is not None:
            return self.default_doc
        return "required" if self.default is REQUIRED else f"`{show(self.default)}`"


def expected(what: str, value: object) -> Invalid:
    return Invalid(f"expected {what}, got {show(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # `true` is not a count


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- generic parsers -------------------------------------------------------------------


def integer(minimum: int, maximum: int = 2**31 - 1, *, what: str | None = None) -> Parser:
    if what is None:
        what = {0: "an integer >= 0", 1: "a positive integer"}.get(minimum, f"an integer from {minimum} to {maximum}")

    def parse(value: Any, ctx: Context) -> int:
        if not _is_int(value) or not minimum <= value <= maximum:
            raise expected(what, value)
        return int(value)

    return parse


def seconds(*, allow_zero: bool = False, allow_false: bool = False) -> Parser:
    """Every wait has a deadline: reject infinity and NaN as well as negatives."""
    what = "a number of seconds >= 0" if allow_zero else "a positive number of seconds"
    what += " or false" if allow_false else ""

    def parse(value: Any, ctx: Context) -> float | None:
        if allow_false and value is False:
            return None
        if not _is_number(value) or value < 0 or (value == 0 and not allow_zero):
            raise expected(what, value)
        return float(value)

    return parse


def boolean(value: Any, ctx: Context) -> bool:
    if not isinstance(value, bool):
        raise expected("true or false", value)
    return value


def choice(*options: str) -> Parser:
    what = "one of " + ", ".join(show(option) for option in options)

    def parse(value: Any, ctx: Context) -> str:
        if value not in options or not isinstance(value, str):
            raise expected(what, value)
        return value

    return parse


def file_name(value: Any, ctx: Context) -> str:
    if not isinstance(value, str) or not value or "/" in value or "\0" in value or value in {".", ".."}:
        raise expected('a file name (no "/")', value)
    return value


def resolve_path(raw: str, ctx: Context) -> Path:
    """Expand ``~`` and anchor relative paths at the first config file's directory."""
    return Path(anchor_path(raw, str(ctx.base_dir), ctx.home))


def path(value: Any, ctx: Context) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        raise expected("a path", value)
    return resolve_path(value, ctx)


def optional_path(value: Any, ctx: Context) -> Path | None:
    if value is False:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise expected("a path or false", value)
    return resolve_path(value, ctx)


# --- key-specific parsers --------------------------------------------------------------

_PLACEHOLDER = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")  # `${VAR}` belongs to the shell
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def command(value: Any, ctx: Context) -> tuple[str, ...]:
    what = "a non-empty list of non-empty strings or a command string"
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise Invalid(f"cannot split {show(value)}: {exc}") from None
    elif isinstance(value, list) and all(isinstance(arg, str) and arg for arg in value):
        argv = value
    else:
        raise expected(what, value)
    if not argv:
        raise expected(what, value)
    for arg in argv:
        for match in _PLACEHOLDER.finditer(arg):
            if match[1] not in PLACEHOLDERS:
                known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
                raise Invalid(f"unknown placeholder '{match[0]}' (known: {known})")
    return tuple(argv)


def name(value: Any, ctx: Context) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise expected('a name of letters, digits, "_", "." and "-"', value)
    return value


def socket_file(value: Any, ctx: Context) -> str:
    what = 'a file name with "{worker}" exactly once and no "/"'
    if not isinstance(value, str) or "/" in value or "\0" in value:
        raise expected(what, value)
    try:
        fields = [(field, spec, conv) for _, field, spec, conv in string.Formatter().parse(value) if field is not None]
    except ValueError:  # unbalanced braces
        raise expected(what, value) from None
    if fields != [("worker", "", None)]:
        raise expected(what, value)
    return value


def _cpu_count() -> int:
    """CPUs this process may run on (taskset, cpusets), which os.cpu_count() ignores."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def workers(value: Any, ctx: Context) -> int:
    if value == "auto":
        return _cpu_count()
    if not _is_int(value) or value < 1:
        raise expected('a positive integer or "auto"', value)
    return int(value)


def _env_name(key: str, subkey: str | None = None) -> str:
    if not key or "=" in key or "\0" in key:
        raise Invalid(f"invalid environment variable name {show(key)}", subkey=subkey)
    if key in WORKER_ENV_NAMES:
        raise Invalid(f"{key} is set by sockherd for each worker", subkey=subkey)
    return key


def env_names(value: Any, ctx: Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise expected("a list of variable names", value)
    return tuple(dict.fromkeys(_env_name(item) for item in value))


def environment(value: Any, ctx: Context) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise expected("a table of variables", value)
    pairs = []
    for key, item in value.items():
        _env_name(key, key)
        if isinstance(item, bool):  # TOML spelling, not Python's "True"
            pairs.append((key, "true" if item else "false"))
        elif isinstance(item, str) or _is_number(item):
            pairs.append((key, str(item)))
        else:
            raise Invalid(f"expected a string, number or boolean, got {show(item)}", subkey=key)
    return tuple(sorted(pairs))


_TCP = re.compile(r"tcp://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>[0-9]{1,5})")


def listen(value: Any, ctx: Context) -> tuple[str, ...]:
    what = 'a list of "tcp://host:port", "tcp://[v6]:port" or "unix:///path" addresses'
    if not isinstance(value, list):
        raise expected(what, value)
    addresses: list[str] = []
    for item in value:
        if isinstance(item, str) and item.startswith("unix://") and item != "unix://":
            socket_path = path(item.removeprefix("unix://"), ctx)
            if len(os.fsencode(socket_path)) > SUN_PATH_MAX:
                raise Invalid(
                    f"{show(item)}: socket path is {len(os.fsencode(socket_path))} bytes, "
                    f"over the {SUN_PATH_MAX}-byte limit of a UNIX socket address"
                )
            address = f"unix://{socket_path}"
        elif isinstance(item, str) and (match := _TCP.fullmatch(item)):
            if match["v6"] is not None:
                try:
                    ipaddress.IPv6Address(match["v6"])
                except ValueError:
                    raise Invalid(f"{show(item)}: {match['v6']!r} is not an IPv6 address") from None
            if not 1 <= int(match["port"]) <= 65535:
                raise Invalid(f"{show(item)}: port must be from 1 to 65535")
            address = item
        else:
            raise expected(what, item)
        if address in addresses:
            raise Invalid(f"{show(item)} is listed twice")
        addresses.append(address)
    return tuple(addresses)


def dev_server(value: Any, ctx: Context) -> int | None:
    if value is False:
        return None
    if value is True:
        return 8000
    if not _is_int(value) or not 1 <= value <= 65535:
        raise expected("false, true or a port from 1 to 65535", value)
    return int(value)


def stop_signal(value: Any, ctx: Context) -> signal.Signals:
    what = 'a signal name such as "SIGTERM" or a signal number'
    try:
        if _is_int(value) or (isinstance(value, str) and value.isdigit()):
            return signal.Signals(int(value))
        if isinstance(value, str):
            upper = value.upper()
            return signal.Signals[upper if upper.startswith("SIG") else "SIG" + upper]
    except (KeyError, ValueError):
        pass
    raise expected(what, value)


def socket_mode(value: Any, ctx: Context) -> int:
    what = 'a mode from 0o000 to 0o777 (written 0o660 or "660")'
    if isinstance(value, str):
        digits = value[2:] if value[:2].lower() == "0o" else value
        if re.fullmatch("[0-7]{1,4}", digits) and int(digits, 8) <= 0o777:
            return int(digits, 8)
    elif _is_int(value) and 0 <= value <= 0o777:
        return int(value)
    raise expected(what, value)


def socket_group(value: Any, ctx: Context) -> int | None:
    """A group name or gid; false: tmp_dir's own group."""
    if value is False:
        return None
    if isinstance(value, str) and value and not value.isdigit():
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise Invalid(
                f'no group named {show(value)} on this machine (nginx\'s is often "www-data" or "nginx")'
            ) from None
    if (_is_int(value) and value >= 0) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    raise expected('a group name such as "www-data", a gid, or false', value)


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_SIZE_UNITS: Final = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "512MiB", "1.5G", "500MB" or "100K".

    Bare K/M/G/T are binary like systemd's MemoryMax=; "KB"/"MB"/... are decimal.
    """
    what = 'a positive number of bytes or a size such as "512MiB"'
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)) and match[2].lower() in _SIZE_UNITS:
        try:
            size = int(Decimal(match[1]) * _SIZE_UNITS[match[2].lower()])
        except InvalidOperation:
            raise expected(what, value) from None
    else:
        raise expected(what, value)
    if size < 1:
        raise expected(what, value)
    return size


def format_size(size: int) -> str:
    """The shortest exact spelling of ``size`` that parse_size reads back."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def max_memory(value: Any, ctx: Context) -> int | None:
    return None if value is False else parse_size(value)


def kernel_somaxconn(source: Path = SOMAXCONN_PATH) -> int:
    """The kernel's cap on listen() backlogs: asking for less makes a busy nginx fail with EAGAIN."""
    try:
        value = int(source.read_text().strip())
    except (OSError, ValueError):
        return DEFAULT_BACKLOG
    return value if value >= 1 else DEFAULT_BACKLOG


# --- the table ---------------------------------------------------------------------------

_TIMEOUT = seconds()

SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("command", "list of strings, or a string", REQUIRED,
            "argv of a worker, or a string split like a shell would; `{socket}`, `{id}` and `{index}` are "
            "substituted in every argument", command),
    Setting("tmp_dir", "path", REQUIRED,
            "directory for worker sockets, their symlinks and the IPC and notify sockets", path),
    Setting("name", "string", "app", "app name, used in process titles and logs", name),
    Setting("socket_file", "string", "app.{worker}.sock",
            "symlink name pattern inside `tmp_dir`; must contain `{worker}` once", socket_file),
    Setting("ipc_file", "string", "sockherd.ipc", "IPC socket name inside `tmp_dir`", file_name),
    Setting("workers", 'integer or "auto"', 1,
            'number of online workers; `"auto"` is the number of CPUs the daemon may run on', workers),
    Setting("standby", "integer", 0, "number of standby workers, ready to replace a failed one", integer(0)),
    Setting("ready", "string", "notify",
            '`"notify"`: the worker reports ready (library or sd_notify `READY=1`); `"socket"`: ready when '
            "its socket accepts a connection (for unmodified servers)", choice("notify", "socket")),
    Setting("preload", "boolean", False,
            "import the app once per generation and fork its workers from that process (sharing its memory); "
            "for `python -m sockherd.uvicorn` and programs that call `sockherd.preload.fork_point()`",
            boolean),
    Setting("preload_spare", "boolean", True,
            "with `preload`: between deploys, keep the next deploy's fork server started up to the app's "
            "import (an interpreter with the server imported, ~20 MiB), so that a deploy waits only for the "
            "app; for programs that call `sockherd.preload.warm_point()`, as the uvicorn runner does",
            boolean),
    Setting("preload_teardown", "boolean", False,
            "with `preload`: a forked worker that has finished serving exits through the interpreter's "
            "teardown, which frees every object and so writes to every page it shares with its fork server; "
            "by default it joins its threads, runs its atexit hooks, flushes stdout and stderr and exits "
            "without it, as Python's multiprocessing ends the children it forks",
            boolean),
    Setting("env", "list of strings", [], "names of the daemon's environment variables passed to workers",
            env_names),
    Setting("environment", "table", {}, "variables set for workers; numbers and booleans become strings",
            environment),
    Setting("cwd", "path", ".", "working directory of workers", path, default_doc="the config file's directory"),
    Setting("listen", "list of strings", [],
            "shared listeners the daemon binds and hands to every worker (`LISTEN_FDS`), e.g. "
            '`["tcp://127.0.0.1:8000", "unix:///run/app/app.sock"]`; no per-worker sockets, symlinks or standbys '
            "then (docs/concepts.md, \"Two listener modes\")", listen),
    Setting("dev_server", "boolean or integer", False, "local TCP proxy to the workers: `true` (port 8000) or a port",
            dev_server),
    Setting("stdout", "path or false", False,
            "file that workers' stdout is appended to; `false`: the daemon's own stdout", optional_path,
            default_doc="the daemon's stdout"),
    Setting("stderr", "path or false", False,
            "file that workers' stderr is appended to; `false`: the daemon's own stderr", optional_path,
            default_doc="the daemon's stderr"),
    Setting("spawn_timeout", "seconds", 2, "time for a worker process to start", _TIMEOUT),
    Setting("online_timeout", "seconds", 10, "time for a started worker to report ready", _TIMEOUT),
    Setting("shutdown_timeout", "seconds", 10, "time for a graceful shutdown before SIGTERM", _TIMEOUT),
    Setting("kill_timeout", "seconds", 5, "time after SIGTERM before SIGKILL", _TIMEOUT),
    Setting("max_start_attempts", "integer", 1,
            "tries per worker for an explicit start or restart; crashes are retried forever with backoff",
            integer(1)),
    Setting("strategy", "string", "atomic",
            '`"atomic"`: a whole new generation online before any symlink moves; `"rolling"`: one index at a time',
            choice("atomic", "rolling")),
    Setting("symlinks", "string", "relative", '`"relative"` or `"absolute"` symlink targets',
            choice("relative", "absolute")),
    Setting("stop_signal", "string or integer", "SIGTERM",
            "first signal sent to workers that do not use the library", stop_signal),
    Setting("socket_mode", "integer or string", 0o660,
            'mode of worker sockets (for the nginx group); write `0o660` or `"660"`', socket_mode,
            default_doc="`0o660`"),
    Setting("socket_group", "string, integer or false", False,
            "group of worker sockets (nginx's), set by the daemon whatever the worker did; `false`: tmp_dir's group; "
            "a tmp_dir the daemon creates gets this group too, mode 2750",
            socket_group, default_doc="tmp_dir's group"),
    Setting("linger", "seconds", 0.25, "wait after moving a symlink away from a worker before its shutdown",
            seconds(allow_zero=True)),
    Setting("backlog", "integer", kernel_somaxconn, "`listen()` backlog of worker and shared sockets", integer(1),
            default_doc="the kernel's `somaxconn` (4096 if unreadable)"),
    Setting("max_memory", 'integer, string or false', False,
            'recycle a worker whose RSS exceeds this many bytes (or `"512MiB"`), one slot at a time; `false`: never',
            max_memory, default_doc="none"),
    Setting("max_age", "seconds or false", False,
            "recycle a worker after this many seconds, with jitter; `false`: never",
            seconds(allow_false=True), default_doc="none"),
    Setting("keep_previous", "seconds or false", False,
            "after a restart, keep the previous generation this long, warm and out of traffic, so that "
            "`sockherd rollback` is a rename (`restart --keep-previous` overrides it); `false`: retire it at once",
            seconds(allow_false=True), default_doc="none"),
    Setting("pidfile", "path or false", False,
            "file the daemon writes its pid to (removed when it exits); `false`: none", optional_path,
            default_doc="none"),
    Setting("extends", "path", False, "another config file (relative to this one) whose keys this one overrides", None,
            default_doc="none"),
)  # fmt: skip

KEYS: Final = tuple(setting.key for setting in SETTINGS)


def settings_table() -> str:
    """The Markdown key reference that docs/config.md carries between its settings markers."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        cells = (f"`{setting.key}`", setting.type, setting.default_text, setting.help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
