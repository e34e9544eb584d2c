"""Restarts at full load behind nginx: failed requests, upstream errors, latency, restart time.

    python benchmarks/restarts.py [--restarts 20] [--steady 10] [--gap 0.5] [--quick]

Two workers of tests/apps/asgi_app.py (`python -m sockherd.uvicorn`) behind a real nginx
(the documented upstream settings: `max_fails=0`, `proxy_next_upstream error timeout`),
16 keep-alive clients of the project's asyncio load generator, a quarter of the requests
POSTs with a 1000-byte body (nginx never retries those on another upstream, so a reset
shows as a failed POST). First a steady phase, then `sockherd restart` (the real CLI, a
subprocess) run back to back with a short gap, all at full load. Twice: with nginx
upstream keep-alive (`keepalive 32`) and without.

Reported per run: failed GETs and POSTs, nginx `[error]` lines, p99/max latency of the
requests started during the steady phase vs those started while a restart command ran
(and, without a target, while two interpreters import the app and one runs the CLI with
no restart: what a new generation's start-up costs the 2 cores, whoever manages it),
and the restart time three ways: the command end to end (includes the CLI's own
interpreter start-up and the old generation's linger and drain), from the command's
start until the daemon logged "generation N published", and the daemon's own
"starting generation N" → "generation N published" (its log, millisecond stamps).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from _harness import APP, REPO, distribution_ms, nginx, percentile, verdict

from support.daemon import RunningDaemon, running_daemon
from support.http import LoadGenerator

CLIENTS = 16
CONTROLS = 5  # CPU-contention baselines (see cpu_control), before the restarts
APPS_DIR = REPO / "tests" / "apps"
POST_EVERY = 4  # a quarter POSTs
P99_FACTOR = 1.5

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_STARTING = re.compile(r"INFO starting generation (\d+)")
_PUBLISHED = re.compile(r"INFO generation (\d+) published")
_SERVING = re.compile(r"INFO generation (\d+) is serving")
_ONLINE = re.compile(r"online after ([\d.]+)s")


@contextlib.contextmanager
def daemon(settings: dict[str, Any]) -> Iterator[RunningDaemon]:
    """A real daemon whose workers write their output to files: stdout (uvicorn's access log), stderr.

    As in production (`stdout`/`stderr` in the config), and it keeps the access log out
    of the pipe the benchmark process reads the daemon's log from: that reader thread
    would otherwise take the GIL from the load generator thousands of times a second.
    Two files, so that a failed start's error message (the tail of `stderr`) shows the
    failed worker's traceback rather than the old workers' access log.
    """
    with tempfile.TemporaryDirectory(prefix="sh-bench-") as workdir:
        logs = {"stdout": str(Path(workdir) / "access.log"), "stderr": str(Path(workdir) / "errors.log")}
        with running_daemon(Path(workdir), {**logs, **settings}) as running:
            yield running


def exit_on_sigterm() -> None:
    """Unwind on SIGTERM (`timeout`, a CI runner), so that every context manager stops what it started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def log_time(line: str) -> float:
    """The wall-clock time of a daemon log line (its logging stamp, 1 ms resolution)."""
    match = _STAMP.match(line)
    if match is None:
        raise ValueError(f"no time stamp in the daemon log line {line!r}")
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Restart:
    """One `sockherd restart`, timed from outside (monotonic) and from the daemon's log (wall clock)."""

    returncode: int
    output: str
    started: float  # monotonic, just before the CLI process is spawned
    ended: float  # monotonic, once it has exited
    started_wall: float
    requested_at: float | None = None  # daemon log: "starting generation N"
    published_at: float | None = None  # daemon log: "generation N published"
    serving_at: float | None = None  # daemon log: "generation N is serving" (old ones retired)
    startups: list[float] = field(default_factory=list)  # daemon log: each new worker's "online after Xs"

    @property
    def wall(self) -> float:
        return self.ended - self.started

    @property
    def to_published(self) -> float:
        """From the command's start to the publication (CLI start-up included)."""
        assert self.published_at is not None
        return self.published_at - self.started_wall

    @property
    def daemon_published(self) -> float:
        """From the daemon's receipt of the request to the publication."""
        assert self.published_at is not None and self.requested_at is not None
        return self.published_at - self.requested_at

    def phases(self) -> list[tuple[str, float, float]]:
        """The command's phases on the monotonic clock (the log's wall-clock stamps shifted over)."""
        shift = self.started - self.started_wall
        assert self.requested_at is not None and self.published_at is not None and self.serving_at is not None
        requested, published, serving = (t + shift for t in (self.requested_at, self.published_at, self.serving_at))
        return [
            ("CLI start-up", self.started, requested),
            ("new generation starting", requested, published),
            ("old generation retiring", published, serving),
            ("CLI exit", serving, self.ended),
        ]

    @property
    def retire(self) -> float:
        """From the publication to the old generation's end (linger, drain, exit)."""
        assert self.published_at is not None and self.serving_at is not None
        return self.serving_at - self.published_at


def timed_restart(d: RunningDaemon, *args: str, timeout: float = 120.0) -> Restart:
    """Run `sockherd restart` as a subprocess and time it from outside and from the daemon's log."""
    mark = d.mark()
    started_wall = time.time()
    started = time.monotonic()
    proc = d.cli("restart", *args, timeout=timeout)
    ended = time.monotonic()
    restart = Restart(proc.returncode, (proc.stdout + proc.stderr).strip(), started, ended, started_wall)
    if proc.returncode != 0:
        return restart
    generation = d.wait_log(_SERVING.pattern, timeout=10, start=mark).group(1)
    lines = d.log.splitlines()[mark:]
    for line in lines:
        if (m := _STARTING.search(line)) and m.group(1) == generation:
            restart.requested_at = log_time(line)
        elif (m := _PUBLISHED.search(line)) and m.group(1) == generation:
            restart.published_at = log_time(line)
        elif (m := _SERVING.search(line)) and m.group(1) == generation:
            restart.serving_at = log_time(line)
        elif m := _ONLINE.search(line):
            restart.startups.append(float(m.group(1)))
    if restart.requested_at is None or restart.published_at is None:
        raise AssertionError("the daemon's log lacks the restart's lines:\n" + "\n".join(lines))
    return restart


def cli_overhead(d: RunningDaemon, runs: int = 3) -> float:
    """The CLI's own cost (interpreter start-up, config load, IPC): `sockherd status`, best of a few."""
    best = float("inf")
    for _ in range(runs):
        started = time.monotonic()
        d.cli("status").check_returncode()
        best = min(best, time.monotonic() - started)
    return best


def cpu_control(apps_dir: Path) -> tuple[float, float]:
    """What a restart costs the machine, without a restart: the CPU-contention baseline.

    Two interpreters importing the app as a new worker would (uvicorn, sockherd.uvicorn,
    asgi_app) and one CLI run (`python -m sockherd --version`), all at once; no socket
    moves and nothing is stopped. Returns its (start, end) on the monotonic clock.
    """
    started = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "-c", "import uvicorn, sockherd.uvicorn, asgi_app"], cwd=apps_dir)
        for _ in range(2)
    ]
    procs.append(subprocess.Popen([sys.executable, "-m", "sockherd", "--version"], stdout=subprocess.DEVNULL))
    for proc in procs:
        proc.wait(60)
    return started, time.monotonic()


def seconds_summary(values: list[float]) -> str:
    return distribution_ms(values) if values else "n=0"


@dataclass
class Run:
    keepalive: bool
    total: int
    failed_get: int
    failed_post: int
    failures: list[str]
    nginx_errors: list[str]
    steady: list[float]
    during: list[float]
    control: list[float]
    latencies: list[tuple[float, float]]
    restarts: list[Restart]
    cli: float


def run(*, keepalive: bool, restarts: int, steady_seconds: float, gap: float) -> Run:
    with daemon({**APP, "workers": 2}) as d:
        d.wait_ready(2, timeout=60)
        links = [d.tmp_dir / f"app.{i}.sock" for i in range(2)]
        cli = cli_overhead(d)
        done: list[Restart] = []
        with nginx(links, keepalive=keepalive) as server, LoadGenerator(server.port, CLIENTS, POST_EVERY) as load:
            load.wait_requests(500)  # warm: nginx's pool, the workers' first requests
            steady_from = time.monotonic()
            time.sleep(steady_seconds)
            steady_to = time.monotonic()
            controls = []
            for _ in range(min(restarts, CONTROLS)):
                controls.append(cpu_control(APPS_DIR))
                time.sleep(gap)
            for _ in range(restarts):
                restart = timed_restart(d)
                done.append(restart)
                if restart.returncode != 0:
                    print(f"restart failed (exit {restart.returncode}): {restart.output}")
                    break
                time.sleep(gap)
            result = load.stop()
            errors = server.errors()
    windows = [(r.started, r.ended) for r in done]
    steady = [s for start, s in result.latencies if steady_from <= start <= steady_to]
    during = [s for start, s in result.latencies if any(a <= start <= b for a, b in windows)]
    control = [s for start, s in result.latencies if any(a <= start <= b for a, b in controls)]
    return Run(
        keepalive=keepalive,
        total=result.total,
        failed_get=sum(f.startswith("GET") for f in result.failures),
        failed_post=sum(f.startswith("POST") for f in result.failures),
        failures=result.failures,
        nginx_errors=errors,
        steady=steady,
        during=during,
        control=control,
        latencies=result.latencies,
        restarts=done,
        cli=cli,
    )


def report(r: Run, restarts: int) -> bool:
    label = "nginx keepalive 32" if r.keepalive else "no upstream keep-alive"
    ok_restarts = [x for x in r.restarts if x.returncode == 0]
    print(f"\n== {label}: {len(ok_restarts)}/{restarts} restarts, {r.total} requests ==")
    print(f"failed: {r.failed_get} GET, {r.failed_post} POST; nginx [error] lines: {len(r.nginx_errors)}")
    for line in r.failures[:5]:
        print(f"  failure: {line}")
    for line in r.nginx_errors[:5]:
        print(f"  nginx: {line}")
    print(f"latency steady:           {seconds_summary(r.steady)}")
    print(f"latency during restarts:  {seconds_summary(r.during)}")
    print(f"latency while 2 app imports + a CLI run, no restart (CPU contention only): {seconds_summary(r.control)}")
    if ok_restarts:
        for i, (phase, _, _) in enumerate(ok_restarts[0].phases()):
            spans = [x.phases()[i] for x in ok_restarts]
            in_phase = [s for start, s in r.latencies if any(a <= start < b for _, a, b in spans)]
            if in_phase:
                print(f"  during {phase + ':':26}{seconds_summary(in_phase)}")
        print(f"restart command, end to end:            {seconds_summary([x.wall for x in ok_restarts])}")
        print(f"command start -> generation published:   {seconds_summary([x.to_published for x in ok_restarts])}")
        print(f"daemon: request -> generation published: {seconds_summary([x.daemon_published for x in ok_restarts])}")
        retire = [x.retire for x in ok_restarts if x.serving_at is not None]
        print(f"daemon: published -> old ones retired:   {seconds_summary(retire)}")
        print(
            f"new workers' start-up (spawn -> online):  {seconds_summary([s for x in ok_restarts for s in x.startups])}"
        )
        print(f"CLI overhead (`sockherd status`, best of 3): {r.cli * 1000:.0f} ms")
    steady99, during99 = percentile(r.steady, 99), percentile(r.during, 99)
    ok = verdict(f"{label}: all {restarts} restarts succeeded", len(ok_restarts) == restarts, f"{len(ok_restarts)}")
    ok &= verdict(f"{label}: 0 failed GETs", r.failed_get == 0, f"{r.failed_get}")
    ok &= verdict(f"{label}: 0 failed POSTs", r.failed_post == 0, f"{r.failed_post}")
    ok &= verdict(f"{label}: 0 nginx upstream errors", not r.nginx_errors, f"{len(r.nginx_errors)}")
    ok &= verdict(
        f"{label}: p99 during restarts <= {P99_FACTOR}x steady",
        bool(r.during) and during99 <= P99_FACTOR * steady99,
        f"{during99 * 1000:.2f} ms vs {steady99 * 1000:.2f} ms ({during99 / steady99:.2f}x)",
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of steady load before the first restart")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between one restart's end and the next")
    parser.add_argument("--keepalive", choices=["both", "on", "off"], default="both", help="nginx upstream keep-alive")
    parser.add_argument("--quick", action="store_true", help="a trial: 3 restarts after 3 s steady")
    args = parser.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.restarts, args.steady = 3, 3.0
    print(
        f"{args.restarts} restarts of 2 asgi_app workers (sockherd.uvicorn) behind nginx, {CLIENTS} keep-alive "
        f"clients, 1 in {POST_EVERY} a POST; {args.steady:.0f} s steady first, {args.gap} s between restarts"
    )
    ok = True
    for keepalive in {"both": (True, False), "on": (True,), "off": (False,)}[args.keepalive]:
        result = run(keepalive=keepalive, restarts=args.restarts, steady_seconds=args.steady, gap=args.gap)
        ok &= report(result, args.restarts)
    print("\nALL PASS" if ok else "\nSOME TARGETS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except subprocess.TimeoutExpired as exc:
        raise SystemExit(f"a command timed out: {exc}") from None
