"""Scale: restart time vs worker count, and the daemon's footprint with many workers.

    python benchmarks/scale.py [--counts 1,4,16,64] [--restarts 3] [--idle-counts 64,512] [--idle 10] [--quick]

The app is benchmarks/apps/tiny.py (`python -S -I`, stdlib only, sd_notify READY=1).

(a) Restart time vs worker count: N workers of `tiny.py --start-delay 0.5` (an app that
    takes 0.5 s to start), `online_timeout` raised, no load; `sockherd restart` (the
    CLI, a subprocess) a few times. Reported: the command end to end, the daemon's
    "starting generation N" → "generation N published" from its log (millisecond
    stamps), published → old generation retired (linger 0.25 s + drain + exit), and the
    new workers' spawn → online; and the machine's floor: N tiny.py processes started
    by the benchmark itself, without sockherd, until all said READY=1. Target: an atomic
    restart, the request until the new generation is published, within start-up time +
    0.5 s whatever N.
(b) Footprint: N workers of `tiny.py`, idle: the daemon's RSS (and USS), its CPU time
    over `--idle` seconds with psutil, as % of one core, its voluntary context switches
    (wakeups) over the same time, thread count and open fds. Targets: RSS <= 40 MB at
    64 workers; idle CPU ~0 (<= 0.5 % of one core: no polling loop). The workers start
    all at once with sd_notify readiness; if the daemon drops READY=1 datagrams that
    arrive before it has registered the sender's pid (it logs "notify from unknown pid"),
    that is reported as a FAIL and the footprint is measured with `ready = "socket"`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil
from _harness import REPO, verdict
from restarts import Restart, cli_overhead, daemon, exit_on_sigterm, timed_restart

from sockherd.client import DaemonUnreachable
from support.daemon import RunningDaemon

TINY = REPO / "benchmarks" / "apps" / "tiny.py"
START_DELAY = 0.5
RESTART_MARGIN = 0.5
RSS_LIMIT = 40 * 10**6  # MB, the stricter reading
IDLE_CPU_LIMIT = 0.5  # % of one core


def tiny(*flags: str) -> list[str]:
    return [sys.executable, "-S", "-I", str(TINY), *flags]


def settings(workers: int, *flags: str) -> dict[str, object]:
    # 512 processes starting at once on 2 cores need far more than the default 2 s / 10 s
    return {
        "command": tiny(*flags),
        "workers": workers,
        "spawn_timeout": 120,
        "online_timeout": 300,
        "shutdown_timeout": 30,
    }


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:6.0f} max {max(values) * 1000:6.0f} ms"


def restart_times(count: int, restarts: int) -> tuple[list[Restart], float, str]:
    """`restarts` timed restarts of `count` workers: (the restarts, the CLI's overhead, an error or "")."""
    # 30 s is plenty for 64 workers that start in 0.5 s, and bounds a restart that goes wrong
    with daemon({**settings(count, "--start-delay", str(START_DELAY)), "online_timeout": 30}) as d:
        d.wait_ready(count, timeout=120)
        cli = cli_overhead(d)
        done: list[Restart] = []
        for _ in range(restarts):
            time.sleep(0.5)
            restart = timed_restart(d, timeout=120)
            if restart.returncode != 0:
                return done, cli, f"restart failed: {restart.output}"
            if len(restart.startups) != count:
                return done, cli, f"{len(restart.startups)} workers came online, expected {count}"
            done.append(restart)
    return done, cli, ""


def bare_start(count: int) -> float:
    """The machine's floor: N tiny.py processes started without sockherd, until all said READY=1.

    The benchmark spawns them itself (Popen, one after the other, as the daemon's spawn
    does) with an sd_notify socket of its own: the same interpreters, the same start-up
    delay, the same CPU to share, and no daemon.
    """
    with tempfile.TemporaryDirectory(prefix="sh-bare-", dir="/tmp") as tmp:
        procs: list[subprocess.Popen[bytes]] = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(f"{tmp}/notify")
            notify.settimeout(60)
            try:
                started = time.monotonic()
                for i in range(count):
                    env = {"PATH": os.environ.get("PATH", ""), "NOTIFY_SOCKET": f"{tmp}/notify"}
                    procs.append(
                        subprocess.Popen(
                            tiny("--start-delay", str(START_DELAY), "--socket", f"{tmp}/w{i}.sock"),
                            env=env,
                            stdin=subprocess.DEVNULL,
                            start_new_session=True,
                        )
                    )
                ready = 0
                while ready < count:
                    if notify.recv(4096).startswith(b"READY=1"):
                        ready += 1
                return time.monotonic() - started
            finally:
                for proc in procs:
                    with contextlib.suppress(OSError):
                        proc.terminate()
                for proc in procs:
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


@dataclass
class Footprint:
    workers: int
    ready: str
    start_seconds: float
    rss: int
    uss: int
    cpu_percent: float
    wakeups: int
    threads: int
    fds: int
    workers_rss: int


_UNKNOWN_READY = re.compile(r"notify from unknown pid (\d+): \{'READY': '1'")
_SPAWNED = re.compile(r"pid (\d+)\) spawned ")


def start_herd(d: RunningDaemon, count: int, *, notify: bool, timeout: float = 600) -> tuple[float, set[int]]:
    """Wait until `count` workers are published: (seconds, set()), or (seconds, lost pids).

    Lost: workers whose sd_notify READY=1 the daemon logged as coming from an unknown pid
    (it had not registered the pid yet) and dropped. They can only time out, so once every
    worker has been spawned there is no point in waiting `online_timeout` for them.
    """
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        if d.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {d.proc.returncode}")
        try:
            status = d.status()
        except (DaemonUnreachable, OSError):  # not listening yet
            status = {"workers": [], "daemon": {"operation": "starting"}}
        online = [w for w in status["workers"] if w["published"] and w["state"] == "online"]
        if len(online) == count and status["daemon"]["operation"] is None:
            return elapsed, set()
        if notify:
            log = d.log
            spawned = {int(pid) for pid in _SPAWNED.findall(log)}
            lost = {int(pid) for pid in _UNKNOWN_READY.findall(log)} & spawned
            if lost and len(spawned) >= count:
                return elapsed, lost
        if elapsed > timeout:
            raise AssertionError(f"{len(online)} of {count} workers online after {timeout} s")
        time.sleep(0.2)


def footprint(count: int, idle: float, ready: str) -> Footprint | set[int]:
    """The idle daemon's footprint with `count` workers, or the pids it lost at start-up."""
    with daemon({**settings(count), "ready": ready}) as d:
        start_seconds, lost = start_herd(d, count, notify=ready == "notify")
        if lost:
            return lost
        time.sleep(2)  # let the start-up's garbage settle
        proc = psutil.Process(d.proc.pid)
        cpu_before, ctx_before = proc.cpu_times(), proc.num_ctx_switches()
        time.sleep(idle)
        cpu_after, ctx_after = proc.cpu_times(), proc.num_ctx_switches()
        info = proc.memory_full_info()
        workers_rss = sum(w.memory_info().rss for w in proc.children())
        return Footprint(
            workers=count,
            ready=ready,
            start_seconds=start_seconds,
            rss=info.rss,
            uss=info.uss,
            cpu_percent=max(
                0.0, 100 * (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / idle
            ),
            wakeups=ctx_after.voluntary - ctx_before.voluntary,
            threads=proc.num_threads(),
            fds=proc.num_fds(),
            workers_rss=workers_rss,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,4,16,64", help="worker counts for the restart times")
    parser.add_argument("--restarts", type=int, default=3, help="restarts per worker count")
    parser.add_argument("--idle-counts", default="64,512", help="worker counts for the footprint")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    parser.add_argument("--quick", action="store_true", help="a trial: 1,4,16 workers, 1 restart each; 64 idle 3 s")
    args = parser.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.counts, args.restarts, args.idle_counts, args.idle = "1,4,16", 1, "64", 3.0
    ok = True
    limit = START_DELAY + RESTART_MARGIN
    print(f"(a) restart time vs worker count: tiny.py --start-delay {START_DELAY}, {args.restarts} restart(s) each")
    for count in [int(c) for c in args.counts.split(",") if c]:
        done, cli, error = restart_times(count, args.restarts)
        if error:
            ok &= verdict(f"{count} workers: every restart succeeds", False, error)
            continue
        bare = [bare_start(count) for _ in range(args.restarts)]
        published = [r.daemon_published for r in done]
        print(
            f"{count:4d} workers: command {ms([r.wall for r in done])} | request -> published "
            f"{ms(published)} | published -> old retired {ms([r.retire for r in done])} | "
            f"spawn -> online {ms([s for r in done for s in r.startups])} | CLI overhead {cli * 1000:.0f} ms"
        )
        print(f"      without sockherd, {count} processes started until all READY=1: {ms(bare)}")
        ok &= verdict(
            f"{count} workers: request -> published <= start-up {START_DELAY} s + {RESTART_MARGIN} s",
            max(published) <= limit,
            f"max {max(published):.3f} s",
        )
    print(f"\n(b) the daemon's footprint with idle tiny.py workers ({args.idle:g} s of idle CPU)")
    for count in [int(c) for c in args.idle_counts.split(",") if c]:
        f = footprint(count, args.idle, "notify")
        if not isinstance(f, Footprint):
            ok &= verdict(
                f"{count} workers come online (sd_notify readiness, all started at once)",
                False,
                f"the daemon dropped READY=1 from {len(f)} worker(s) whose pid it had not registered yet "
                "(`notify from unknown pid` in its log); they would only time out. Measuring with "
                'ready = "socket" instead',
            )
            f = footprint(count, args.idle, "socket")
            assert isinstance(f, Footprint)
        print(
            f"{count:4d} workers (ready = {f.ready!r}, all online in {f.start_seconds:.1f} s): "
            f"daemon RSS {f.rss / 2**20:.1f} MiB (USS {f.uss / 2**20:.1f} MiB), "
            f"idle CPU {f.cpu_percent:.2f} % of one core, {f.wakeups} voluntary context switches, "
            f"{f.threads} thread(s), {f.fds} open fds; the workers' RSS together {f.workers_rss / 2**20:.0f} MiB"
        )
        if count == 64:
            ok &= verdict("RSS <= 40 MB at 64 workers", f.rss <= RSS_LIMIT, f"{f.rss / 1e6:.1f} MB")
        ok &= verdict(
            f"{count} workers: idle CPU ~0 (<= {IDLE_CPU_LIMIT} % of one core)",
            f.cpu_percent <= IDLE_CPU_LIMIT,
            f"{f.cpu_percent:.2f} %",
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
