"""Throughput through nginx: the published symlinks vs the workers' own sockets; UNIX vs TCP.

    python benchmarks/throughput.py [--rounds 4] [--seconds 5] [--app asgi|tiny] [--quick]

Load: `wrk -t2 -c16` (Debian's wrk 4.1), GET /, short runs alternating between two
nginx instances that differ only in their upstream lines, A/B/A/B in one run after a
1 s warm-up of each; ratio = B's total requests per second over A's (sums over all
rounds: requests / seconds).

1. Same daemon, two workers: upstream on the published symlinks (`app.0.sock`, nginx
   resolves the link at each connect) vs straight on the workers' sockets
   (`app.0-<id>.sock`), with and without nginx upstream keep-alive (without it, every
   request connects, so a per-connect cost of the symlink shows the most there).
   Target: symlinks / direct >= 0.98.
2. For the docs, outside sockherd: two standalone workers of the same app on UNIX
   sockets vs two on TCP 127.0.0.1 (`tiny.py --socket/--tcp`, or `uvicorn --uds/--port`),
   with upstream keep-alive and without. No target.

Apps: `asgi` is tests/apps/asgi_app.py under uvicorn (h11), the suite's standard app
(its access log goes to a file, as in production); `tiny` is benchmarks/apps/tiny.py,
a stdlib selectors loop that is several times faster, so nginx and the socket path
weigh more in its figures. Both are given; the default is both.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _harness import REPO, nginx, verdict
from restarts import daemon, exit_on_sigterm

from support.nginx import Nginx, free_port

TINY = REPO / "benchmarks" / "apps" / "tiny.py"
APPS_DIR = REPO / "tests" / "apps"
TARGET = 0.98
THREADS, CONNECTIONS = 2, 16

_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_P99 = re.compile(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class Wrk:
    requests: int
    seconds: float
    errors: int
    p99: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wrk(port: int, seconds: float) -> Wrk:
    out = subprocess.run(
        ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{round(seconds)}s", "--latency", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    match = _REQUESTS.search(out)
    p99 = _P99.search(out)
    if match is None or p99 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = sum(int(n) for n in m.groups()) if (m := _ERRORS.search(out)) else 0
    errors += int(m.group(1)) if (m := _NON2XX.search(out)) else 0
    return Wrk(
        int(match.group(1)),
        float(match.group(2)) * _UNIT[match.group(3)],
        errors,
        float(p99.group(1)) * _UNIT[p99.group(2)],
    )


def alternate(ports: tuple[int, int], rounds: int, seconds: float) -> tuple[list[Wrk], list[Wrk]]:
    """A/B/A/B...: short wrk runs alternating between two nginx ports, after a warm-up of each."""
    for port in ports:
        wrk(port, 1)
    a: list[Wrk] = []
    b: list[Wrk] = []
    for _ in range(rounds):
        a.append(wrk(ports[0], seconds))
        b.append(wrk(ports[1], seconds))
    return a, b


def total_rate(runs: list[Wrk]) -> float:
    return sum(r.requests for r in runs) / sum(r.seconds for r in runs)


def compare(title: str, names: tuple[str, str], a: list[Wrk], b: list[Wrk]) -> float:
    print(f"\n{title}")
    for i, (x, y) in enumerate(zip(a, b, strict=True), 1):
        print(
            f"  round {i}: {names[0]} {x.rate:9.0f} req/s (p99 {x.p99 * 1000:.2f} ms)   "
            f"{names[1]} {y.rate:9.0f} req/s (p99 {y.p99 * 1000:.2f} ms)   ratio {y.rate / x.rate:.3f}"
        )
    ratio = total_rate(b) / total_rate(a)
    errors = sum(r.errors for r in a + b)
    median = statistics.median(y.rate / x.rate for x, y in zip(a, b, strict=True))
    print(
        f"  sums: {names[0]} {total_rate(a):.0f} req/s, {names[1]} {total_rate(b):.0f} req/s: "
        f"ratio {ratio:.3f} (median of the rounds' ratios {median:.3f}); wrk errors and non-2xx: {errors}"
    )
    return ratio


@contextlib.contextmanager
def nginx_upstreams(servers: list[str], *, keepalive: bool) -> Iterator[int]:
    """nginx on a free port proxying to `servers` ("unix:/path" or "127.0.0.1:8001")."""
    with tempfile.TemporaryDirectory(prefix="sh-nginx-") as workdir:
        server = Nginx(Path(workdir), servers, keepalive=keepalive)
        try:
            yield server.port
        finally:
            server.stop()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not listen on port {port}")
        time.sleep(0.02)


def wait_unix(path: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not listen on {path}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the apps ----------------------------------------------------------------------------------------------


def sockherd_command(app: str) -> dict[str, object]:
    if app == "tiny":
        return {"command": [sys.executable, "-S", "-I", str(TINY)]}
    return {"command": [sys.executable, "-m", "sockherd.uvicorn", "asgi_app:app"], "cwd": str(APPS_DIR)}


def standalone_command(app: str, *, unix: str | None = None, port: int | None = None) -> list[str]:
    """The same app outside sockherd, on a UNIX socket or on TCP 127.0.0.1."""
    if app == "tiny":
        where = ["--socket", unix] if unix else ["--tcp", f"127.0.0.1:{port}"]
        return [sys.executable, "-S", "-I", str(TINY), *where]
    where = ["--uds", unix] if unix else ["--host", "127.0.0.1", "--port", str(port)]
    # as under sockherd.uvicorn: h11 (what is installed), keep-alive above nginx's, access log to a file
    return [sys.executable, "-m", "uvicorn", "asgi_app:app", "--timeout-keep-alive", "75", *where]


@contextlib.contextmanager
def standalone_workers(app: str, count: int, *, tcp: bool) -> Iterator[list[str]]:
    """`count` workers of the app outside sockherd; yields nginx upstream addresses."""
    with tempfile.TemporaryDirectory(prefix="sh-tp-", dir="/tmp") as workdir:
        procs: list[subprocess.Popen[bytes]] = []
        servers: list[str] = []
        with open(Path(workdir) / "workers.log", "ab") as log:
            try:
                for i in range(count):
                    if tcp:
                        port = free_port()
                        command = standalone_command(app, port=port)
                        servers.append(f"127.0.0.1:{port}")
                    else:
                        path = f"{workdir}/w{i}.sock"
                        command = standalone_command(app, unix=path)
                        servers.append(f"unix:{path}")
                    procs.append(subprocess.Popen(command, cwd=APPS_DIR, stdout=log, stderr=log))
                for proc, server in zip(procs, servers, strict=True):
                    if tcp:
                        wait_port(int(server.rpartition(":")[2]), proc)
                    else:
                        wait_unix(server.removeprefix("unix:"), proc)
                yield servers
            finally:
                for proc in procs:
                    stop(proc)


# -- the two comparisons -----------------------------------------------------------------------------------


def symlinks_vs_direct(app: str, rounds: int, seconds: float, keepalive: bool) -> float:
    with daemon({**sockherd_command(app), "workers": 2}) as d:
        status = d.wait_ready(2, timeout=60)
        links = [d.tmp_dir / f"app.{i}.sock" for i in range(2)]
        own = [Path(w["socket"]) for w in sorted(status["workers"], key=lambda w: w["index"]) if w["published"]]
        with nginx(links, keepalive=keepalive) as via_links, nginx(own, keepalive=keepalive) as direct:
            a, b = alternate((direct.port, via_links.port), rounds, seconds)
            errors = via_links.errors() + direct.errors()
        if d.published_pids() != {w["pid"] for w in status["workers"] if w["published"]}:
            raise AssertionError("the workers changed during the measurement")
    label = "with upstream keep-alive" if keepalive else "without upstream keep-alive"
    ratio = compare(f"{app}: symlinks vs the workers' own sockets, {label}", ("direct", "symlinks"), a, b)
    if errors:
        print(f"  nginx errors: {len(errors)}, first: {errors[0]}")
    return ratio


def unix_vs_tcp(app: str, rounds: int, seconds: float, keepalive: bool) -> float:
    with (
        standalone_workers(app, 2, tcp=False) as unix_servers,
        standalone_workers(app, 2, tcp=True) as tcp_servers,
        nginx_upstreams(unix_servers, keepalive=keepalive) as unix_port,
        nginx_upstreams(tcp_servers, keepalive=keepalive) as tcp_port,
    ):
        a, b = alternate((tcp_port, unix_port), rounds, seconds)
    label = "with upstream keep-alive" if keepalive else "without upstream keep-alive"
    return compare(f"{app}, standalone: UNIX socket vs TCP 127.0.0.1 upstream, {label}", ("TCP", "UNIX"), a, b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run (whole seconds)")
    parser.add_argument("--app", choices=["asgi", "tiny", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="a trial: 2 rounds of 2 s, tiny app only")
    args = parser.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.rounds, args.seconds = 2, 2
        if args.app == "both":
            args.app = "tiny"
    apps = ["asgi", "tiny"] if args.app == "both" else [args.app]
    print(
        f"wrk -t{THREADS} -c{CONNECTIONS}, {args.rounds} rounds of {args.seconds:g} s per side, alternating; "
        "nginx 1 worker process; 2 app workers"
    )
    ok = True
    ratios: list[tuple[str, float]] = []
    for app in apps:
        for keepalive in (True, False):
            ratio = symlinks_vs_direct(app, args.rounds, args.seconds, keepalive)
            ratios.append((f"{app}, {'keep-alive' if keepalive else 'no keep-alive'}", ratio))
    for app in apps:
        for keepalive in (True, False):
            unix_vs_tcp(app, args.rounds, args.seconds, keepalive)
    print()
    for label, ratio in ratios:
        ok &= verdict(f"symlinks / direct >= {TARGET} ({label})", ratio >= TARGET, f"{ratio:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
