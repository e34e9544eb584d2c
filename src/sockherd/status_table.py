"""The ``sockherd status`` table, plain and ``--watch``: one set of columns, human units.

Both views pick their columns from :data:`COLUMNS`; a cell the daemon could not measure
is ``-``. Colour (the state cell, warnings, crash loops) only where :func:`colour_wanted`
says so: a terminal, and no ``NO_COLOR``. The CLI's fast path imports this module, so it
imports nothing but cheap stdlib modules.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, TextIO

    Row = dict[str, Any]

GREEN, YELLOW, RED, RESET = "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[0m"
STATE_COLOURS = {"online": GREEN, "suspended": YELLOW, "terminating": YELLOW, "broken": RED}


def colour_wanted(stream: TextIO) -> bool:
    """A terminal, unless ``NO_COLOR`` is set to anything but "" (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, colour: str | None) -> str:
    return f"{colour}{text}{RESET}" if colour else text


def human_bytes(value: int | None) -> str:
    """``48.2MiB``; ``-`` for none (the daemon reports 0 for a process it could not read)."""
    if not value:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}B"


def age(since: float | None) -> str:
    """``42s``, ``1m15s``, ``3h05m``, ``2d04h`` since the epoch time ``since``."""
    if since is None:
        return "-"
    seconds = int(time.time() - since)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _cpu(w: Row) -> str:
    # rss and cpu come from one read of the process: no rss, the cpu the daemon sent is a placeholder
    return "-" if w.get("cpu") is None or not w.get("rss") else f"{w['cpu']:.1f}%"


def _state(w: Row) -> str:
    reason = f" ({w['broken_reason']})" if w.get("broken_reason") else ""
    return f"{w['state']}{reason}{' (kept)' if w.get('kept') else ''}"


def _optional(key: str) -> Callable[[Row], str]:
    return lambda w: "-" if w.get(key) is None else str(w[key])


COLUMNS: dict[str, Callable[[Row], str]] = {
    "ID": lambda w: str(w["id"]),
    "PID": lambda w: str(w["pid"]),
    "INDEX": lambda w: "standby" if w["index"] is None else str(w["index"]),
    "STATE": _state,
    "GEN": lambda w: str(w["generation"]),
    "UPTIME": lambda w: age(w.get("started_at")),
    "RESTARTS": lambda w: str(w.get("restarts", 0)),
    "SYMLINK": lambda w: os.path.basename(w["symlink"]) if w.get("symlink") else "-",
    "RSS": lambda w: human_bytes(w.get("rss")),
    "CPU": _cpu,
    "QUEUE": _optional("queued"),
    "BACKLOG": _optional("backlog"),
}
# Scripts split the plain table by column: new columns go at its end.
PLAIN = ("ID", "PID", "INDEX", "STATE", "GEN", "UPTIME", "RESTARTS", "SYMLINK", "RSS", "CPU")
WATCH = ("ID", "PID", "INDEX", "STATE", "GEN", "RSS", "CPU", "QUEUE", "BACKLOG")


def headline(status: dict[str, Any]) -> str:
    d = status["daemon"]
    return (
        f"{d['name']}: daemon pid {d['pid']} ({d['state']}{', suspended' if d.get('suspended') else ''}), "
        f"generation {d['generation'] or '-'}, {d['workers']} worker(s)"
        + (f" + {d['standby']} standby" if d.get("standby") else "")
        + f", up {age(d['started_at'])}"
        + (f", {d['operation']} in progress" if d.get("operation") else "")
    )


def worker_table(status: dict[str, Any], columns: Sequence[str], *, colour: bool) -> list[str]:
    """The header, a row per worker (its state in colour when ``colour``), then each worker's warning."""
    rows = [[COLUMNS[name](w) for name in columns] for w in status["workers"]]
    widths = [max(len(row[i]) for row in [list(columns), *rows]) for i in range(len(columns))]
    state = columns.index("STATE") if "STATE" in columns else None
    lines = []
    for n, row in enumerate([list(columns), *rows]):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        if colour and n and state is not None:
            word = row[state].split(" ")[0]
            cells[state] = paint(row[state], STATE_COLOURS.get(word)) + " " * (widths[state] - len(row[state]))
        lines.append("  ".join(cells).rstrip())
    warnings = [f"! {w['warning']}" for w in status["workers"] if w.get("warning")]
    return lines + [paint(line, YELLOW if colour else None) for line in warnings]


def notes(status: dict[str, Any], *, colour: bool) -> list[str]:
    """What the table does not show: a kept or canary generation, a rollback, slots in a crash loop."""
    d = status["daemon"]
    lines = []
    if kept := d.get("kept"):
        left = f", {max(0, int(kept['until'] - time.time()))}s left" if kept.get("until") else ""
        lines.append(
            f"kept: generation {kept['generation']} ({len(kept['pids'])} worker(s){left}, "
            f"{human_bytes(kept['rss'])}): `sockherd rollback` goes back to it"
        )
    if canary := d.get("canary"):
        slots = ", ".join(str(i) for i in canary["slots"])
        lines.append(f"canary: generation {canary['generation']} on slot(s) {slots}: `sockherd promote` or `rollback`")
    if d.get("rolled_back"):
        lines.append(d["rolled_back"])
    for slot in status.get("slots", []):
        if slot.get("next_attempt_at"):
            wait = max(0.0, slot["next_attempt_at"] - time.time())
            loop = f"slot {slot['index']}: crash loop ({slot['crash_loop']} in a row), next attempt in {wait:.1f}s"
            lines.append(paint(loop, RED if colour else None))
    return lines


def format_status(status: dict[str, Any], *, colour: bool = False) -> str:
    """``sockherd status``: the headline, the table with memory and CPU, warnings and notes."""
    return "\n".join([headline(status), *worker_table(status, PLAIN, colour=colour), *notes(status, colour=colour)])


def health_problems(status: dict[str, Any]) -> list[str]:
    """Why the app is not fully serving, or nothing: what a readiness probe needs."""
    d = status["daemon"]
    problems = []
    if d["state"] != "running":
        problems.append(f"the daemon is {d['state']}")
    if d.get("operation") in ("start", "restart", "reload", "promote", "rollback"):
        problems.append(f"a {d['operation']} is in progress")
    serving = {w["index"]: w for w in status["workers"] if w.get("published")}
    for index in range(d["workers"]):
        worker = serving.get(index)
        if worker is None:
            problems.append(f"slot {index} is not published")
        elif worker["state"] not in ("online", "broken"):
            problems.append(f"slot {index}'s worker is {worker['state']}")
        elif worker["generation"] != d["generation"] and not d.get("canary"):
            problems.append(f"slot {index} serves generation {worker['generation']}, not {d['generation']}")
    return problems
