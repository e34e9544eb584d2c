"""``sockherd send-msg`` and ``sockherd send-req``: talk to running workers.

    sockherd send-msg [-w SEL] MESSAGE [JSON]
    sockherd send-req [-w SEL] REQUEST [JSON] [--timeout S] [--json]

Exit status: 0 when every selected worker got the message (answered the request), 1
when one did not (each is named), 2 for invalid JSON or a bad selector, 3 when no
daemon answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sockherd.client import Client, CommandFailed
from sockherd.worker_selector import SelectorError, parse_selector

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_commands(command: Any) -> None:
    """Add the two subcommands to the CLI's parser (``command`` makes a subparser)."""
    for name, what, help_ in (
        ("send-msg", "MESSAGE", "send a message to workers (their worker.on_message handlers)"),
        ("send-req", "REQUEST", "ask workers (their worker.request_handler) and print every reply"),
    ):
        sub: argparse.ArgumentParser = command(name, help_)
        sub.add_argument(
            "-w",
            "--workers",
            metavar="SEL",
            help="which workers: 3, 2-4, -4, 2-, $PID, a worker id; ! inverts; comma-separated "
            "(default: every published worker)",
        )
        sub.add_argument("name", metavar=what)
        sub.add_argument("data", nargs="?", metavar="JSON", help="the data, as JSON (default: none)")
        if name == "send-req":
            sub.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per worker (default: 30)")
            sub.add_argument("--json", action="store_true", help="one JSON object per reply, per line")


def run(client: Client, args: argparse.Namespace) -> int:
    try:
        if args.workers is not None:
            parse_selector(args.workers)
        data = json.loads(args.data) if args.data is not None else None
    except SelectorError as exc:
        print(f"sockherd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"sockherd: {args.command}: the data is not JSON ({exc}); quote it: '{{\"key\": 1}}'", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "send-msg":
        return _send_msg(client, args.workers, args.name, data)
    return _send_req(client, args.workers, args.name, data, timeout=args.timeout, as_json=args.json)


def label(worker: dict[str, Any]) -> str:
    index = worker.get("index")
    slot = f"#{index}" if index is not None else ("standby" if str(worker.get("id", "")).startswith("s-") else "-")
    return f"{slot} (pid {worker.get('pid')})"


def _send_msg(client: Client, workers: str | None, name: str, data: Any) -> int:
    try:
        sent = client.send_message(name, data, workers=workers)
    except CommandFailed as exc:
        delivered = exc.data.get("sent") if isinstance(exc.data, dict) else None
        if not delivered:
            raise
        print(f"sent to {len(delivered)} worker(s): {', '.join(label(w) for w in delivered)}")
        for error in exc.errors:
            print(f"sockherd: not sent to {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"sent to {len(sent)} worker(s): {', '.join(label(w) for w in sent)}")
    return EXIT_OK


def _send_req(client: Client, workers: str | None, name: str, data: Any, *, timeout: float, as_json: bool) -> int:
    failed: list[str] = []
    answered: set[str] = set()
    for reply in client.send_request(name, data, workers=workers, timeout=timeout):
        if as_json:
            item = {
                "worker": reply.worker,
                **({"error": reply.error} if reply.error is not None else {"data": reply.data}),
            }
            print(json.dumps(item, separators=(",", ":")), flush=True)
        elif reply.error is not None:
            print(f"{label(reply.worker)}: error: {reply.error}", flush=True)
        else:
            print(f"{label(reply.worker)}: {json.dumps(reply.data)}", flush=True)
        if reply.error is not None:
            failed.append(label(reply.worker))
        else:
            answered.add(str(reply.worker.get("id")))
    outcome = client.last_outcome
    total = len(outcome) if outcome else len(answered) + len(failed)
    ok = total - len(failed)
    if not as_json:
        tail = f"; no answer from {', '.join(failed)}" if failed else ""
        print(f"{ok} of {total} worker(s) answered{tail}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK
