"""Finding and reading sockherd's config files: discovery, ``extends`` chains, merging.

The part of loading a config that does not check any key, kept apart so that it imports
little (os; tomllib only when a file is parsed; paths are strings here, not pathlib's,
whose import costs more than the rest): :mod:`sockherd.config` builds on it to check
every key, and the CLI's fast path (:mod:`sockherd.cli_fast`) uses it alone to find the
daemon's IPC socket without loading the whole config machinery, reading the few keys it
needs without tomllib when it can (:func:`read_keys`).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from typing import Any, Final

    ReadTable = Callable[[str, str], "dict[str, Any] | None"]

__all__ = [
    "CONFIG_NAMES",
    "PYPROJECT",
    "ConfigError",
    "Layer",
    "anchor_path",
    "find_config",
    "load_layers",
    "merge",
    "read_keys",
    "read_table",
    "show",
]

CONFIG_NAMES: Final = ("sockherd.local.toml", ".sockherd.local.toml", "sockherd.toml", ".sockherd.toml")
PYPROJECT: Final = "pyproject.toml"


class ConfigError(Exception):
    """A config that cannot be used; the message names the file and the key."""


def show(value: object, limit: int = 80) -> str:
    """Render a value the way it is written in TOML (``true``, ``"x"``), not Python's repr."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        import json

        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list):
        text = "[" + ", ".join(show(item, limit) for item in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{key} = {show(item, limit)}" for key, item in value.items()) + "}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def anchor_path(raw: str, base_dir: str, home: str | None) -> str:
    """Expand ``~`` and anchor a relative path at ``base_dir`` (the first config file's directory).

    ``normpath`` rather than ``realpath``: a deploy that points ``current`` at a new release
    keeps ``current`` in the paths, so workers started later follow the symlink.
    """
    own_home = raw == "~" or raw.startswith("~/")  # $HOME as the config's environ says
    expanded = (home or os.path.expanduser("~")) + raw[1:] if own_home else os.path.expanduser(raw)
    return os.path.normpath(os.path.join(base_dir, expanded))


def find_config(cwd: str) -> str:
    """The config file for a directory: the first of CONFIG_NAMES, then a pyproject.toml
    that has a ``[tool.sockherd]`` table (one without it belongs to someone else)."""
    cwd = os.path.abspath(cwd)
    for file_name in CONFIG_NAMES:
        if os.path.isfile(candidate := os.path.join(cwd, file_name)):
            return candidate
    pyproject = os.path.join(cwd, PYPROJECT)
    if os.path.isfile(pyproject) and read_table(pyproject, PYPROJECT) is not None:
        return pyproject
    names = ", ".join(CONFIG_NAMES)
    raise ConfigError(
        f"no sockherd config in {cwd} (looked for {names} and [tool.sockherd] in {PYPROJECT}); "
        "run `sockherd init` to write one, or pass -c PATH"
    )


def read_table(path: str, shown: str) -> dict[str, Any] | None:
    """The sockherd table of one file; None for a pyproject.toml without one."""
    import tomllib  # here: the fast path often needs no parser at all (read_keys)

    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line N, column M)"
        raise ConfigError(f"{shown}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{shown}: invalid TOML: not UTF-8 text") from None
    if os.path.basename(path) != PYPROJECT:
        return data
    tool = data.get("tool")
    table = tool.get("sockherd") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{shown}: key 'tool.sockherd': expected a table, got {show(table)}")
    return table


def read_keys(path: str, shown: str, names: frozenset[str]) -> dict[str, Any] | None:
    """What :func:`read_table` returns, as far as the top-level string keys in ``names``
    go (the rest of the table may be missing): read without :mod:`tomllib` when
    :mod:`sockherd.config_scan` is certain of them, else with it."""
    if os.path.basename(path) != PYPROJECT:
        from sockherd.config_scan import scan

        try:
            with open(path, encoding="utf-8") as file:
                found = scan(file.read(), names)
        except (OSError, UnicodeDecodeError):
            found = None  # read_table says what is wrong with it
        if found is not None:
            return found
    return read_table(path, shown)


class Layer:
    """One file of an ``extends`` chain: its path, its name in messages, its table."""

    __slots__ = ("path", "shown", "table")

    def __init__(self, path: str, shown: str, table: dict[str, Any]) -> None:
        self.path = path
        self.shown = shown
        self.table = table


def load_layers(
    first: str,
    cwd: str,
    home: str | None,
    known: Collection[str] | None = None,
    read: ReadTable = read_table,
) -> list[Layer]:
    """The first file and everything it extends, extended files first (the merge order).
    With ``known``, a key not in it is an error (with a did-you-mean hint). ``read``
    reads one file's table (:func:`read_keys` reads only some keys)."""

    def shown(path: str) -> str:
        inside = path == cwd or path.startswith(cwd.rstrip("/") + "/")
        return os.path.relpath(path, cwd) if inside else path

    layers: list[Layer] = []
    seen: list[str] = []
    path: str | None = first
    while path is not None:
        identity = os.path.realpath(path)  # never raises, even on a symlink loop
        if identity in seen:
            chain = " -> ".join([*(layer.shown for layer in layers), shown(path)])
            raise ConfigError(f"{layers[-1].shown}: key 'extends': cycle {chain}")
        seen.append(identity)
        table = read(path, shown(path))
        if table is None:
            raise ConfigError(f"{shown(path)}: no [tool.sockherd] table")
        if known is not None:
            _check_known(table, known, shown(path))
        layers.append(Layer(path, shown(path), table))
        path = _extended(layers[-1], home)
    return layers[::-1]


def _check_known(table: dict[str, Any], known: Collection[str], shown: str) -> None:
    for key in table:
        if key not in known:
            import difflib

            hint = difflib.get_close_matches(key, list(known), n=1)
            suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{shown}: unknown key '{key}'{suffix}")


def _extended(layer: Layer, home: str | None) -> str | None:
    target = layer.table.get("extends")
    if target is None:
        return None
    if not isinstance(target, str) or not target or "\0" in target:
        raise ConfigError(f"{layer.shown}: key 'extends': expected a file path, got {show(target)}")
    path = anchor_path(target, os.path.dirname(layer.path), home)
    if not os.path.isfile(path):
        raise ConfigError(f"{layer.shown}: key 'extends': no such file: {path}")
    return path


def merge(layers: list[Layer]) -> tuple[dict[str, Any], dict[str, str]]:
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
