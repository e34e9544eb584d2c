"""The ``sockherd`` command's entry point, with a fast path for ``status`` and ``health``.

Monitoring probes and scripts call ``sockherd status --json`` and ``sockherd health``
every few seconds, and each call used to pay for the full CLI's imports (argparse, the
config checker and its dataclasses, the client and its protocol classes): several times
Python's own start-up. This path answers those two commands with what they need alone:
the config files located and merged (:mod:`sockherd.config_files`, without checking
every key), one connection to the IPC socket (``_socket``: the ``socket`` module spends
milliseconds building enums), and the status formatter.

It has no messages of its own. Anything it does not recognise (another command, another
option, ``-h``) and anything that goes wrong (no config, a config it cannot read, no
daemon, a refused hello, an error reply) hands over to the full CLI
(:func:`sockherd.cli.main`), which does everything again and reports it as it always
has. Its output, when it has one, is the full CLI's, byte for byte (a test compares).
It does not check keys that do not locate the daemon, so a config that was broken
after the daemon started still shows the running daemon's status here.
"""

from __future__ import annotations

import json
import os
import sys

from sockherd.config_files import ConfigError, anchor_path, find_config, load_layers, merge

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["main", "run"]

# The protocol's (sockherd.protocol, which this path does not import; a test keeps them equal).
PROTOCOL_VERSION = 1
DEFAULT_IPC_FILE = "sockherd.ipc"  # the `ipc_file` default in config_settings (a test keeps them equal)
TIMEOUT = 10.0  # seconds for the daemon to answer; beyond it, the full CLI says what is wrong
EXIT_FAILED = 1


class _Fallback(Exception):
    """Hand over to the full CLI."""


def main() -> int:
    """The console script: the fast path if it applies, else the full CLI."""
    code = run(sys.argv[1:])
    if code is not None:
        return code
    from sockherd.cli import main as full_main

    return full_main()


def run(argv: list[str]) -> int | None:
    """Run ``status [--json]`` or ``health``; None when the full CLI must (see the module docs)."""
    parsed = _parse(argv)
    if parsed is None:
        return None
    command, as_json, config, ipc = parsed
    try:
        status = _ask_status(ipc if ipc is not None else _locate_ipc(config))
    except (_Fallback, ConfigError, OSError, ValueError, KeyError, TypeError):
        return None
    from sockherd import status_table

    try:
        if command == "health":
            problems = status_table.health_problems(status)
            print("healthy" if not problems else "unhealthy: " + "; ".join(problems))
            return EXIT_FAILED if problems else 0
        if as_json:
            print(json.dumps(status, indent=2))
        else:
            print(status_table.format_status(status, colour=status_table.colour_wanted(sys.stdout)))
    except BrokenPipeError:  # `sockherd status | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _parse(argv: list[str]) -> tuple[str, bool, str | None, str | None] | None:
    """(command, --json, -c, -i) for the forms this path serves; None for anything else."""
    command: str | None = None
    as_json = False
    where: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        name, equals, value = arg.partition("=")
        if name in ("-c", "--config", "-i", "--ipc"):
            key = "config" if name in ("-c", "--config") else "ipc"
            if not equals:
                value = next(args, "")
            if not value or where:  # a value missing, or both given (the full CLI refuses that)
                return None
            where[key] = value
        elif arg in ("status", "health") and command is None:
            command = arg
        elif arg == "--json" and command == "status" and not as_json:
            as_json = True
        else:
            return None
    if command is None:
        return None
    return command, as_json, where.get("config"), where.get("ipc")


def _locate_ipc(config: str | None) -> str:
    """The IPC socket the config names, located as :func:`sockherd.config.load_config` does."""
    cwd = os.getcwd()
    home = os.environ.get("HOME")
    first = find_config(cwd) if config is None else anchor_path(config, cwd, home)
    values, _ = merge(load_layers(first, cwd, home))
    tmp_dir = values.get("tmp_dir")
    ipc_file = values.get("ipc_file", DEFAULT_IPC_FILE)
    if not isinstance(tmp_dir, str) or not tmp_dir or "\0" in tmp_dir:
        raise _Fallback
    if not isinstance(ipc_file, str) or ipc_file in ("", ".", "..") or "/" in ipc_file or "\0" in ipc_file:
        raise _Fallback
    return os.path.join(anchor_path(tmp_dir, os.path.dirname(first), home), ipc_file)


def _ask_status(ipc: str) -> dict[str, Any]:
    """Hello and status, pipelined on one connection; the status reply's data."""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(ipc)
        hello = {"role": "client", "pid": os.getpid(), "version": PROTOCOL_VERSION}
        frames = [{"type": "hello", "id": 1, "data": hello}, {"type": "status", "id": 2}]
        sock.sendall(b"".join(json.dumps(f, separators=(",", ":")).encode() + b"\n" for f in frames))
        buffer = b""
        while True:
            line, newline, rest = buffer.partition(b"\n")
            if not newline:
                data = sock.recv(65536)
                if not data:
                    raise _Fallback
                buffer += data
                continue
            buffer = rest
            reply = json.loads(line)
            if reply.get("type") != "reply" or reply.get("errors"):
                raise _Fallback
            if reply.get("request_id") == 2 and reply.get("done"):
                status: dict[str, Any] = reply["data"]
                return status
    finally:
        sock.close()
