"""The framework examples (examples/fastapi, django, flask, aiohttp), each for real.

Every test copies its example into a private directory, runs it with the example's
own sockherd.toml (only ``tmp_dir`` is made private, and the dev server left off)
under a real daemon, puts a real nginx in front, and runs 16 concurrent keep-alive
clients (``GET /`` and ``POST /echo``) through restarts: no request may fail, nginx
logs no error, and ``GET /`` is answered by the framework (it names itself and its
version) from a worker of the new generation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import DaemonFactory, NginxFactory
from support.daemon import REPO, RunningDaemon, wait_for
from support.http import LoadGenerator, LoadResult, Response, tcp_get
from support.nginx import Nginx, assert_clean

pytestmark = pytest.mark.e2e

EXAMPLES = REPO / "examples"
RESTARTS = 3
BETWEEN_RESTARTS = 300  # requests the load makes between two restarts


@dataclass(frozen=True)
class Example:
    name: str
    environment: dict[str, str] = field(default_factory=dict)  # added to the example's own

    @property
    def greeting(self) -> re.Pattern[str]:
        return re.compile(rf"hello from {self.name} {re.escape(version(self.name))}\b.* \(worker (\S+), pid (\d+)\)\n")


# All behind nginx with upstream keep-alive (`keepalive 32`), the setup that catches a
# server closing pooled connections under nginx's feet: measured without the examples'
# care, plain aiohttp (`runner.cleanup()`) failed 15 of 31,336 requests over 5 restarts,
# gunicorn 26.0.0 8 of 27,000 (27.0.1 drains them: 0 of 109,044 over 20 restarts).
EXAMPLE_CASES = [
    Example("fastapi"),
    Example("django", environment={"DJANGO_ALLOWED_HOSTS": "app"}),  # nginx sends `Host: app`, the upstream's name
    Example("flask"),
    Example("aiohttp"),
]


def example_copy(name: str, where: Path) -> Path:
    """The example as a user would check it out, in a private directory."""
    copy = where / name
    shutil.copytree(EXAMPLES / name, copy, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
    return copy


def example_settings(copy: Path, environment: dict[str, str]) -> dict[str, Any]:
    """The example's sockherd.toml, as is but for a private tmp_dir (start_daemon's) and no dev server."""
    with (copy / "sockherd.toml").open("rb") as f:
        settings = tomllib.load(f)
    del settings["tmp_dir"]
    settings.pop("dev_server", None)
    settings["cwd"] = str(copy)  # the config is written elsewhere; the app runs where it was copied
    if environment:
        settings["environment"] = {**settings.get("environment", {}), **environment}
    return settings


def symlinks(daemon: RunningDaemon, count: int = 2) -> list[Path]:
    return [daemon.tmp_dir / f"app.{i}.sock" for i in range(count)]


def answering_pids(pid: int) -> set[int]:
    """Who may answer for a published worker: itself, or its children (a gunicorn master's)."""
    try:
        return {pid, *(child.pid for child in psutil.Process(pid).children())}
    except psutil.NoSuchProcess:
        return {pid}


def all_answer(load: LoadGenerator, published: set[int]) -> Callable[[], bool]:
    pids = {pid: answering_pids(pid) for pid in published}
    return lambda: all(any(load.result.pids[p] for p in pids[pid]) for pid in published)


def assert_from_the_framework(example: Example, response: Response, daemon: RunningDaemon) -> None:
    assert response.status == 200, response
    match = example.greeting.fullmatch(response.body.decode())
    assert match, response.body
    published = {w["id"]: w["pid"] for w in daemon.status()["workers"] if w["published"]}
    assert match[1] in published, (match[1], published)
    assert int(match[2]) in answering_pids(published[match[1]])


def migrate(app: Path, *args: str) -> str:
    """Run the FastAPI example's migrations; returns what it printed."""
    done = subprocess.run(
        [sys.executable, "migrate.py", *args], cwd=app, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout


def restart_under_load(example: Example, daemon: RunningDaemon, nginx: Nginx) -> LoadResult:
    with LoadGenerator(nginx.port, concurrency=16, post_every=4) as load:
        load.wait_requests(BETWEEN_RESTARTS)
        for _ in range(RESTARTS):
            before = daemon.published_pids()
            restart = daemon.cli("restart")
            assert restart.returncode == 0, restart.stderr
            after = daemon.published_pids()
            assert len(after) == 2 and not before & after, (before, after)
            wait_for(all_answer(load, after), 10, "the new workers to answer through nginx")
            assert_from_the_framework(example, tcp_get(nginx.port, "/"), daemon)
            load.wait_requests(BETWEEN_RESTARTS)
    return load.stop()


@pytest.mark.parametrize("example", EXAMPLE_CASES, ids=[e.name for e in EXAMPLE_CASES])
def test_example_restarts_behind_nginx_under_load_fail_no_request(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path, example: Example
) -> None:
    app = example_copy(example.name, tmp_path)
    if example.name == "fastapi":
        migrate(app)  # the app reads its database from the first request on
    daemon = start_daemon(example_settings(app, example.environment))
    daemon.wait_ready(2, timeout=30)
    nginx = start_nginx(symlinks(daemon), keepalive=True)
    assert_from_the_framework(example, tcp_get(nginx.port, "/"), daemon)
    result = restart_under_load(example, daemon, nginx)
    assert_clean(result, nginx)


FASTAPI_GREETING = re.compile(r"hello from fastapi \S+, revision (\d+), schema (\d+) \(worker \S+, pid (\d+)\)\n")


def timed_get(port: int) -> tuple[Response, float]:
    response = tcp_get(port, "/", timeout=30)
    return response, time.monotonic()


def test_fastapi_suspended_deploy_holds_requests_until_migrated_and_resumed(
    start_daemon: DaemonFactory, start_nginx: NginxFactory, tmp_path: Path
) -> None:
    """docs/integration.md's FastAPI deploy: `restart --suspended`, migrate, `resume`.

    Requests made while the new generation is suspended are held, and answered after
    the resume by the new code (revision 2) against the new schema (2): none fails and
    none is answered before the migration has run."""
    app = example_copy("fastapi", tmp_path)
    assert "schema 1" in migrate(app, "--to", "1")
    daemon = start_daemon(example_settings(app, {}))
    old = {w["pid"] for w in daemon.wait_ready(2, timeout=30)["workers"]}
    nginx = start_nginx(symlinks(daemon), keepalive=True)
    first = FASTAPI_GREETING.fullmatch(tcp_get(nginx.port, "/").body.decode())
    assert first and first.group(1, 2) == ("1", "1"), first

    with LoadGenerator(nginx.port, concurrency=16, post_every=4) as load, ThreadPoolExecutor(4) as pool:
        load.wait_requests(BETWEEN_RESTARTS)
        (app / "REVISION").write_text("2\n")  # the deploy puts the new code in place
        deploy = daemon.cli("restart", "--suspended")
        assert deploy.returncode == 0, deploy.stderr
        assert "suspended: run `sockherd resume` to serve" in deploy.stdout, deploy.stdout
        published = time.monotonic()
        status = daemon.status()
        new = {w["pid"] for w in status["workers"] if w["published"]}
        assert not new & old and {w["state"] for w in status["workers"]} == {"suspended"}, status["workers"]

        held = [pool.submit(timed_get, nginx.port) for _ in range(4)]
        assert "applied [2]; schema 2" in migrate(app)
        migrated = time.monotonic()
        answered_while_suspended = [start for start, _ in load.result.status_times if start >= published]
        assert answered_while_suspended == [], "a request made while suspended was answered before the resume"
        assert not any(load.result.pids[pid] for pid in new), "the new code answered before the resume"
        assert not any(f.done() for f in held)

        resume = daemon.cli("resume")
        assert resume.returncode == 0 and "resumed 2 worker(s)" in resume.stdout, (resume.stdout, resume.stderr)
        for future in held:
            response, answered = future.result(timeout=30)
            match = FASTAPI_GREETING.fullmatch(response.body.decode())
            assert response.status == 200 and match, response
            assert match.group(1, 2) == ("2", "2") and int(match[3]) in new, match.group(0)
            assert answered > migrated
        wait_for(all_answer(load, new), 10, "the new workers to answer the load")
        load.wait_requests(BETWEEN_RESTARTS)
    result = load.stop()
    assert result.failures == [], f"{len(result.failures)} failed of {result.total}: {result.failures[:10]}"
    assert set(result.pids) <= old | new
    assert nginx.errors() == [], nginx.errors()[:10]


SECTIONS = {"FastAPI": "fastapi", "Django": "django", "Flask": "flask", "aiohttp": "aiohttp"}
CODE_BLOCK = re.compile(r"^```(?:toml|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def code_lines(text: str) -> set[str]:
    """Non-blank lines without indentation or a trailing comment; whole-line comments dropped."""
    lines = (line.split("  #")[0].strip() for line in text.splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def test_the_docs_show_the_examples_as_they_are() -> None:
    """Every config and code line docs/integration.md shows for an example is in its files."""
    doc = (REPO / "docs" / "integration.md").read_text()
    sections = doc.split("\n## Framework examples\n", 1)[1].split("\n### ")[1:]
    assert [s.split(None, 1)[0].rstrip(":") for s in sections] == list(SECTIONS)
    for section in sections:
        name = SECTIONS[section.split(None, 1)[0].rstrip(":")]
        files = [p for p in (EXAMPLES / name).rglob("*") if p.suffix in (".py", ".toml")]
        source = set().union(*(code_lines(p.read_text()) for p in files))
        shown = set().union(*(code_lines(block) for block in CODE_BLOCK.findall(section)))
        assert shown, name
        assert shown <= source, f"docs/integration.md shows lines that examples/{name} does not have: {shown - source}"
