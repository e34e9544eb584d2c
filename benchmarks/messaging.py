"""Messaging through the daemon: send-req round trips and send-msg throughput.

    python benchmarks/messaging.py [--rounds 200]

Workers of tests/apps/messaging_app.py (handlers on the library's thread pool), one
client connection (sockherd.client.Client) in this process:

- round trip of `send-req pid` (one reply per worker) to 1 worker and to 64 workers,
  from the request sent to the daemon's final reply, p50 / p95;
- `send-msg` throughput: messages per second confirmed by the daemon, to 1 worker and
  fanned out to 64 (deliveries per second).

Targets (issue 14): a round trip to 1 worker within 10 ms p50, to 64 within 100 ms p50.
"""

from __future__ import annotations

import argparse
import sys
import time

from _harness import REPO, daemon, percentile, verdict

from sockherd.client import Client
from support.daemon import wait_for

APP = {"command": [sys.executable, "messaging_app.py"], "cwd": str(REPO / "tests" / "apps"), "online_timeout": 60}


def measure(workers: int, rounds: int) -> tuple[list[float], float]:
    with daemon({**APP, "workers": workers}) as d:
        d.wait_ready(workers, timeout=120)
        wait_for(lambda: all(w["integrated"] for w in d.status()["workers"]), 60, "IPC links")
        with Client(d.ipc) as client:
            for _ in range(5):  # warm up: handler threads, code paths
                list(client.send_request("pid"))
            trips = []
            for _ in range(rounds):
                started = time.perf_counter()
                answers = list(client.send_request("pid"))
                trips.append(time.perf_counter() - started)
                assert len(answers) == workers, answers
            count = rounds * 5
            started = time.perf_counter()
            for n in range(count):
                client.send_message("tick", n)
            rate = count / (time.perf_counter() - started)
    return trips, rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    ok = True
    for workers, target in ((1, 0.010), (64, 0.100)):
        trips, rate = measure(workers, args.rounds)
        p50, p95 = percentile(trips, 50), percentile(trips, 95)
        print(
            f"{workers} worker(s): send-req round trip p50 {p50 * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms "
            f"({args.rounds} rounds); send-msg {rate:,.0f} messages/s ({rate * workers:,.0f} deliveries/s)"
        )
        ok &= verdict(
            f"send-req to {workers} worker(s), p50", p50 <= target, f"{p50 * 1000:.2f} ms <= {target * 1000:g}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
