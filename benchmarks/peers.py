"""sockherd against gunicorn (HUP reload) and supervisor (restart), behind the same nginx.

    python benchmarks/peers.py [--seconds 30] [--restarts 10] [--bad-seconds 15]
                               [--only gunicorn,supervisor,sockherd] [--no-upstream-keepalive]

Each manager runs 2 workers of benchmarks/apps/slow_start.py (an ASGI app that takes
0.3 s to start) behind nginx (upstream keep-alive 32 unless told otherwise), under 16
keep-alive clients of the project's own load generator (tests/support/http.py: every
failure counted), a quarter of the requests POSTs. Two scenarios, each on a fresh
manager, nginx and load:

1. Restarts: a 5 s steady phase, then ``--restarts`` restarts, one every
   ``--seconds / --restarts`` (or at once after the previous one if it took longer).
   Reported: requests, failed GETs and POSTs, nginx ``[error]`` lines about the
   upstream, p99 latency of the 2xx answers to requests started during a restart (from
   the deploy's start to its end: the command has returned and every new worker has
   answered) against the steady phase (and the max: with 16 closed-loop clients a
   stall delays only 16 requests, which a p99 over a long window can hide), and the
   time per restart: until the new workers answer (a pid that was not there before
   answers a request of the load through nginx or a direct GET on the manager's
   sockets; on gunicorn's shared socket: or logs that it serves), and until the
   command returns, with the CLI's own start-up time (its ``status``, best of 3).
2. A bad deploy: a marker file makes the app raise at import; a deploy is started
   under load and watched for ``--bad-seconds``; then the marker goes and a good deploy
   follows. Reported: the seconds of the watch (1 s slots from the deploy's start) in
   which no 2xx answer arrived, the command's exit code and output, whether the old
   workers still answered requests in the second half of the watch, whether the good
   deploy's new workers answer, and whether the old workers' pids are gone within 15 s.

Managers (see _peers.py for exactly how each is run and deployed): sockherd with the
nginx settings its docs give (``max_fails=0``) and with nginx's defaults; gunicorn with
nginx's defaults (one upstream server, so ``max_fails`` never applies); supervisor with
nginx's defaults (``max_fails=1 fail_timeout=10s``, what a typical setup has) and with
``max_fails=0``. Every nginx has ``proxy_next_upstream error timeout`` (nginx's default).
PASS/FAIL lines check sockherd against issue 4's targets; the peers get no verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from _harness import nginx, percentile, verdict
from _peers import (
    MANAGERS,
    WORKERS,
    Deploy,
    Gunicorn,
    Manager,
    Sockherd,
    alive,
    answering_pid,
    cold_start_seconds,
)

from support.http import LoadGenerator, LoadResult
from support.nginx import Nginx

CLIENTS = 16
POST_EVERY = 4  # a quarter of the requests are POSTs
STEADY = 5.0  # seconds of load before the first restart
POLL_EVERY = 0.005  # seconds between looks at a deploy and at the pids the load has seen
PROBE_EVERY = 0.02  # seconds between direct probes of the manager's sockets
RESTART_TIMEOUT = 30.0
STARTUP = 0.3  # the app's start-up time (slow_start.py)
LINGER = 0.25  # sockherd's default linger
ONLINE_TIMEOUT = 10.0  # sockherd's default online_timeout
SLOW_FAILURE = 2.0  # a failed sockherd deploy slower than this gets the daemon's log printed
OLD_WORKERS_GRACE = 15.0  # how long the old workers get to exit after the recovering deploy

DEFAULTS = "nginx defaults (max_fails=1 fail_timeout=10s)"
DOCUMENTED = "max_fails=0"


@dataclass(frozen=True)
class Variant:
    manager: str
    max_fails: int
    label: str

    @property
    def title(self) -> str:
        return f"{self.manager}, {self.label}"


VARIANTS = [
    Variant("sockherd", 0, f"{DOCUMENTED} (documented)"),
    Variant("sockherd", 1, DEFAULTS),
    Variant("gunicorn", 1, "nginx defaults (one server: max_fails never applies)"),
    Variant("supervisor", 1, DEFAULTS),
    Variant("supervisor", 0, DOCUMENTED),
]


# -- measuring --------------------------------------------------------------------------


def load_pids(load: LoadGenerator) -> dict[int, int]:
    """Responses per worker pid so far (a copy; the load runs in another thread)."""
    for _ in range(100):
        try:
            return dict(load.result.pids)
        except RuntimeError:  # changed size during the copy
            continue
    return {}


def known_pids(manager: Manager, load: LoadGenerator) -> set[int]:
    return set(load_pids(load)) | manager.worker_pids()


def follow(manager: Manager, deploy: Deploy, load: LoadGenerator, old: set[int], timeout: float) -> float | None:
    """Watch a deploy: the moment WORKERS new workers have answered (None if they never do).

    A worker counts as answering when a request of the load through nginx, or a direct
    GET on the manager's sockets (every PROBE_EVERY: the probes share the GIL with the
    load generator's thread, so they are kept rare), is answered by a pid that was not
    there before. On a socket shared by all workers (gunicorn) a probe reaches any one
    worker, so the workers' own "startup complete" log lines are used instead. Returns
    once that has happened and the command (if any) has returned.
    """
    new: set[int] = set()
    answered: float | None = None
    deadline = deploy.started + timeout
    next_probe = deploy.started
    while True:
        done = deploy.poll()
        if answered is None:
            new |= set(load_pids(load)) - old
            if len(new) < WORKERS and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_EVERY
                new |= manager.ready_pids() - old
                for path in manager.probe_paths():
                    pid = answering_pid(path, timeout=0.5)
                    if pid is not None and pid not in old:
                        new.add(pid)
            if len(new) >= WORKERS:
                answered = time.monotonic()
        if (answered is not None and done) or time.monotonic() > deadline:
            return answered
        time.sleep(POLL_EVERY)


@dataclass
class Restart:
    started: float
    answered: float | None  # every new worker has answered
    command_seconds: float | None  # None: a signal, no command
    returncode: int | None
    output: str

    @property
    def ended(self) -> float:
        finished = self.started + (self.command_seconds or 0.0)
        return max(finished, self.answered if self.answered is not None else finished)

    @property
    def answer_seconds(self) -> float | None:
        return None if self.answered is None else self.answered - self.started


@dataclass
class Responses:
    """Each answered request: start, end, status (rebuilt from a LoadResult)."""

    rows: list[tuple[float, float, int]]

    @classmethod
    def of(cls, result: LoadResult) -> Responses:
        # latencies and the non-zero status_times are appended together, in the same order
        answered = [(start, status) for start, status in result.status_times if status != 0]
        return cls(
            [
                (start, start + elapsed, status)
                for (start, elapsed), (_, status) in zip(result.latencies, answered, strict=True)
            ]
        )

    def seconds_without_2xx(self, start: float, end: float) -> int:
        ok_seconds = {int(done - start) for _, done, status in self.rows if 200 <= status < 300 and start <= done < end}
        return sum(1 for second in range(int(end - start + 0.5)) if second not in ok_seconds)


def method_failures(result: LoadResult) -> tuple[int, int]:
    gets = sum(1 for f in result.failures if f.startswith("GET:"))
    posts = sum(1 for f in result.failures if f.startswith("POST:"))
    return gets, posts


def failure_kinds(result: LoadResult, top: int = 3) -> str:
    kinds = Counter(re.sub(r"b'.*", "", f.split(": ", 1)[1]).strip().rstrip(":") for f in result.failures)
    return ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common(top))


_NGINX_MESSAGE = re.compile(r"\[\w+\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client: .*)?$")


def upstream_errors(server: Nginx) -> list[str]:
    return [line for line in server.errors() if "upstream" in line]


def error_kinds(lines: list[str], top: int = 3) -> str:
    kinds: Counter[str] = Counter()
    for line in lines:
        match = _NGINX_MESSAGE.search(line)
        message = match.group(1) if match else line
        kinds[re.sub(r"unix:/\S+", "unix:SOCK", message.split(" while ")[0])] += 1
    return "; ".join(f"{kind} x{n}" for kind, n in kinds.most_common(top))


def incident_notes(manager: Manager, last: int = 3) -> list[str]:
    lines = manager.incidents()
    if not lines:
        return []
    return [f"{len(lines)} line(s) in {manager.name}'s log about killed, crashed or abandoned workers; last:"] + [
        f"  {line}" for line in lines[-last:]
    ]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def spread(values: list[float]) -> str:
    if not values:
        return "none"
    return f"p50 {statistics.median(values):.2f} / max {max(values):.2f} s"


# -- scenario 1: restarts under load ----------------------------------------------------


@dataclass
class RestartReport:
    variant: Variant
    requests: int
    failed_get: int
    failed_post: int
    upstream_errors: list[str]
    p99_steady: float
    p99_during: float
    max_during: float
    restarts: list[Restart]
    failures: str
    cli: float | None  # the deploy command's own start-up (its `status`, best of 3)
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.p99_during / self.p99_steady if self.p99_steady else float("nan")

    @property
    def answer_times(self) -> list[float]:
        return [t for r in self.restarts if (t := r.answer_seconds) is not None]

    @property
    def command_times(self) -> list[float]:
        return [r.command_seconds for r in self.restarts if r.command_seconds is not None]


def run_restarts(variant: Variant, seconds: float, restarts: int, keepalive: bool) -> RestartReport:
    with (
        MANAGERS[variant.manager]() as manager,
        nginx(manager.upstream, keepalive=keepalive, max_fails=variant.max_fails) as server,
        LoadGenerator(server.port, CLIENTS, POST_EVERY) as load,
        contextlib.ExitStack() as deploys,
    ):
        cli = manager.cli_seconds()
        load.wait_requests(200)
        steady_start = time.monotonic()
        time.sleep(STEADY)
        first = time.monotonic()
        interval = seconds / restarts
        records: list[Restart] = []
        notes: list[str] = []
        for i in range(restarts):
            time.sleep(max(0.0, first + i * interval - time.monotonic()))
            old = known_pids(manager, load)
            deploy = deploys.enter_context(manager.deploy())
            answered = follow(manager, deploy, load, old, RESTART_TIMEOUT)
            if not deploy.poll():
                deploy.kill()
                notes.append(f"restart {i + 1}: the command did not return within {RESTART_TIMEOUT:.0f} s")
            if answered is None:
                notes.append(f"restart {i + 1}: the new workers did not answer within {RESTART_TIMEOUT:.0f} s")
            if deploy.is_command and deploy.returncode != 0:
                notes.append(f"restart {i + 1}: exit {deploy.returncode}: {deploy.output.splitlines()[-1:]}")
            records.append(
                Restart(
                    deploy.started,
                    answered,
                    deploy.seconds if deploy.is_command else None,
                    deploy.returncode,
                    deploy.output,
                )
            )
        time.sleep(max(0.0, first + seconds - time.monotonic()))
        result = load.stop()
        errors = upstream_errors(server)
        notes += incident_notes(manager)
    windows = [(r.started, r.ended) for r in records]
    ok = [(start, end - start) for start, end, status in Responses.of(result).rows if 200 <= status < 300]
    steady = [e for s, e in ok if steady_start <= s < first]
    during = [e for s, e in ok if any(a <= s <= b for a, b in windows)]
    gets, posts = method_failures(result)
    return RestartReport(
        variant,
        result.total,
        gets,
        posts,
        errors,
        percentile(steady, 99),
        percentile(during, 99),
        max(during, default=float("nan")),
        records,
        failure_kinds(result),
        cli,
        notes,
    )


def print_restarts(report: RestartReport, seconds: float) -> None:
    r = report
    print(
        f"restarts: {len(r.restarts)} in {seconds:.0f} s under load: {r.requests:,} requests; "
        f"failed: {r.failed_get:,} GET, {r.failed_post:,} POST; "
        f"nginx upstream [error] lines: {len(r.upstream_errors):,}"
    )
    if r.failures:
        print(f"  failures: {r.failures}")
    if r.upstream_errors:
        print(f"  nginx: {error_kinds(r.upstream_errors)}")
    print(
        f"  p99 latency: steady {ms(r.p99_steady)}, during restarts {ms(r.p99_during)} ({r.ratio:.1f}x steady); "
        f"max during restarts {ms(r.max_during)}"
    )
    command = spread(r.command_times) if r.command_times else "n/a (a signal)"
    print(f"  per restart: new workers answer after {spread(r.answer_times)}; command returns after {command}")
    print("  each restart's new workers answer after: " + ", ".join(f"{t:.2f}" for t in r.answer_times) + " s")
    if r.cli is not None:
        print(f"  (each command first pays the CLI's own start-up: `status` takes {r.cli:.2f} s, best of 3)")
    for note in r.notes:
        print(f"  ! {note}")


# -- scenario 2: a bad deploy under load --------------------------------------------------


@dataclass
class BadDeployReport:
    variant: Variant
    window: float
    without_2xx: int
    command: str
    reported_failure: bool | None  # None: no command
    command_seconds: float | None
    old_kept_serving: bool
    recovered: str
    recovered_ok: bool
    old_ended: str
    old_ended_ok: bool
    requests: int
    failed: int
    notes: list[str] = field(default_factory=list)


def run_bad_deploy(variant: Variant, window: float, keepalive: bool) -> BadDeployReport:
    notes: list[str] = []
    with (
        MANAGERS[variant.manager]() as manager,
        nginx(manager.upstream, keepalive=keepalive, max_fails=variant.max_fails) as server,
        LoadGenerator(server.port, CLIENTS, POST_EVERY) as load,
        contextlib.ExitStack() as deploys,
    ):
        load.wait_requests(200)
        time.sleep(1.0)
        old_pids = manager.worker_pids()
        old_procs = [p for pid in old_pids if (p := manager.process(pid)) is not None]
        manager.marker.touch()
        mark = manager.log_mark() if isinstance(manager, Sockherd) else 0
        bad = deploys.enter_context(manager.deploy())
        bad_started = bad.started
        half = bad_started + window / 2
        end = bad_started + window
        while time.monotonic() < half:
            bad.poll()
            time.sleep(0.01)
        served_half = sum(n for pid, n in load_pids(load).items() if pid in old_pids)
        while time.monotonic() < end:
            bad.poll()
            time.sleep(0.01)
        served_end = sum(n for pid, n in load_pids(load).items() if pid in old_pids)
        if not bad.poll():
            notes.append(f"the bad deploy's command was still running after {window:.0f} s; waiting for it")
            if not bad.wait(120):
                bad.kill()
                notes.append("... and was killed after 120 s more")
        if bad.is_command:
            lines = [line.strip() for line in bad.output.splitlines() if line.strip()]
            said = " / ".join([line for line in lines if re.search("error|fail", line, re.I)] or lines)
            command = f"exit {bad.returncode} after {bad.seconds or 0:.2f} s" + (f': "{said[:240]}"' if said else "")
            reported: bool | None = bad.returncode != 0
        else:
            command = "n/a, reports nothing (a signal)"
            reported = None
        if isinstance(manager, Sockherd) and (bad.seconds or 0) > SLOW_FAILURE:
            notes.append(
                f"the failed deploy took over {SLOW_FAILURE:.0f} s; the daemon's log meanwhile (last 15 lines):"
            )
            notes += [f"  {line}" for line in manager.log_since(mark)[-15:]]
        if isinstance(manager, Gunicorn) and (code := manager.master_exit()) is not None:
            notes.append(
                f"the gunicorn master exited with status {code} (the old workers had been sent SIGTERM at the HUP)"
            )

        # the good deploy
        old_alive_before = any(alive(p) for p in old_procs)
        manager.marker.unlink()
        recovered_ok = False
        try:
            good = deploys.enter_context(manager.deploy())
        except RuntimeError as exc:
            recovered = f"no: {exc}"
        else:
            answered = follow(manager, good, load, known_pids(manager, load), RESTART_TIMEOUT)
            good.wait(RESTART_TIMEOUT)
            status = f"exit {good.returncode}" if good.is_command else "a signal"
            if answered is None:
                recovered = f"no ({status}; new workers did not answer within {RESTART_TIMEOUT:.0f} s)"
            else:
                recovered_ok = True
                recovered = f"yes, new workers answer after {answered - good.started:.2f} s ({status})"
        deadline = time.monotonic() + OLD_WORKERS_GRACE
        while any(alive(p) for p in old_procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [p.pid for p in old_procs if alive(p)]
        if survivors:
            old_ended = f"no: {len(survivors)} old worker(s) still running {OLD_WORKERS_GRACE:.0f} s later"
        elif old_alive_before:
            old_ended = "yes"
        else:
            old_ended = "yes (already gone before it)"
        time.sleep(1.0)
        result = load.stop()
        errors = upstream_errors(server)
        notes += incident_notes(manager)
    responses = Responses.of(result)
    if errors:
        notes.append(f"nginx upstream [error] lines: {len(errors):,}: {error_kinds(errors)}")
    if result.failures:
        notes.append(f"failed requests: {len(result.failures):,}: {failure_kinds(result)}")
    return BadDeployReport(
        variant,
        window,
        responses.seconds_without_2xx(bad_started, end),
        command,
        reported,
        bad.seconds if bad.is_command else None,
        served_end > served_half,
        recovered,
        recovered_ok,
        old_ended,
        not survivors,
        result.total,
        len(result.failures),
        notes,
    )


def print_bad_deploy(r: BadDeployReport) -> None:
    print(f"bad deploy (the new version raises at import), watched {r.window:.0f} s under load:")
    print(f"  {r.without_2xx} of {r.window:.0f} s without a 2xx answer; {r.requests:,} requests, {r.failed:,} failed")
    print(f"  command: {r.command}; reported the failure: {yes_no(r.reported_failure)}")
    print(f"  old version kept serving: {yes_no(r.old_kept_serving)}")
    print(f"  next good deploy recovers: {r.recovered}; old workers ended: {r.old_ended}")
    for note in r.notes:
        print(f"  ! {note}")


def yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


# -- the comparison -----------------------------------------------------------------------


def tables(restarts: list[RestartReport], bad: list[BadDeployReport], seconds: float) -> None:
    if restarts:
        n = len(restarts[0].restarts)
        print(f"\n### {n} restarts in {seconds:.0f} s under load (16 keep-alive clients, 1/4 POSTs)\n")
        print(
            "| manager | nginx upstream | requests | failed GET | failed POST | nginx upstream errors "
            "| p99 steady | p99 during restarts | ratio | max during restarts "
            "| new workers answer (p50 / max) | command (p50 / max) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in restarts:
            command = spread(r.command_times) if r.command_times else "n/a (signal)"
            print(
                f"| {r.variant.manager} | {r.variant.label} | {r.requests:,} | {r.failed_get:,} | {r.failed_post:,} "
                f"| {len(r.upstream_errors):,} | {ms(r.p99_steady)} | {ms(r.p99_during)} | {r.ratio:.1f}x "
                f"| {ms(r.max_during)} "
                f"| {spread(r.answer_times)} | {command} |"
            )
    if bad:
        print(f"\n### A bad deploy under load (watched {bad[0].window:.0f} s), then a good one\n")
        print(
            "| manager | nginx upstream | s without 2xx | command reported the failure | old version kept serving "
            "| next deploy recovers | old workers ended |"
        )
        print("|---|---|---|---|---|---|---|")
        for b in bad:
            reported = (
                "n/a, reports nothing"
                if b.reported_failure is None
                else f"{yes_no(b.reported_failure)} ({b.command.split(':')[0]})"
            )
            print(
                f"| {b.variant.manager} | {b.variant.label} | {b.without_2xx} of {b.window:.0f} | {reported} "
                f"| {yes_no(b.old_kept_serving)} | {b.recovered} | {b.old_ended} |"
            )


def verdicts(restarts: list[RestartReport], bad: list[BadDeployReport], cold_start: float) -> bool:
    ok = True
    target = STARTUP + LINGER
    print()
    for r in restarts:
        if r.variant.manager != "sockherd":
            continue
        name = r.variant.title
        ok &= verdict(
            f"{name}: 0 failed GETs and POSTs",
            r.failed_get + r.failed_post == 0,
            f"{r.failed_get} GET, {r.failed_post} POST",
        )
        ok &= verdict(
            f"{name}: no upstream resets (no nginx upstream [error] line)",
            not r.upstream_errors,
            f"{len(r.upstream_errors)} lines" + (f": {error_kinds(r.upstream_errors)}" if r.upstream_errors else ""),
        )
        ok &= verdict(
            f"{name}: p99 during restarts <= 1.5x steady",
            r.ratio <= 1.5,
            f"{ms(r.p99_during)} vs {ms(r.p99_steady)}: {r.ratio:.2f}x",
        )
        answers = r.answer_times
        worst = max(answers, default=float("inf"))
        ok &= verdict(
            f"{name}: every restart's new workers answer within start-up + linger ({target:.2f} s)",
            len(answers) == len(r.restarts) and worst <= target,
            f"max {worst:.2f} s, p50 {statistics.median(answers) if answers else float('nan'):.2f} s "
            f"(of which the CLI's start-up ~{r.cli or 0:.2f} s and one worker's cold start ~{cold_start:.2f} s)",
        )
        commands = r.command_times
        worst_cmd = max(commands, default=float("inf"))
        ok &= verdict(
            f"{name}: every whole `sockherd restart` command (interpreter start to old workers retired) "
            f"within {target:.2f} s",
            worst_cmd <= target,
            f"max {worst_cmd:.2f} s, p50 {statistics.median(commands) if commands else float('nan'):.2f} s",
        )
    for b in bad:
        if b.variant.manager != "sockherd":
            continue
        name = b.variant.title
        seconds = b.command_seconds if b.command_seconds is not None else float("inf")
        ok &= verdict(
            f"{name}: a bad deploy's command fails within online_timeout ({ONLINE_TIMEOUT:.0f} s)",
            bool(b.reported_failure) and seconds <= ONLINE_TIMEOUT,
            b.command,
        )
        ok &= verdict(f"{name}: 0 s without a 2xx during a bad deploy", b.without_2xx == 0, f"{b.without_2xx} s")
        ok &= verdict(
            f"{name}: the next good deploy recovers and ends the old workers",
            b.recovered_ok and b.old_ended_ok,
            f"{b.recovered}; old workers ended: {b.old_ended}",
        )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="restart phase length (default 30)")
    parser.add_argument("--restarts", type=int, default=10, help="restarts in that time (default 10)")
    parser.add_argument("--bad-seconds", type=float, default=15.0, help="bad deploy watched this long; 0 skips it")
    parser.add_argument("--only", default="", help="comma-separated managers: sockherd,gunicorn,supervisor")
    parser.add_argument("--no-upstream-keepalive", action="store_true", help="no keepalive in nginx's upstream")
    args = parser.parse_args()
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    if unknown := only - set(MANAGERS):
        parser.error(f"unknown manager(s): {', '.join(sorted(unknown))}; choose from {', '.join(MANAGERS)}")
    variants = [v for v in VARIANTS if not only or v.manager in only]
    keepalive = not args.no_upstream_keepalive

    print(
        f"2 workers of benchmarks/apps/slow_start.py ({STARTUP} s start-up) behind nginx "
        f"(upstream keep-alive {'32' if keepalive else 'off'}), {CLIENTS} keep-alive clients, 1 in {POST_EVERY} a POST"
    )
    cold_start = cold_start_seconds()
    print(f"one worker's cold start without a manager (exec + imports + {STARTUP} s): {cold_start:.2f} s")
    restarts: list[RestartReport] = []
    bad: list[BadDeployReport] = []
    errors: list[str] = []
    for variant in variants:
        print(f"\n== {variant.title} ==")
        print(f"deploy: {MANAGERS[variant.manager].how}")
        try:
            report = run_restarts(variant, args.seconds, args.restarts, keepalive)
        except Exception as exc:  # one broken run must not lose the others' figures
            errors.append(f"{variant.title}: restarts: {type(exc).__name__}: {exc}")
            print(f"ERROR {errors[-1]}")
        else:
            restarts.append(report)
            print_restarts(report, args.seconds)
        if args.bad_seconds > 0:
            try:
                bad_report = run_bad_deploy(variant, args.bad_seconds, keepalive)
            except Exception as exc:
                errors.append(f"{variant.title}: bad deploy: {type(exc).__name__}: {exc}")
                print(f"ERROR {errors[-1]}")
            else:
                bad.append(bad_report)
                print_bad_deploy(bad_report)
    tables(restarts, bad, args.seconds)
    ok = verdicts(restarts, bad, cold_start)
    for error in errors:
        if error.startswith(Sockherd.name):
            ok &= verdict("the sockherd run completed", False, error)
        else:
            print(f"ERROR (a peer's run, no target): {error}")
    if not any(v.manager == Sockherd.name for v in variants):
        print("(sockherd not run: no targets checked)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
