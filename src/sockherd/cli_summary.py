"""What a command that changes the herd prints: its progress, its summary when it
succeeded, its failure. Shared by the full CLI and its fast path
(:mod:`sockherd.cli_fast`), so the two say the same, byte for byte. Light on purpose:
the fast path imports it."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Progress", "failure", "summary"]


class Progress:
    """Prints progress lines on stderr; once nobody reads them (a closed pipe) the rest
    are dropped, and the command still waits for its result and reports it by exit code."""

    def __init__(self) -> None:
        self.wanted = True

    def __call__(self, text: str) -> None:
        if not self.wanted:
            return
        try:
            print(text, file=sys.stderr, flush=True)
        except BrokenPipeError:
            self.wanted = False


def failure(command: str, reason: str, data: Any) -> str:
    """What a command the daemon refused or failed prints on stderr (with the failed
    worker's last output, when the daemon sent it)."""
    lines = [f"sockherd: {command} failed: {reason}"]
    output = data.get("output") if isinstance(data, dict) else None
    if output:
        lines += ["last output of the failed worker:", *(f"  | {line}" for line in output)]
    return "\n".join(lines)


def summary(command: str, result: Any) -> str:
    """The line a command prints when it succeeds (without --json)."""
    result = result if isinstance(result, dict) else {}
    if command == "start" and result.get("result") is False:
        return "already running"
    if command in ("start", "restart"):
        status = result.get("status", {})
        pids = ", ".join(str(w["pid"]) for w in status.get("workers", []) if w.get("published"))
        held = " (suspended: run `sockherd resume` to serve)" if status.get("daemon", {}).get("suspended") else ""
        upgraded = result.get("upgraded")
        if isinstance(upgraded, dict):
            held += f"; daemon upgraded in place from {upgraded.get('from')} to {upgraded.get('to')}"
            held += f" (pid {upgraded.get('pid')})"
        return f"{command} done: serving from pid(s) {pids}{held}"
    if command == "rollback":
        back = result.get("result") if isinstance(result.get("result"), dict) else {}
        return (
            f"rollback done: generation {back.get('generation')} serves again "
            f"({len(back.get('slots', []))} slot(s) moved in {back.get('moved_ms')} ms)"
        )
    if command == "commit":
        return f"commit done: retired {result.get('result', 0)} kept worker(s)"
    if command == "promote":
        pids = ", ".join(str(w["pid"]) for w in result.get("status", {}).get("workers", []) if w.get("published"))
        return f"promote done: serving from pid(s) {pids}"
    if command == "stop":
        return f"stopped {result.get('stopped', 0)} worker(s)"
    if command == "resume":
        return f"resumed {result.get('resumed', 0)} worker(s)"
    if command in ("set-workers", "set-standby"):
        return f"{command} done: {result.get('result')}"
    if command == "reload":
        return f"reload done: {result.get('result')}"
    return f"{command} done"
