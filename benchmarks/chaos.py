"""Chaos: a random published worker SIGKILLed every 100-300 ms for 30 s under load.

    python benchmarks/chaos.py [--seconds 30]

Shapes: 4 and 2 workers of a fast-starting stdlib app, and 4 workers of the uvicorn
app (about 0.3 s of CPU to start), each with `standby = 1`, behind nginx with the
documented settings; 16 keep-alive GET clients. A GET can only fail when every worker
is dead at once (nginx has nothing left to retry) or when a kill tears the response
being written. Reported: kills, requests, failures (torn ones apart), and how long the
herd takes to be whole again once the kills stop. Target (issue 4): 0 failed GETs;
the herd converges.
"""

from __future__ import annotations

import argparse
import sys

from _harness import APP, REPO, daemon, nginx, verdict

from support.chaos import run_chaos

TINY = {"command": [sys.executable, str(REPO / "tests" / "apps" / "tinyapp.py"), "{socket}"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    ok = True
    for name, app, workers in (("fast app", TINY, 4), ("fast app", TINY, 2), ("uvicorn app", APP, 4)):
        with daemon({**app, "workers": workers, "standby": 1}) as d:
            d.wait_ready(workers, timeout=60)
            links = [d.tmp_dir / f"app.{i}.sock" for i in range(workers)]
            with nginx(links, keepalive=True) as server:
                outcome = run_chaos(d, server.port, args.seconds, workers=workers, standby=1)
        result = outcome.load
        torn = len(result.failures) - len(result.failures_except_torn())
        other = len(result.failures_except_torn())
        print(
            f"{name}, {workers} workers + 1 standby: {outcome.kills} kills, {result.total} GETs, "
            f"{other} failed + {torn} torn mid-response; whole again {outcome.converged_in * 1000:.0f} ms after"
        )
        label = f"{name} x{workers}: 0 failed GETs (torn responses aside)"
        ok &= verdict(label, other == 0, f"{other} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
