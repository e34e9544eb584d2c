"""The ``sockherd`` command's entry point, with a fast path for ``status``, ``health`` and deploys.

Monitoring probes and scripts call ``sockherd status --json`` and ``sockherd health``
every few seconds, and each call used to pay for the full CLI's imports (argparse, the
config checker and its dataclasses, the client and its protocol classes): several times
Python's own start-up. This path answers those two commands with what they need alone:
the config files located and merged (:mod:`sockherd.config_files`, without checking
every key; the keys that locate the daemon read by :mod:`sockherd.config_scan`, without
tomllib, whenever it is sure of them), one connection to the IPC socket (``_socket``:
the ``socket`` module spends milliseconds building enums), and the status formatter.

It has no messages of its own. Anything it does not recognise (another command, another
option, ``-h``) and anything that goes wrong (no config, a config it cannot read, no
daemon, a refused hello, an error reply) hands over to the full CLI
(:func:`sockherd.cli.main`), which does everything again and reports it as it always
has. Its output, when it has one, is the full CLI's, byte for byte (a test compares).
It does not check keys that do not locate the daemon, so a config that was broken
after the daemon started still shows the running daemon's status here.

``start`` and ``restart`` (with ``--suspended`` and ``--json``, nothing else) take this
path too: a deploy script waits for the command, and under load the full CLI's start
and exit were a quarter of a restart's time. Up to the daemon's answer to ``hello``
anything that goes wrong hands over as above (nothing was asked yet); from the moment
the command is sent this path owns it and reports its progress, its result and its
failure exactly as the full CLI would: the command must never be sent twice. As for
``status``, only the keys that locate the daemon are read: a deploy runs the config the
daemon has (it does not re-read the file), so a file broken since does not stop one
(``reload`` and ``config`` check the file; the full CLI, for any other option, too).
"""

from __future__ import annotations

import json
import os
import sys

from sockherd.config_files import ConfigError, anchor_path, find_config, load_layers, merge, read_keys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["main", "run"]

# The protocol's (sockherd.protocol, which this path does not import; a test keeps them equal).
PROTOCOL_VERSION = 1
DEFAULT_IPC_FILE = "sockherd.ipc"  # the `ipc_file` default in config_settings (a test keeps them equal)
TIMEOUT = 10.0  # seconds for the daemon to answer; beyond it, the full CLI says what is wrong
EXIT_FAILED, EXIT_UNREACHABLE = 1, 3  # the full CLI's
_LOCATING = frozenset({"tmp_dir", "ipc_file", "extends"})  # the keys that say where the IPC socket is
DEPLOYS = ("start", "restart")


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
    """Run ``status [--json]``, ``health`` or a plain deploy; None when the full CLI must (see the module docs)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # as the full CLI: no traceback
        return 130


def _run(argv: list[str]) -> int | None:
    parsed = _parse(argv)
    if parsed is None:
        return None
    command, options, config, ipc = parsed
    try:
        connection = _Connection(ipc if ipc is not None else _locate_ipc(config))
    except (_Fallback, ConfigError, OSError, ValueError, KeyError, TypeError):
        return None
    with connection:
        if command in DEPLOYS:
            return _deploy(connection, command, options)
        try:
            status = connection.ask_status()
        except (_Fallback, OSError, ValueError, KeyError, TypeError):
            return None
    from sockherd import status_table

    try:
        if command == "health":
            problems = status_table.health_problems(status)
            print("healthy" if not problems else "unhealthy: " + "; ".join(problems))
            return EXIT_FAILED if problems else 0
        if "--json" in options:
            print(json.dumps(status, indent=2))
        else:
            print(status_table.format_status(status, colour=status_table.colour_wanted(sys.stdout)))
    except BrokenPipeError:  # `sockherd status | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _parse(argv: list[str]) -> tuple[str, frozenset[str], str | None, str | None] | None:
    """(command, its options, -c, -i) for the forms this path serves; None for anything else."""
    command: str | None = None
    options: set[str] = set()
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
        elif arg in ("status", "health", *DEPLOYS) and command is None:
            command = arg
        elif arg not in options and (
            (arg == "--json" and command in ("status", *DEPLOYS)) or (arg == "--suspended" and command in DEPLOYS)
        ):
            options.add(arg)
        else:
            return None
    if command is None:
        return None
    return command, frozenset(options), where.get("config"), where.get("ipc")


def _deploy(connection: _Connection, command: str, options: frozenset[str]) -> int | None:
    """``start``/``restart``: hand over until the daemon greeted us, then see it through."""
    try:
        connection.hello()
    except (_Fallback, OSError, ValueError, KeyError, TypeError):
        return None
    request: dict[str, Any] = {"type": command, "id": 2}
    if "--suspended" in options:
        request["data"] = {"suspended": True}
    try:
        connection.send(request)
    except OSError as exc:
        _say(f"sockherd: could not send to the daemon: {exc}")
        return EXIT_UNREACHABLE
    from sockherd.cli_summary import Progress, failure, summary

    progress = Progress()
    try:
        while True:
            reply = connection.reply(2, timeout=None)  # a deploy takes as long as the daemon works
            errors = reply.get("errors")
            if errors:
                _say(failure(command, "; ".join(str(e) for e in errors), reply.get("data")))
                return EXIT_FAILED
            data = reply.get("data")
            if reply.get("done", True):
                break
            if isinstance(data, dict) and "progress" in data:
                progress(str(data["progress"]))
    except (_Closed, OSError) as exc:
        _say(f"sockherd: {exc}")
        return EXIT_UNREACHABLE
    try:
        print(json.dumps(data, indent=2) if "--json" in options else summary(command, data))
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _say(line: str) -> None:
    """A line on stderr, unless nobody reads it any more (the exit code still says it)."""
    try:
        print(line, file=sys.stderr)
    except OSError:
        return


def _locate_ipc(config: str | None) -> str:
    """The IPC socket the config names, located as :func:`sockherd.config.load_config` does."""
    cwd = os.getcwd()
    home = os.environ.get("HOME")
    first = find_config(cwd) if config is None else anchor_path(config, cwd, home)
    values, _ = merge(load_layers(first, cwd, home, read=lambda path, shown: read_keys(path, shown, _LOCATING)))
    tmp_dir = values.get("tmp_dir")
    ipc_file = values.get("ipc_file", DEFAULT_IPC_FILE)
    if not isinstance(tmp_dir, str) or not tmp_dir or "\0" in tmp_dir:
        raise _Fallback
    if not isinstance(ipc_file, str) or ipc_file in ("", ".", "..") or "/" in ipc_file or "\0" in ipc_file:
        raise _Fallback
    return os.path.join(anchor_path(tmp_dir, os.path.dirname(first), home), ipc_file)


class _Closed(Exception):
    """The connection ended before the answer did (the full CLI's DaemonUnreachable words)."""


class _Connection:
    """One connection to the IPC socket: newline-delimited JSON frames (sockherd.protocol)."""

    def __init__(self, ipc: str) -> None:
        import _socket

        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self._buffer = b""
        try:
            self._sock.settimeout(TIMEOUT)
            self._sock.connect(ipc)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def send(self, *frames: dict[str, Any]) -> None:
        self._sock.sendall(b"".join(json.dumps(f, separators=(",", ":")).encode() + b"\n" for f in frames))

    def _hello_frame(self) -> dict[str, Any]:
        hello = {"role": "client", "pid": os.getpid(), "version": PROTOCOL_VERSION}
        return {"type": "hello", "id": 1, "data": hello}

    def hello(self) -> None:
        """Greeted, or _Fallback (a refused hello: the full CLI says why)."""
        self.send(self._hello_frame())
        try:
            reply = self.reply(1, timeout=TIMEOUT)
        except _Closed:
            raise _Fallback from None
        if reply.get("errors") or not reply.get("done"):
            raise _Fallback

    def ask_status(self) -> dict[str, Any]:
        """Hello and status, pipelined; the status reply's data."""
        self.send(self._hello_frame(), {"type": "status", "id": 2})
        try:
            while True:
                reply = self.reply(None, timeout=TIMEOUT)
                if reply.get("errors"):
                    raise _Fallback
                if reply.get("request_id") == 2 and reply.get("done"):
                    status: dict[str, Any] = reply["data"]
                    return status
        except _Closed:
            raise _Fallback from None

    def reply(self, request_id: int | None, *, timeout: float | None) -> dict[str, Any]:
        """The next reply (to ``request_id``, if given); _Closed if the connection ends first."""
        self._sock.settimeout(timeout)
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    raise _Closed(f"the daemon did not answer within {timeout}s") from None
                except ConnectionError as exc:
                    raise _Closed(f"the daemon closed the connection ({exc.strerror})") from None
                if not data:
                    raise _Closed("the daemon closed the connection")
                self._buffer += data
                continue
            self._buffer = rest
            try:
                frame = json.loads(line)
            except ValueError as exc:
                raise _Closed(f"the daemon sent something this client cannot read: frame is not JSON: {exc}") from None
            if not isinstance(frame, dict):
                what = f"frame is a JSON {type(frame).__name__}, not an object"
                raise _Closed(f"the daemon sent something this client cannot read: {what}")
            if frame.get("type") != "reply":
                continue  # not a reply (nothing else is sent to clients today)
            if request_id is None or frame.get("request_id") == request_id:
                return frame
