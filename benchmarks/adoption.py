"""Adoption time: a daemon is SIGKILLed; how long until its successor manages every worker.

    python benchmarks/adoption.py [--rounds 3]

For 2 and 64 workers of a small stdlib app: the first daemon is SIGKILLed, a second is
started on the same tmp_dir, and three moments are measured from the second's start
(Popen): its log says the workers are adopted (every pid verified and watched), its
IPC answers `status` with all of them, and every worker has reconnected through the
library. Target (issue 10): adopted within 2 s of the new daemon's start.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _harness import REPO, verdict

from sockherd.client import DaemonUnreachable
from support.daemon import running_daemon, wait_for

TINY = [sys.executable, str(REPO / "tests" / "apps" / "tinyapp.py"), "{socket}", "--ready", "library"]
TARGET = 2.0


def one_round(workers: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="sh-bench-") as workdir:
        settings = {"command": TINY, "workers": workers, "online_timeout": 60}
        with running_daemon(Path(workdir), settings) as first:
            first.wait_ready(workers, timeout=120)
            first.proc.kill()
            first.proc.wait(10)
            started = time.monotonic()
            with running_daemon(Path(workdir), {**settings, "tmp_dir": str(first.tmp_dir)}) as second:
                second.wait_log(rf"adopted {workers} worker\(s\)", timeout=60)
                adopted = second.line_time(r"adopted \d+ worker") - started

                def listed() -> bool:
                    try:
                        return len(second.status()["workers"]) == workers
                    except (DaemonUnreachable, OSError):  # not listening yet
                        return False

                wait_for(listed, 60, "status", interval=0.001)
                answering = time.monotonic() - started

                def reconnected() -> bool:
                    return all(w["integrated"] for w in second.status()["workers"])

                wait_for(reconnected, 60, "the workers to reconnect", interval=0.005)
                integrated = time.monotonic() - started
    return adopted, answering, integrated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ok = True
    for workers in (2, 64):
        rounds = [one_round(workers) for _ in range(args.rounds)]
        adopted, answering, integrated = (statistics.median(r[i] for r in rounds) * 1000 for i in range(3))
        worst = max(r[0] for r in rounds)
        print(
            f"{workers} workers: start -> adopted p50 {adopted:.0f} ms (max {worst * 1000:.0f}); "
            f"-> status lists all {answering:.0f} ms; -> all reconnected {integrated:.0f} ms ({args.rounds} rounds)"
        )
        ok &= verdict(f"{workers} workers adopted within {TARGET:.0f} s of the start", worst < TARGET, f"{worst:.3f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
