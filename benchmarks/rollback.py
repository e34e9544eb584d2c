"""Rollback to a kept generation, and canaries, under load behind nginx.

    python benchmarks/rollback.py [--rounds 5] [--workers 4]

Each round: `restart --keep-previous 60s`, then `rollback`, under 16 keep-alive
clients (a quarter POSTing) through nginx. Reported: the daemon's own figure for the
rollback (from the command's arrival to the last symlink renamed), the command's wall
time, and failed requests; then one `restart --canary 1` + `promote` and one
`restart --canary 1` + `rollback`. Targets (issue 13): rollback ≤ 50 ms from command to
every symlink moved; 0 failed requests throughout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _harness import APP, daemon, distribution_ms, nginx, verdict

from support.http import LoadGenerator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    moved: list[float] = []
    walls: list[float] = []
    with daemon({**APP, "workers": args.workers}) as d:
        d.wait_ready(args.workers, timeout=60)
        links = [d.tmp_dir / f"app.{i}.sock" for i in range(args.workers)]
        with nginx(links, keepalive=True) as server, LoadGenerator(server.port, 16, 4) as load:
            load.wait_requests(300)
            for _ in range(args.rounds):
                for argv in (["restart", "--keep-previous", "60s"], ["rollback", "--json"]):
                    started = time.monotonic()
                    result = d.cli(*argv)
                    if result.returncode != 0:
                        raise RuntimeError(result.stderr)
                    if argv[0] == "rollback":
                        walls.append(time.monotonic() - started)
                        moved.append(json.loads(result.stdout)["result"]["moved_ms"] / 1000)
                    load.wait_requests(300)
            for finish in ("promote", "rollback"):
                for argv in (["restart", "--canary", "1"], [finish]):
                    result = d.cli(*argv)
                    if result.returncode != 0:
                        raise RuntimeError(result.stderr)
                    load.wait_requests(300)
            outcome = load.stop()
    print(
        f"{args.rounds} x (restart --keep-previous, rollback), {args.workers} workers, 16 keep-alive clients "
        f"through nginx: {outcome.total} requests, {len(outcome.failures)} failed"
    )
    print(f"rollback, command arrival to last rename (daemon): {distribution_ms(moved)}")
    print(f"rollback command, wall time (CLI start to exit, old generation retired): {distribution_ms(walls)}")
    ok = verdict("rollback moves every symlink within 50 ms", max(moved) <= 0.050, f"max {max(moved) * 1000:.2f} ms")
    ok &= verdict("0 failed requests", not outcome.failures, f"{len(outcome.failures)} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
