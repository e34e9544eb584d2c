"""SIGKILL a random published worker every 100-300 ms under load; shared by the e2e test
(a few seconds) and benchmarks/chaos.py (the full 30 s)."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

from support.daemon import RunningDaemon, wait_for
from support.http import LoadGenerator, LoadResult


@dataclass
class ChaosOutcome:
    kills: int
    load: LoadResult
    converged_in: float
    clock_offset: float  # time.time() - time.monotonic(): load timestamps to wall clock


def converged(daemon: RunningDaemon, workers: int, standby: int) -> bool:
    status: dict[str, Any] = daemon.status()
    online = [w for w in status["workers"] if w["published"] and w["state"] == "online"]
    ready = [w for w in status["workers"] if w["index"] is None and w["state"] == "suspended"]
    links = all(
        os.path.exists(daemon.tmp_dir / f"app.{i}.sock") for i in range(workers)
    )  # exists() follows the link: a live target
    return len(online) == workers and len(ready) == standby and links and status["daemon"]["operation"] is None


def run_chaos(
    daemon: RunningDaemon, port: int, seconds: float, *, workers: int, standby: int, seed: int = 1
) -> ChaosOutcome:
    rng = random.Random(seed)
    kills = 0
    with LoadGenerator(port, concurrency=16, post_every=0) as load:
        load.wait_requests(300)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            victims = [w for w in daemon.status()["workers"] if w["published"] and w["state"] == "online"]
            if victims:
                os.kill(rng.choice(victims)["pid"], signal.SIGKILL)
                kills += 1
            time.sleep(rng.uniform(0.1, 0.3))  # the chaos schedule itself
        started = time.monotonic()
        wait_for(lambda: converged(daemon, workers, standby), 60, "the herd to converge", interval=0.05)
        converged_in = time.monotonic() - started
        load.wait_requests(300)
    return ChaosOutcome(kills, load.stop(), converged_in, time.time() - time.monotonic())


_EVENT = re.compile(r"^(\S+ \S+),(\d{3}) .*?(published worker #(\d+) \(\S+, pid (\d+)\)|\(\S+, pid (\d+)\) crashed)")


def log_time(stamp: str, millis: str) -> float:
    """A daemon log timestamp as seconds since the epoch (same clock as time.time())."""
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def all_dead_windows(lines: list[str], workers: int) -> list[tuple[float, float]]:
    """Wall-clock windows in which no slot had a live published worker, from the log."""
    live: dict[int, int] = {}  # slot -> pid serving it
    windows: list[tuple[float, float]] = []
    dead_since: float | None = None
    for line in lines:
        match = _EVENT.search(line)
        if not match:
            continue
        at = log_time(match.group(1), match.group(2))
        if match.group(4) is not None:
            live[int(match.group(4))] = int(match.group(5))
        else:
            pid = int(match.group(6))
            live = {slot: p for slot, p in live.items() if p != pid}
        if not live and dead_since is None:
            dead_since = at
        elif live and dead_since is not None:
            windows.append((dead_since, at))
            dead_since = None
    return windows


def failures_outside(
    result: LoadResult, windows: list[tuple[float, float]], clock_offset: float, slack: float = 0.05
) -> list[float]:
    """Start times (wall clock) of failed requests that no all-dead window explains."""
    failed = [start + clock_offset for start, status in result.status_times if status != 200]
    return [t for t in failed if not any(a - slack <= t <= b + slack for a, b in windows)]
