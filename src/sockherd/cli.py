"""The ``sockherd`` command: parse, call the daemon, print. No logic of its own.

Exit codes: 0 done, 1 the command failed (reason on stderr), 2 bad usage or config,
3 no daemon answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sockherd import __version__, cli_messaging
from sockherd.cli_summary import Progress, failure, summary
from sockherd.client import Client, CommandFailed, DaemonUnreachable, RequestFailed
from sockherd.config import Config, ConfigError, load_config
from sockherd.status_table import colour_wanted, format_status, health_problems

__all__ = ["build_parser", "format_status", "health_problems", "main"]  # format_status: status_table's

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
DEV_SERVER_DEFAULT = -1  # `--dev-server` given without a port


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before or after the command; the sub-parser's default must not
    # overwrite a value given before it.
    default = None if top else argparse.SUPPRESS
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-c", "--config", type=Path, default=default, help="config file (default: discovered in .)")
    group.add_argument("-i", "--ipc", type=Path, default=default, help="IPC socket of a running daemon")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sockherd", description="Zero-downtime process manager for web workers.")
    parser.add_argument("--version", action="version", version=f"sockherd {__version__}")
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        _common(sub, top=False)
        return sub

    daemon = command("daemon", "run the daemon in the foreground")
    daemon.add_argument(
        "--dev-server",
        nargs="?",
        const=DEV_SERVER_DEFAULT,
        type=int,
        metavar="PORT",
        help="also serve http://127.0.0.1:PORT/ (default: dev_server from the config, else 8000; 0: any free port)",
    )
    daemon.add_argument("--no-start", action="store_true", help="start the daemon with no workers (then `start`)")
    daemon.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    daemon.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object per line (time, level, event, message, worker fields); "
        "under journald either drops the time and prefixes the priority",
    )

    status = command("status", "show the daemon and its workers")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=float,
        metavar="SECONDS",
        help="redraw the table with memory, CPU and listen queues every SECONDS (default 2) until Ctrl-C",
    )
    command("config", "print the running daemon's configuration (JSON)")
    for name, help_ in (("start", "start the workers"), ("restart", "start a new generation, then retire the old")):
        sub = command(name, help_)
        sub.add_argument("--max-attempts", type=int, metavar="N", help="tries per worker (default: max_start_attempts)")
        sub.add_argument(
            "--suspended", action="store_true", help="workers hold requests until `sockherd resume` (migrations)"
        )
        sub.add_argument("--json", action="store_true", help="print the result (and the status) as JSON")
        if name == "restart":
            sub.add_argument(
                "--upgrade",
                action="store_true",
                help="if a newer sockherd is installed, re-execute the daemon in place (same pid) first",
            )
            sub.add_argument(
                "--keep-previous",
                type=_duration,
                metavar="DURATION",
                help="keep the old generation this long (60, 90s, 5m, 1h), warm and out of traffic, for `rollback`",
            )
            sub.add_argument(
                "--canary",
                type=int,
                metavar="N",
                help="publish the new generation on N slots only; then `promote` or `rollback`",
            )
    command("health", "exit 0 only when every slot is served by an online worker (readiness probes)")
    command("resume", "release the requests suspended workers hold")
    for name, help_ in (
        ("rollback", "go back to the kept generation (renames only), retire the other"),
        ("commit", "retire the kept generation now: the deploy is final"),
        ("promote", "complete a canary deploy: every slot switches to the new generation"),
    ):
        command(name, help_).add_argument("--json", action="store_true", help="print the result as JSON")
    for name, help_ in (("set-workers", "scale the published workers"), ("set-standby", "scale the standbys")):
        command(name, help_ + " (until the next reload)").add_argument("count", type=int, metavar="N")
    command("stop", "stop the workers (the daemon keeps running)")
    command("reload", "re-read the config and apply it (restarting workers if needed)")
    command("terminate", "stop the workers and the daemon")
    cli_messaging.add_commands(command)
    init = command("init", "write a starter sockherd.toml and print nginx and systemd snippets")
    init.add_argument("--force", action="store_true", help="overwrite an existing sockherd.toml")
    init.add_argument(
        "--listen",
        action="store_true",
        help="one shared listener for every worker (nginx: one server line, its defaults), not per-worker sockets",
    )
    doctor = command("doctor", "check this host and nginx's configuration for what would lose requests")
    doctor.add_argument(
        "--nginx", metavar="PATH", help="nginx's config file, a saved `nginx -T`, or - for stdin (default: nginx -T)"
    )
    doctor.add_argument(
        "--nginx-version",
        metavar="X.Y.Z",
        help="nginx's version, for --nginx PATH (its defaults changed in 1.29.7; default: nginx -v)",
    )
    doctor.add_argument("--json", action="store_true", help="the findings as a JSON list")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "daemon":
            return _run_daemon(args)
        if args.command == "init":
            from sockherd.init import run_init

            return run_init(Path.cwd(), force=args.force, listen=args.listen)
        if args.command == "doctor":
            if args.ipc is not None:
                raise ConfigError("doctor reads the config: give it with -c, not -i")
            from sockherd import doctor

            return doctor.main(args.config, nginx=args.nginx, as_json=args.json, nginx_version=args.nginx_version)
        return _run_client_command(args)
    except ConfigError as exc:
        print(f"sockherd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnreachable as exc:
        print(f"sockherd: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as exc:
        print(failure(args.command, str(exc), exc.data), file=sys.stderr)
        return EXIT_FAILED
    except RequestFailed as exc:
        print(f"sockherd: {args.command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sockherd status | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _ipc_path(args: argparse.Namespace) -> Path:
    if args.ipc is not None:
        return Path(args.ipc)
    try:
        return _load(args).ipc_path
    except ConfigError as exc:
        if args.command == "reload":
            raise ConfigError(
                f"{exc}\n(nothing was sent: the daemon keeps running with its current configuration)"
            ) from None
        raise


def _run_daemon(args: argparse.Namespace) -> int:
    import asyncio  # the daemon's alone: client commands start faster without it

    from sockherd.daemon import logformat
    from sockherd.daemon.daemon import Daemon
    from sockherd.daemon.lifecycle import DaemonError

    logformat.configure(args.log_level, args.log_format, sys.stderr, os.environ)
    config = _load(args)
    port = config.dev_server
    if args.dev_server == DEV_SERVER_DEFAULT:
        port = config.dev_server or 8000
    elif args.dev_server is not None:
        port = args.dev_server
    if port is not None and config.listen:
        print(
            f"sockherd: --dev-server is for per-worker sockets; with `listen` ({config.path}) the workers "
            f"already serve on {', '.join(config.listen)}",
            file=sys.stderr,
        )
        return EXIT_USAGE

    from sockherd.daemon.listeners import close_on_exec_strays, take_activated
    from sockherd.daemon.upgrade import take_inherited

    inherited = take_inherited()  # set when this image is an upgrade of the one before (same pid)
    activated = take_activated(os.environ)  # systemd socket activation
    close_on_exec_strays()

    async def run() -> int:
        daemon = Daemon(
            config,
            dev_server_port=port,
            start_workers=not args.no_start,
            inherited=inherited,
            activated=activated,
        )
        return await daemon.run()

    try:
        return asyncio.run(run())
    except DaemonError as exc:
        print(f"sockherd: {exc}", file=sys.stderr)
        return EXIT_FAILED


_progress = Progress()


def _run_client_command(args: argparse.Namespace) -> int:
    ipc = _ipc_path(args)
    if args.command == "status":
        try:
            client = Client(ipc)
            client.connect()
        except DaemonUnreachable as exc:
            return _status_of_a_dead_daemon(ipc, exc, as_json=args.json)
    else:
        client = Client(ipc)
    with client:
        if args.command == "status" and args.watch is not None:
            from sockherd.cli_watch import watch

            return watch(client, max(args.watch, 0.1))
        if args.command == "status":
            status = client.call("status")
            colour = colour_wanted(sys.stdout)
            print(json.dumps(status, indent=2) if args.json else format_status(status, colour=colour))
            return 0
        if args.command == "config":
            print(json.dumps(client.call("config"), indent=2))
            return 0
        if args.command == "health":
            problems = health_problems(client.call("status"))
            print("healthy" if not problems else "unhealthy: " + "; ".join(problems))
            return EXIT_FAILED if problems else 0
        if args.command in ("send-msg", "send-req"):
            return cli_messaging.run(client, args)
        data: dict[str, Any] = {}
        if getattr(args, "max_attempts", None) is not None:
            data["max_attempts"] = args.max_attempts
        if getattr(args, "suspended", False):
            data["suspended"] = True
        if getattr(args, "upgrade", False):
            data["upgrade"] = True
        if getattr(args, "keep_previous", None) is not None:
            data["keep_previous"] = args.keep_previous
        if getattr(args, "canary", None) is not None:
            data["canary"] = args.canary
        if getattr(args, "count", None) is not None:
            data["count"] = args.count
        result = client.call(args.command, data or None, on_progress=_progress)
        print(json.dumps(result, indent=2) if getattr(args, "json", False) else summary(args.command, result))
        return 0


def _status_of_a_dead_daemon(ipc: Path, unreachable: DaemonUnreachable, *, as_json: bool) -> int:
    """No daemon answers: say what its state file shows still running (start times verified)."""
    from sockherd.daemon.state_file import daemon_alive, live_workers, read_state  # only here: keeps the CLI light

    state = read_state(ipc.with_name(ipc.name + ".state.json"))
    if state is None:
        raise unreachable
    recorded = state.get("daemon")
    daemon: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    alive = daemon_alive(state)
    workers = live_workers(state)
    if as_json:
        report = {
            "daemon": {**daemon, "state": "not answering" if alive else "dead"},
            "workers": [
                {k: w.get(k) for k in ("id", "pid", "index", "state", "generation", "socket")} for w in workers
            ],
        }
        print(json.dumps(report, indent=2))
    else:
        pid = daemon.get("pid")
        why = f"pid {pid} is alive but does not answer on {ipc}" if alive else f"pid {pid} is gone"
        print(f"sockherd: daemon not running ({why})", file=sys.stderr)
        if workers:
            print(f"{len(workers)} worker(s) it started are still running:")
            for w in workers:
                index = "standby" if w.get("index") is None else w.get("index")
                print(f"  {w.get('id')}  pid {w.get('pid')}  index {index}  generation {w.get('generation')}")
        else:
            print("none of the workers it started is still running")
    return EXIT_UNREACHABLE


def _duration(text: str) -> float:
    """``60``, ``90s``, ``5m``, ``1h``, ``1.5m``: seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1.0)
    try:
        seconds = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (60, 90s, 5m, 1h)") from None
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration from 1 second to 24 hours")
    return seconds
