"""Preloaded generations (`preload = true`): restart time, memory and crash replacement.

    python benchmarks/preload.py [--workers 8] [--restarts 3] [--kills 5]

The app (apps/heavy_import.py) costs ~0.4 s of CPU and tens of MB to import, as a real
app's imports do. The same 8 workers run twice, without and with `preload`, and each
run measures:

- a restart, from the command to "old gone, new ready" (the CLI's own wall time);
- the summed USS (memory no other process shares) of the 8 workers after each answered
  a few requests, and with preload the fork server's own USS beside it;
- a SIGKILLed worker online and published again: from the kill to the daemon's
  "published" line, as this process read it.

Targets (issue 12): with preload, a restart in <= 0.6x the time and <= 0.6x the summed
USS, and a killed worker published again within 150 ms.

Next to it, for memory only, gunicorn with and without `--preload` (same app, same
workers, `uvicorn_worker.UvicornWorker`): that comparison is fair, both fork workers
from an imported app. Restart times are not compared: with `--preload`, gunicorn's HUP
keeps the old code (the master imported it), so a code deploy means a new master.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _harness import REPO, daemon, verdict

from support.daemon import RunningDaemon, terminate, wait_for
from support.http import unix_get

APPS = REPO / "benchmarks" / "apps"
COMMAND = [sys.executable, "-m", "sockherd.uvicorn", "heavy_import:app", "--log-level", "warning"]
MiB = 1024 * 1024


@dataclass
class Figures:
    preload: bool
    restarts: list[float] = field(default_factory=list)
    worker_uss: int = 0
    server_uss: int = 0
    replacements: list[float] = field(default_factory=list)
    imported_in: set[int] = field(default_factory=set)


def warm(sockets: list[Path], requests: int = 20) -> set[int]:
    """A few requests to each worker (what a serving worker touches), and who imported the app."""
    imported: set[int] = set()
    for path in sockets:
        for _ in range(requests):
            response = unix_get(str(path), timeout=10)
            assert response.status == 200, response
        imported.add(int(response.body.split(b'"imported_in": ')[1].split(b",")[0]))
    return imported


def uss(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_full_info().uss for pid in pids)


def measure(preload: bool, workers: int, restarts: int, kills: int) -> Figures:
    figures = Figures(preload)
    settings = {"command": COMMAND, "cwd": str(APPS), "workers": workers, "preload": preload, "online_timeout": 60}
    with daemon(settings) as d:
        d.wait_ready(workers, timeout=180)
        for _ in range(restarts):
            started = time.monotonic()
            result = d.cli("restart", timeout=180)
            figures.restarts.append(time.monotonic() - started)
            assert result.returncode == 0, result.stderr
        sockets = [d.tmp_dir / f"app.{i}.sock" for i in range(workers)]
        figures.imported_in = warm(sockets)
        status = d.status()
        figures.worker_uss = uss([w["pid"] for w in status["workers"]])
        servers = list(status["daemon"]["preloaded"].values())
        figures.server_uss = uss(servers)
        for n in range(kills):
            figures.replacements.append(replace_one(d, n % workers))
    return figures


def replace_one(d: RunningDaemon, index: int) -> float:
    victim = next(w for w in d.status()["workers"] if w["index"] == index and w["published"])
    mark = d.mark()
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    d.wait_log(rf"published worker #{index} .* as ", start=mark, timeout=60)
    published = d.line_time(rf"published worker #{index} .* as ", start=mark)
    d.wait_ready(len(d.status()["workers"]), timeout=60)
    return published - killed


@contextlib.contextmanager
def gunicorn(workers: int, preload: bool) -> Iterator[psutil.Process]:
    with tempfile.TemporaryDirectory(prefix="sh-gunicorn-") as workdir:
        sock = Path(workdir) / "g.sock"
        argv = [sys.executable, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", str(workers)]
        argv += ["-b", f"unix:{sock}", "--log-level", "warning", "heavy_import:app"]
        if preload:
            argv.append("--preload")
        proc = subprocess.Popen(argv, cwd=APPS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            master = psutil.Process(proc.pid)

            def all_up() -> bool:
                if len(master.children()) < workers or not sock.exists():
                    return False
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(1)
                    with contextlib.suppress(OSError):
                        probe.connect(str(sock))
                        return True
                return False

            wait_for(all_up, 180, "gunicorn's workers")
            seen: set[int] = set()
            deadline = time.monotonic() + 120
            while len(seen) < workers and time.monotonic() < deadline:  # every worker booted and answering
                response = unix_get(str(sock), timeout=10)
                seen.add(int(response.body.split(b'"pid": ')[1].split(b",")[0]))
            for _ in range(workers * 20):
                unix_get(str(sock), timeout=10)
            yield master
        finally:
            terminate(proc, 60)


def gunicorn_uss(workers: int, preload: bool) -> int:
    with gunicorn(workers, preload) as master:
        return uss([child.pid for child in master.children()])


def seconds(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()

    plain = measure(False, args.workers, args.restarts, args.kills)
    preloaded = measure(True, args.workers, args.restarts, args.kills)
    for f in (plain, preloaded):
        name = "preload = true " if f.preload else "preload = false"
        print(f"{name}: restart {seconds(f.restarts)}")
        extra = f" + fork server {f.server_uss / MiB:.1f} MiB" if f.preload else ""
        print(f"{name}: summed USS of {args.workers} workers {f.worker_uss / MiB:.1f} MiB{extra}")
        print(f"{name}: SIGKILLed worker published again after {seconds(f.replacements)}")
        print(f"{name}: the app was imported by {len(f.imported_in)} process(es) for {args.workers} workers")

    restart_ratio = statistics.median(preloaded.restarts) / statistics.median(plain.restarts)
    uss_ratio = preloaded.worker_uss / plain.worker_uss
    uss_ratio_with_server = (preloaded.worker_uss + preloaded.server_uss) / plain.worker_uss
    ok = verdict("restart with preload", restart_ratio <= 0.6, f"{restart_ratio:.2f}x the time without (target 0.6x)")
    ok &= verdict(
        "memory with preload",
        uss_ratio <= 0.6,
        f"{uss_ratio:.2f}x the summed worker USS without ({uss_ratio_with_server:.2f}x with the fork server's own; "
        "target <= 0.6x)",
    )
    worst = max(preloaded.replacements)
    ok &= verdict("crash replacement with preload", worst <= 0.150, f"max {worst * 1000:.0f} ms (target <= 150 ms)")
    importers = len(preloaded.imported_in)
    ok &= verdict("imported once", importers == 1, f"{importers} importing process(es)")

    if importlib.util.find_spec("gunicorn") and importlib.util.find_spec("uvicorn_worker"):
        g_plain = gunicorn_uss(args.workers, preload=False)
        g_pre = gunicorn_uss(args.workers, preload=True)
        print(
            f"gunicorn: summed USS of {args.workers} workers {g_plain / MiB:.1f} MiB, with --preload "
            f"{g_pre / MiB:.1f} MiB ({g_pre / g_plain:.2f}x); sockherd preload {preloaded.worker_uss / MiB:.1f} MiB "
            f"({preloaded.worker_uss / g_pre:.2f}x gunicorn --preload)"
        )
    else:
        print("gunicorn comparison skipped: pip install -r benchmarks/requirements.txt")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
