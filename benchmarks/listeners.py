"""Shared listeners (`listen`): worker kills behind nginx's defaults, and restarts next to gunicorn's HUP.

    python benchmarks/listeners.py [--seconds 10] [--restarts 5]

1. **Kills behind nginx's defaults** (`max_fails=1 fail_timeout=10s`, keepalive 32): a
   worker SIGKILLed every second, no standby, 16 keep-alive GET clients through nginx.
   Per-worker sockets (two `server` lines, the symlinks) against one shared UNIX
   listener (one `server` line), in the same run. Target: shared ≤ 1 % failed.
2. **Restarts next to gunicorn's HUP**, on a TCP port with no nginx, 16 keep-alive
   clients (GET and POST), the same WSGI app in the same gunicorn (gthread, 2 workers):
   run by sockherd on a shared listener and restarted with `sockherd restart`, or run
   alone and restarted with `kill -HUP`. Reported: failed requests, and p99 latency while
   restarting ÷ p99 steady. Target: sockherd 0 failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
from _harness import APP, REPO, daemon, nginx, percentile, verdict

from support.daemon import RunningDaemon, wait_for
from support.http import LoadGenerator, LoadResult
from support.nginx import free_port

BIN = Path(sys.executable).parent
GUNICORN = [str(BIN / "gunicorn"), "--workers", "2", "--worker-class", "gthread", "--keep-alive", "75"]
GUNICORN += ["--no-control-socket", "--graceful-timeout", "10", "--log-level", "warning", "wsgi_app:app"]
APPS = REPO / "tests" / "apps"


def kills(seconds: float, *, shared: bool) -> tuple[int, int, int]:
    """(requests, failed, kills) with a worker SIGKILLed every second behind nginx's defaults."""
    with tempfile.TemporaryDirectory(prefix="sh-l-", dir="/tmp") as where:
        listener = f"{where}/app.sock"
        settings = {**APP, "workers": 2, **({"listen": [f"unix://{listener}"]} if shared else {})}
        with daemon(settings) as d:
            d.wait_ready(2, timeout=60)
            upstream: list[Path | str] = (
                [f"unix:{listener}"] if shared else [d.tmp_dir / f"app.{i}.sock" for i in range(2)]
            )
            with nginx(upstream, keepalive=True, max_fails=None) as server, LoadGenerator(server.port, 16, 0) as load:
                load.wait_requests(300)
                started, n = time.monotonic(), 0
                while time.monotonic() - started < seconds:
                    victim = random.choice(sorted(d.published_pids()))
                    os.kill(victim, signal.SIGKILL)
                    n += 1
                    wait_for(functools.partial(replaced, d, victim), 30, "a replacement", interval=0.002)
                    time.sleep(max(0.0, started + n - time.monotonic()))
                result = load.stop()
    return result.total, len(result.failures), n


def replaced(d: RunningDaemon, victim: int) -> bool:
    pids = d.published_pids()
    return victim not in pids and len(pids) == 2


def _phase(result: LoadResult, start: float, end: float) -> tuple[list[float], int]:
    latencies = [s for t, s in result.latencies if start <= t < end]
    failed = sum(1 for t, status in result.status_times if start <= t < end and status != 200)
    return latencies, failed


def _measure(
    port: int, steady: float, restart: Callable[[], None], restarts: int
) -> tuple[LoadResult, float, float, float]:
    with LoadGenerator(port, concurrency=16, post_every=4) as load:
        load.wait_requests(200)
        t0 = time.monotonic()
        time.sleep(steady)  # the steady phase: nothing happens but load
        t1 = time.monotonic()
        for _ in range(restarts):
            restart()
        t2 = time.monotonic()
        result = load.stop()
    return result, t0, t1, t2


@contextlib.contextmanager
def gunicorn_alone(port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [*GUNICORN[:1], "--bind", f"127.0.0.1:{port}", *GUNICORN[1:]], cwd=APPS, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: len(psutil.Process(proc.pid).children()) == 2, 30, "gunicorn's workers")
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def hup(proc: subprocess.Popen[bytes]) -> None:
    """gunicorn's reload: new workers, old ones stopped gracefully; done when only new ones are left."""
    master = psutil.Process(proc.pid)
    old = {c.pid for c in master.children()}
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (kids := {c.pid for c in master.children()}) and not kids & old and len(kids) == 2, 60, "HUP")


def sockherd_restart(d: RunningDaemon) -> None:
    result = d.cli("restart")
    if result.returncode != 0:
        raise RuntimeError(result.stderr)


def report(label: str, result: LoadResult, t0: float, t1: float, t2: float) -> int:
    steady, steady_failed = _phase(result, t0, t1)
    during, during_failed = _phase(result, t1, t2 + 1.0)
    p99_steady, p99_during = percentile(steady, 99) * 1000, percentile(during, 99) * 1000
    print(
        f"{label}: {result.total} requests, {len(result.failures)} failed "
        f"({steady_failed} steady, {during_failed} restarting); p99 steady {p99_steady:.1f} ms, "
        f"restarting {p99_during:.1f} ms (x{p99_during / p99_steady:.2f})"
    )
    return len(result.failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the kill phase")
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--steady", type=float, default=5.0, help="length of the steady phase")
    args = parser.parse_args()
    ok = True

    print(f"1. a worker SIGKILLed every second for {args.seconds:.0f}s behind nginx's defaults, no standby")
    for shared in (False, True):
        total, failed, n = kills(args.seconds, shared=shared)
        label = "shared listener, 1 server line" if shared else "per-worker sockets, 2 server lines"
        print(f"   {label}: {total} requests, {failed} failed ({100 * failed / max(total, 1):.2f} %), {n} kills")
        if shared:
            ok &= verdict("shared listener: at most 1 % failed", failed <= 0.01 * total, f"{failed}/{total}")

    print(f"2. {args.restarts} restarts after {args.steady:.0f}s steady, 16 keep-alive clients on a TCP port")
    port = free_port()
    with daemon({"command": GUNICORN, "cwd": str(APPS), "workers": 1, "listen": [f"tcp://127.0.0.1:{port}"]}) as d:
        d.wait_ready(1, timeout=60)
        measured = _measure(port, args.steady, lambda: sockherd_restart(d), args.restarts)
    failed = report("   gunicorn under sockherd, `sockherd restart`", *measured)
    ok &= verdict("sockherd restarts: 0 failed", failed == 0, f"{failed} failed")
    port = free_port()
    with gunicorn_alone(port) as proc:
        measured = _measure(port, args.steady, lambda: hup(proc), args.restarts)
    report("   gunicorn alone, `kill -HUP`", *measured)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
