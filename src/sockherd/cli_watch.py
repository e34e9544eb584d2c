"""``sockherd status --watch [SECONDS]``: the status table, redrawn in place, with metrics.

Like ``top`` or ``pm2 monit``: on a terminal each round moves the cursor home, rewrites
every line (clearing what the longer previous line left) and clears below; colours mark
states that need a look. Not on a terminal (a pipe, a log) it prints one table per round,
separated by a blank line, without escapes. Ctrl-C ends it cleanly, status 0.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from sockherd.client import Client

HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
COLOURS = {"online": "\x1b[32m", "suspended": "\x1b[33m", "broken": "\x1b[31m", "terminating": "\x1b[33m"}
RESET = "\x1b[0m"


def human_bytes(value: int | None) -> str:
    if not value:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}B"


def metrics_table(status: dict[str, Any], *, colour: bool) -> list[str]:
    header = ("ID", "PID", "INDEX", "STATE", "GEN", "RSS", "CPU", "QUEUE", "BACKLOG")
    rows = []
    for w in status["workers"]:
        rows.append(
            (
                w["id"],
                str(w["pid"]),
                "standby" if w["index"] is None else str(w["index"]),
                w["state"] + (" (kept)" if w.get("kept") else ""),
                str(w["generation"]),
                human_bytes(w.get("rss")),
                f"{w['cpu']:.1f}%" if w.get("cpu") is not None else "-",
                "-" if w.get("queued") is None else str(w["queued"]),
                "-" if w.get("backlog") is None else str(w["backlog"]),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        state = row[3].split(" ")[0]
        if colour and n and state in COLOURS:
            line = COLOURS[state] + line + RESET
        lines.append(line)
    lines += [f"! {w['warning']}" for w in status["workers"] if w.get("warning")]
    return lines


def watch(client: Client, interval: float, headline: Callable[[dict[str, Any]], str]) -> int:
    tty = sys.stdout.isatty()
    try:
        while True:
            status = client.call("status")
            d = status["daemon"]
            top = f"{headline(status)}  (daemon {human_bytes(d.get('rss'))}; every {interval:g}s, Ctrl-C quits)"
            lines = [top, *metrics_table(status, colour=tty)]
            if tty:
                sys.stdout.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW)
            else:
                sys.stdout.write("\n".join(lines) + "\n\n")
            sys.stdout.flush()
            time.sleep(interval)  # the refresh period the user asked for
    except KeyboardInterrupt:
        return 0
