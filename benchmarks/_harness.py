"""Shared pieces of the benchmarks: real daemons, real nginx, real load (from tests/support)."""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.daemon import RunningDaemon, running_daemon  # noqa: E402
from support.nginx import Nginx  # noqa: E402

# Access logs off: they would flow through the daemon's stdout into this process,
# where reading them competes with the load generator for the GIL.
APP = {
    "command": [sys.executable, "-m", "sockherd.uvicorn", "asgi_app:app", "--log-level", "warning"],
    "cwd": str(REPO / "tests" / "apps"),
}


@contextlib.contextmanager
def daemon(settings: dict[str, Any], *args: str) -> Iterator[RunningDaemon]:
    with (
        tempfile.TemporaryDirectory(prefix="sh-bench-") as workdir,
        running_daemon(Path(workdir), settings, *args) as running,
    ):
        yield running


@contextlib.contextmanager
def nginx(
    sockets: Sequence[Path | str], *, keepalive: bool, max_fails: int | None = 0, extra: str = ""
) -> Iterator[Nginx]:
    with tempfile.TemporaryDirectory(prefix="sh-nginx-") as workdir:
        server = Nginx(Path(workdir), sockets, keepalive=keepalive, max_fails=max_fails)
        try:
            yield server
        finally:
            server.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def distribution_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"n={len(ms)} min={min(ms):.2f} p50={statistics.median(ms):.2f} p95={percentile(ms, 95):.2f} "
        f"p99={percentile(ms, 99):.2f} max={max(ms):.2f} ms"
    )


def verdict(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return ok
