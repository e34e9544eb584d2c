"""``sockherd status --watch [SECONDS]``: the status table, redrawn in place, with metrics.

Like ``top`` or ``pm2 monit``: on a terminal each round moves the cursor home, rewrites
every line (clearing what the longer previous line left) and clears below; colours mark
states that need a look (unless ``NO_COLOR``). Not on a terminal (a pipe, a log) it prints
one table per round, separated by a blank line, without escapes. Ctrl-C ends it cleanly,
status 0. The table is :mod:`sockherd.status_table`'s, with the listen queue's columns.
"""

from __future__ import annotations

import sys
import time

from sockherd.client import Client
from sockherd.status_table import WATCH, colour_wanted, headline, human_bytes, notes, worker_table

HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


def watch(client: Client, interval: float) -> int:
    tty, colour = sys.stdout.isatty(), colour_wanted(sys.stdout)
    try:
        while True:
            status = client.call("status")
            rss = human_bytes(status["daemon"].get("rss"))
            top = f"{headline(status)}  (daemon {rss}; every {interval:g}s, Ctrl-C quits)"
            lines = [top, *worker_table(status, WATCH, colour=colour), *notes(status, colour=colour)]
            if tty:
                sys.stdout.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW)
            else:
                sys.stdout.write("\n".join(lines) + "\n\n")
            sys.stdout.flush()
            time.sleep(interval)  # the refresh period the user asked for
    except KeyboardInterrupt:
        return 0
