"""CLI start-up: `sockherd status` against Python's own start-up, in the same venv and run.

    python benchmarks/cli_startup.py [--runs 30]

Runs the installed console script (what scripts and probes run) against a running
daemon with 2 workers, interleaved with `python -c pass` so that both see the same
machine load, and prints the medians. `sockherd status`, `status --json` and `health`
take the fast path (sockherd/cli_fast.py); `sockherd config` takes the full CLI, shown
for comparison. Target (issue 12): median `status` <= 3x median `python -c pass`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import APP, daemon, verdict

# Bytecode caches as an installed package has them: PYTHONDONTWRITEBYTECODE (set on some
# machines) would make every run compile sockherd's modules from source again.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=ENV)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    sockherd = shutil.which("sockherd", path=str(Path(sys.executable).parent))
    assert sockherd is not None, "the sockherd console script is not installed next to this python"
    with daemon({**APP, "workers": 2}) as d:
        d.wait_ready(2, timeout=60)
        where = ["-c", str(d.config_path)]
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "sockherd status": [sockherd, "status", *where],
            "sockherd status --json": [sockherd, "status", "--json", *where],
            "sockherd health": [sockherd, "health", *where],
            "sockherd config (full CLI)": [sockherd, "config", *where],
        }
        for argv in commands.values():  # warm the page cache and the bytecode caches
            timed(argv)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():
                samples[name].append(timed(argv))
    base = statistics.median(samples["python -c pass"])
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:28} median {median * 1000:6.1f} ms  ({median / base:.1f}x python -c pass)")
    ratio = statistics.median(samples["sockherd status"]) / base
    ok = verdict("sockherd status start-up", ratio <= 3.0, f"{ratio:.1f}x python -c pass (target <= 3x)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
