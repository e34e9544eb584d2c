"""A worker SIGKILLed every 2.5 s under load, behind nginx: what do clients see?

    python benchmarks/kill_under_load.py [--seconds 30]

Four runs: nginx's defaults (`max_fails=1 fail_timeout=10s`) and the settings the docs
give (`max_fails=0`, `proxy_next_upstream error timeout`), each with and without a
standby. nginx's defaults take a per-worker socket out for 10 s after one refused
connect, so a process manager that republishes in milliseconds still loses seconds of
traffic to "no live upstreams"; the documented settings let nginx retry at once.
Reported: failed GETs, seconds with at least one 502, and time to a replacement.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from _harness import APP, daemon, distribution_ms, nginx, verdict

from support.daemon import wait_for
from support.http import LoadGenerator

KILL_EVERY = 2.5


def run(seconds: float, *, max_fails: int, standby: int) -> tuple[int, int, int, int, list[float]]:
    with daemon({**APP, "workers": 2, "standby": standby}) as d:
        d.wait_ready(2, timeout=60)
        links = [d.tmp_dir / f"app.{i}.sock" for i in range(2)]
        with nginx(links, keepalive=True, max_fails=max_fails) as server, LoadGenerator(server.port, 16, 0) as load:
            load.wait_requests(200)
            started = time.monotonic()
            replacements: list[float] = []
            n = 0
            while time.monotonic() - started < seconds:
                index = n % 2
                n += 1
                victim = next(w for w in d.status()["workers"] if w["index"] == index and w["published"])
                killed = time.monotonic()
                os.kill(victim["pid"], signal.SIGKILL)

                def replaced(i: int = index, pid: int = victim["pid"]) -> bool:
                    return any(
                        w["index"] == i and w["published"] and w["state"] == "online" and w["pid"] != pid
                        for w in d.status()["workers"]
                    )

                wait_for(replaced, 30, "a replacement", interval=0.002)
                replacements.append(time.monotonic() - killed)
                next_kill = started + n * KILL_EVERY
                time.sleep(max(0.0, next_kill - time.monotonic()))  # pacing the kills
            result = load.stop()
    bad_seconds = {int(start) for start, status in result.status_times if status != 200}
    torn = len(result.failures) - len(result.failures_except_torn())
    return result.total, len(result.failures), torn, len(bad_seconds), replacements


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    ok = True
    print(
        f"a worker SIGKILLed every {KILL_EVERY}s for {args.seconds:.0f}s, 16 keep-alive GET clients, nginx keepalive 32"
    )
    for label, max_fails in (("nginx defaults (max_fails=1 fail_timeout=10s)", 1), ("documented (max_fails=0)", 0)):
        for standby in (0, 1):
            total, failed, torn, bad_seconds, replacements = run(args.seconds, max_fails=max_fails, standby=standby)
            print(
                f"{label}, standby={standby}: {total} requests, {failed} failed ({torn} torn mid-response), "
                f"{bad_seconds} s with errors; replacement {distribution_ms(replacements)}"
            )
            if max_fails == 0:
                ok &= verdict(
                    f"documented settings, standby={standby}: no failure but torn responses",
                    failed == torn,
                    f"{failed - torn} other failures",
                )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
