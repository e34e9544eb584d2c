"""A bad deploy under load behind nginx, then a good one: does anybody notice?

    python benchmarks/bad_deploy.py [--steady 3] [--after 8] [--quick]

Two workers of tests/apps/asgi_app.py (`python -m sockherd.uvicorn`, default
`online_timeout` 10 s, `max_start_attempts` 1), behind nginx with the documented
settings and upstream keep-alive, 16 keep-alive clients, a quarter POSTs. The app reads
its release from the file `$RELEASE_FILE` at import; the bad deploy deletes that file,
so every new worker dies at start-up with a traceback (FileNotFoundError), as a release
with a broken import would. Then `sockherd restart` (the CLI). After `--after` seconds
under load the release file is written again ("3") and `sockherd restart` runs once
more: the good deploy.

Reported: seconds without a 2xx answer (requests bucketed by start time into 100 ms
slots over the whole run: an empty slot, as during a hang, counts too), failed requests,
the bad restart's exit code, output and time to return vs `online_timeout`, which
release answered a probe sent through nginx every 100 ms during the failed deploy, and
after the good deploy: its exit code, whether the old workers' pids are gone, which
release answers. Targets: the command fails within `online_timeout`; 0 s without 2xx;
the recovery ends the old workers. Also checked: the old version served every probe
while the bad one failed, no request failed, the new release serves after recovery.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
from _harness import APP, nginx, verdict
from restarts import daemon, exit_on_sigterm

from support.http import LoadGenerator, tcp_get

ONLINE_TIMEOUT = 10.0
BUCKET = 0.1
CLIENTS = 16
POST_EVERY = 4
_RELEASE = re.compile(r"pid=(\d+) release=(\S+)")


class Prober:
    """One GET through nginx every 100 ms, recording (time, pid, release) or the failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, int, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(BUCKET):
            try:
                response = tcp_get(self.port, timeout=30)
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            match = _RELEASE.search(response.body.decode(errors="replace"))
            if response.status != 200 or match is None:
                self.failures.append(f"HTTP {response.status}: {response.body[:100]!r}")
                continue
            self.seen.append((time.monotonic(), int(match.group(1)), match.group(2)))

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def between(self, start: float, end: float) -> list[tuple[int, str]]:
        return [(pid, release) for t, pid, release in self.seen if start <= t <= end]


def alive(pids: set[int]) -> list[int]:
    """Those of the pids that still exist and are not zombies."""
    found = []
    for pid in sorted(pids):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steady", type=float, default=3.0, help="seconds of load before the bad deploy")
    parser.add_argument("--after", type=float, default=8.0, help="seconds of load after the bad deploy returned")
    parser.add_argument("--quick", action="store_true", help="a trial: 1 s steady, 3 s after")
    args = parser.parse_args()
    exit_on_sigterm()
    if args.quick:
        args.steady, args.after = 1.0, 3.0
    with tempfile.TemporaryDirectory(prefix="sh-release-", dir="/tmp") as tmp:
        release = Path(tmp) / "release"
        release.write_text("1\n")
        settings = {
            **APP,
            "workers": 2,
            "online_timeout": ONLINE_TIMEOUT,
            "environment": {"RELEASE_FILE": str(release)},
        }
        with daemon(settings) as d:
            status = d.wait_ready(2, timeout=60)
            old_pids = {w["pid"] for w in status["workers"] if w["published"]}
            links = [d.tmp_dir / f"app.{i}.sock" for i in range(2)]
            with (
                nginx(links, keepalive=True) as server,
                LoadGenerator(server.port, CLIENTS, POST_EVERY) as load,
                Prober(server.port) as prober,
            ):
                load.wait_requests(200)
                load_from = time.monotonic()
                time.sleep(args.steady)

                release.unlink()  # the bad release: every new worker fails at import
                bad_from = time.monotonic()
                bad = d.cli("restart", timeout=120)
                bad_to = time.monotonic()
                time.sleep(args.after)
                bad_end = time.monotonic()
                after_bad = d.status()

                release.write_text("3\n")
                good_from = time.monotonic()
                good = d.cli("restart", timeout=120)
                good_to = time.monotonic()
                lingering = alive(old_pids)  # the command returns once the old generation is retired
                time.sleep(2)
                lingering_later = alive(old_pids)
                result = load.stop()
                load_to = time.monotonic()
            errors = server.errors()
            after_good = d.status()

    # seconds without a 2xx: 100 ms slots by request start; a slot without any 200 counts
    ok_slots = Counter(int((start - load_from) / BUCKET) for start, status in result.status_times if status == 200)
    slots = int((load_to - load_from) / BUCKET)
    empty = [i for i in range(slots) if ok_slots[i] == 0]
    during_bad = prober.between(bad_from, bad_end)
    after_recovery = prober.between(good_to, load_to)
    old_serving = [(pid, rel) for pid, rel in during_bad if pid in old_pids and rel == "1"]
    published_after_bad = {w["pid"] for w in after_bad["workers"] if w["published"]}
    new_pids = {w["pid"] for w in after_good["workers"] if w["published"]}
    bad_seconds = bad_to - bad_from
    failed_get = sum(f.startswith("GET") for f in result.failures)
    failed_post = sum(f.startswith("POST") for f in result.failures)

    print(
        f"2 asgi_app workers behind nginx (keepalive 32), {CLIENTS} clients, 1 in {POST_EVERY} a POST; "
        f"online_timeout {ONLINE_TIMEOUT:g} s"
    )
    print(f"bad deploy: `sockherd restart` exit {bad.returncode} after {bad_seconds:.2f} s")
    # its own lines (progress, the reason) in full; of the failed worker's output, the last two
    own = [line for line in bad.stderr.strip().splitlines() if not line.startswith("  |")]
    tail = [line for line in bad.stderr.strip().splitlines() if line.startswith("  |")]
    for line in [
        *bad.stdout.strip().splitlines(),
        *own,
        *([f"  | ... ({len(tail)} lines)"] if tail else []),
        *tail[-2:],
    ]:
        print(f"    > {line}")
    print(
        f"during the failed deploy and {args.after:g} s after it: {len(during_bad)} probes through nginx, "
        f"{len(old_serving)} answered by the old workers with release 1 "
        f"(releases {dict(Counter(r for _, r in during_bad))}); probe failures {len(prober.failures)}"
    )
    print(f"  published after the failed deploy: {sorted(published_after_bad)} (old: {sorted(old_pids)})")
    print(f"good deploy: `sockherd restart` exit {good.returncode} after {good_to - good_from:.2f} s")
    print(
        f"  old pids alive when it returned: {lingering or 'none'}, 2 s later: {lingering_later or 'none'}; "
        f"now serving {sorted(new_pids)}, "
        f"probes after it: releases {dict(Counter(r for _, r in after_recovery))}"
    )
    print(
        f"load: {result.total} requests, failed {failed_get} GET, {failed_post} POST; "
        f"nginx [error] lines {len(errors)}; "
        f"{len(empty)} of {slots} slots of {BUCKET * 1000:.0f} ms without a 2xx"
    )
    for line in result.failures[:5] + errors[:5]:
        print(f"  {line}")

    ok = verdict(
        f"bad deploy: the command fails within online_timeout ({ONLINE_TIMEOUT:g} s)",
        bad.returncode != 0 and bad_seconds <= ONLINE_TIMEOUT,
        f"exit {bad.returncode} after {bad_seconds:.2f} s",
    )
    ok &= verdict("0 s without a 2xx answer", not empty, f"{len(empty) * BUCKET:.1f} s")
    ok &= verdict(
        "the old version kept serving",
        bool(during_bad) and len(old_serving) == len(during_bad) and published_after_bad == old_pids,
        f"{len(old_serving)}/{len(during_bad)} probes",
    )
    ok &= verdict("no failed request", not result.failures and not prober.failures, f"{len(result.failures)}")
    ok &= verdict(
        "recovery: the good deploy succeeds and ends the old workers",
        good.returncode == 0 and not lingering,
        f"exit {good.returncode}, old pids alive: {lingering or 'none'}",
    )
    ok &= verdict(
        "recovery: the new release serves",
        bool(after_recovery) and all(rel == "3" and pid in new_pids for pid, rel in after_recovery),
        f"{len(after_recovery)} probes",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
