"""What a command that changed the herd prints when it succeeded: shared by the full CLI
and its fast path (:mod:`sockherd.cli_fast`), so the two say the same, byte for byte.
Light on purpose: the fast path imports it."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["summary"]


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
