"""How long the worker keeps an idle connection open, read from its command (for ``doctor``).

nginx must give up an idle upstream connection before the worker closes it, or it
writes a request into a connection the worker is closing. This reads the worker's
keep-alive timeout from its command line: the uvicorn runner, uvicorn, hypercorn and
gunicorn, whose settings may also come from a configuration file (``-c FILE``, else
``./gunicorn.conf.py`` in the worker's directory) and ``GUNICORN_CMD_ARGS``. A
configuration file is read with :mod:`ast`, never run: a setting that is not a plain
literal assignment is reported as unknown.
"""

from __future__ import annotations

import ast
import os
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["RUNNER_KEEP_ALIVE", "KeepAlive", "gunicorn_settings", "worker_keepalive"]

# sockherd.uvicorn's DEFAULT_TIMEOUT_KEEP_ALIVE (a test checks): not imported, uvicorn is optional
RUNNER_KEEP_ALIVE: Final = 75
GUNICORN_KEEP_ALIVE: Final = 2
_GUNICORN_OPTIONS: Final = {
    "keepalive": ("--keep-alive",),
    "worker_class": ("-k", "--worker-class"),
    "threads": ("--threads",),
}
_GUNICORN_SETTINGS: Final = tuple(_GUNICORN_OPTIONS)
UNKNOWN: Final = object()  # a setting a configuration file sets in a way not read here


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """The worker's idle keep-alive timeout, or why it is not known."""

    server: str  # "uvicorn", "gunicorn", ... or "" (a command doctor does not know)
    timeout: float | None  # seconds; None when it cannot be read
    raise_with: str = ""  # how to raise it: "--timeout-keep-alive {seconds}", "keepalive = {seconds} in FILE"
    unknown: str = ""  # why timeout is None


def worker_keepalive(
    command: Iterable[str], cwd: Path | None = None, environment: Mapping[str, str] | None = None
) -> KeepAlive | None:
    """The worker's keep-alive, or None when it closes every connection after its response
    (gunicorn's sync worker). ``cwd`` and ``environment`` are the worker's, as configured."""
    argv = [word for arg in command for word in (shlex.split(arg) if " " in arg else [arg])]
    programs = [os.path.basename(w) for w in argv] + [argv[i + 1] for i, w in enumerate(argv[:-1]) if w == "-m"]
    if "sockherd.uvicorn" in programs:
        timeout = _number(_option(argv, "--timeout-keep-alive"), RUNNER_KEEP_ALIVE)
        return _known("python -m sockherd.uvicorn", timeout, "--timeout-keep-alive")
    if "uvicorn" in programs:
        return _known("uvicorn", _number(_option(argv, "--timeout-keep-alive"), 5), "--timeout-keep-alive")
    if "hypercorn" in programs:
        return _known("hypercorn", _number(_option(argv, "--keep-alive"), 5), "--keep-alive")
    if "gunicorn" in programs:
        return _gunicorn(argv, cwd, dict(environment or {}))
    return KeepAlive("", None, unknown="the worker's command does not say how long it keeps idle connections")


def _known(server: str, timeout: float | None, option: str) -> KeepAlive:
    if timeout is None:
        return KeepAlive(server, None, f"{option} {{seconds}}", f"its {option} is not a number")
    return KeepAlive(server, timeout, f"{option} {{seconds}}")


def _option(argv: list[str], *names: str) -> str | None:
    """The last value given for any of ``names`` (``--name V`` or ``--name=V``)."""
    found = None
    for i, word in enumerate(argv):
        for name in names:
            if word == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif word.startswith(name + "="):
                found = word.split("=", 1)[1]
    return found


def _number(value: str | None, default: float) -> float | None:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return None


def _gunicorn(argv: list[str], cwd: Path | None, environment: dict[str, str]) -> KeepAlive | None:
    """gunicorn's order: its defaults, then the configuration file, then GUNICORN_CMD_ARGS,
    then the command line; each later one wins."""
    env_args = shlex.split(environment.get("GUNICORN_CMD_ARGS", ""))
    config = _option(argv, "-c", "--config") or _option(env_args, "-c", "--config")
    if config is not None and config.startswith("python:"):
        return KeepAlive("gunicorn", None, "--keep-alive {seconds}", f"its settings come from the module {config[7:]}")
    path = Path(config or "gunicorn.conf.py")
    path = path if cwd is None else cwd / path
    settings: dict[str, object] = {}
    origin: dict[str, str] = {}  # setting -> where it was read
    if config is not None or path.is_file():  # gunicorn reads ./gunicorn.conf.py only when it exists
        try:
            settings = gunicorn_settings(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "it does not parse"
            return KeepAlive("gunicorn", None, "--keep-alive {seconds}", f"{path} cannot be read ({why})")
        origin = dict.fromkeys(settings, str(path))
    for source, name in ((env_args, "GUNICORN_CMD_ARGS"), (argv, "the command line")):
        for key, names in _GUNICORN_OPTIONS.items():
            value = _option(source, *names)
            if value is not None:
                settings[key], origin[key] = value, name
    raise_with = (
        f"keepalive = {{seconds}} in {path}" if origin.get("keepalive") == str(path) else "--keep-alive {seconds}"
    )
    worker_class, threads = settings.get("worker_class", "sync"), settings.get("threads", 1)
    if UNKNOWN in (worker_class, threads):
        return KeepAlive("gunicorn", None, raise_with, f"{path} sets worker_class or threads in a way not read here")
    if worker_class in ("sync", "gunicorn.workers.sync.SyncWorker") and _int(threads) in (None, 0, 1):
        return None  # the sync worker closes every connection after its response (threads > 1: gthread)
    keepalive = settings.get("keepalive", GUNICORN_KEEP_ALIVE)
    if keepalive is UNKNOWN:
        return KeepAlive("gunicorn", None, raise_with, f"{path} sets keepalive in a way not read here")
    timeout = _number(str(keepalive), GUNICORN_KEEP_ALIVE)
    if timeout is None:
        return KeepAlive("gunicorn", None, raise_with, f"its keepalive {keepalive!r} is not a number")
    return KeepAlive("gunicorn", timeout, raise_with)


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def gunicorn_settings(source: str) -> dict[str, object]:
    """keepalive, worker_class and threads from a gunicorn.conf.py, without running it:
    a top-level ``name = <literal>`` gives its value; any other way of setting one of them
    (an expression, an ``if``, ``import *``, an augmented assignment) gives UNKNOWN."""
    tree = ast.parse(source)
    found: dict[str, object] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name) and target.id in _GUNICORN_SETTINGS:
                    try:
                        found[target.id] = ast.literal_eval(statement.value)
                    except (ValueError, TypeError, SyntaxError, RecursionError):
                        found[target.id] = UNKNOWN
    simple = {id(t) for s in tree.body if isinstance(s, ast.Assign) for t in s.targets}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            return dict.fromkeys(_GUNICORN_SETTINGS, UNKNOWN)
        if (
            isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Store)
            and node.id in _GUNICORN_SETTINGS
            and id(node) not in simple
        ):
            found[node.id] = UNKNOWN
    return found
