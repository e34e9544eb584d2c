"""Failover time: a published worker is SIGKILLed; how long until its symlink is live again.

    python benchmarks/failover.py [--kills 40]

Measured from the kill (and, with a standby, from the exit notification: the moment the
kernel tells the daemon, after it has torn the process down) to the moment `app.0.sock`
resolves to another worker's socket that accepts a connection, with `standby = 1` (a suspended standby is resumed and
renamed into place) and without (a fresh worker is started). Targets: issue 3 asks for
the standby case within 50 ms; the benchmark suite's stricter p95 <= 10 ms.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import threading
import time
from typing import Any

from _harness import APP, daemon, distribution_ms, percentile, verdict

from support.daemon import RunningDaemon, wait_for

POLL = 0.0002


def live_target(link: str, old: str) -> bool:
    try:
        if os.readlink(link) == old:
            return False
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(link)
        return True
    except OSError:
        return False


def ready(d: RunningDaemon, standby: int) -> dict[str, Any] | None:
    status: dict[str, Any] = d.status()
    published = [w for w in status["workers"] if w["published"] and w["state"] == "online"]
    standbys = [w for w in status["workers"] if w["index"] is None and w["state"] == "suspended"]
    return status if len(published) == 2 and len(standbys) >= standby else None


class DeathWatch:
    """When the kernel announced the victim's death: a thread blocked on its pidfd, which
    becomes readable at the very moment the daemon's SIGCHLD is sent (the exit notification).
    Before it, the kernel tears the process down (memory, files), which no daemon can hurry."""

    def __init__(self, pid: int) -> None:
        self.pidfd = os.pidfd_open(pid)
        self.at: float | None = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        select.select([self.pidfd], [], [])
        self.at = time.monotonic()

    def close(self) -> float:
        self._thread.join(10)
        os.close(self.pidfd)
        assert self.at is not None
        return self.at


def measure(standby: int, kills: int) -> tuple[list[float], list[float]]:
    """Per kill: (from the kill, from the exit notification) to a live symlink."""
    times, after_death = [], []
    with daemon({**APP, "workers": 2, "standby": standby}) as d:
        d.wait_ready(2, timeout=60)
        link = str(d.tmp_dir / "app.0.sock")
        for _ in range(kills):
            status = wait_for(lambda: ready(d, standby), 60, "the herd to be whole")
            victim = next(w for w in status["workers"] if w["index"] == 0 and w["published"])
            old = os.readlink(link)
            # let the victim serve past the crash-loop threshold: each kill is a fresh crash
            online_at: float = victim["online_at"]
            wait_for(lambda: time.time() - online_at > 1.2, 5, "uptime")  # noqa: B023
            death = DeathWatch(victim["pid"])
            started = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            while not live_target(link, old):
                time.sleep(POLL)
            live = time.monotonic()
            times.append(live - started)
            after_death.append(max(0.0, live - death.close()))
    return times, after_death


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=40)
    args = parser.parse_args()
    with_standby, from_death = measure(1, args.kills)
    without, _ = measure(0, max(5, args.kills // 4))
    print(f"failover with standby = 1, from the kill:              {distribution_ms(with_standby)}")
    print(f"failover with standby = 1, from the exit notification: {distribution_ms(from_death)}")
    print(f"failover without a standby, from the kill:             {distribution_ms(without)}")
    ratio = statistics.median(without) / statistics.median(with_standby)
    print(f"ratio of medians (without / with): {ratio:.0f}x")
    worst, p95 = max(with_standby), percentile(with_standby, 95)
    ok = verdict("standby failover within 50 ms (issue 3)", worst <= 0.050, f"max {worst * 1000:.2f} ms")
    ok &= verdict("standby failover p95 <= 10 ms", p95 <= 0.010, f"p95 {p95 * 1000:.2f} ms")
    death_p95 = percentile(from_death, 95)
    ok &= verdict(
        "standby failover p95 <= 1 ms from the exit notification (issue 12)",
        death_p95 <= 0.001,
        f"p95 {death_p95 * 1000:.2f} ms (polled every {POLL * 1000:.1f} ms)",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
