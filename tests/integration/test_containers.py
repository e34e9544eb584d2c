"""examples/docker: the image's command, config and probes, run for real without docker.

There is no docker daemon on the test machines (`docker info` cannot connect), so the
image is not built here. What the image would do is: the Dockerfile's COPY lines are
carried out into a directory standing in for /app, its CMD is run (with PATH finding
this checkout's sockherd and python, and the listener moved to a free local port), and
the Deployment's probe commands are run against it as the kubelet would.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockherd.cli import build_parser
from sockherd.config import load_config
from support.daemon import REPO, end_daemon, wait_for
from support.nginx import free_port

DOCKER = REPO / "examples" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DEPLOYMENT = DOCKER / "deployment.yaml"
IMAGE_CONFIG = "/app/sockherd.toml"


def dockerfile_cmd() -> list[str]:
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    argv = json.loads(line.removeprefix("CMD "))  # exec form: sockherd is PID 1, no shell
    assert isinstance(argv, list)
    return [str(arg) for arg in argv]


def dockerfile_copies_to_app() -> list[Path]:
    copies = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and line.rstrip().endswith(" /app/"):
            copies += [REPO / source for source in line.split()[1:-1]]
    return copies


def probe_command(probe: str) -> list[str]:
    """The exec command of a probe in deployment.yaml (flow-style lists; no YAML parser here)."""
    text = DEPLOYMENT.read_text()
    match = re.search(rf"{probe}:\n(?:\s+#.*\n)*\s+exec:\n\s+command: (\[.*\])", text)
    assert match, f"no exec command for {probe}"
    command = json.loads(match[1])
    assert isinstance(command, list)
    return [str(arg) for arg in command]


def deployment_number(key: str) -> int:
    match = re.search(rf"^\s+{key}: (\d+)$", DEPLOYMENT.read_text(), re.MULTILINE)
    assert match, key
    return int(match[1])


def test_the_images_command_is_a_daemon_command_the_cli_accepts() -> None:
    argv = dockerfile_cmd()
    assert argv[0] == "sockherd"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.log_format, str(args.config)) == ("daemon", "json", IMAGE_CONFIG)
    assert all(path.is_file() for path in dockerfile_copies_to_app())
    assert {path.name for path in dockerfile_copies_to_app()} >= {"hello.py", "sockherd.toml"}
    for probe in ("readinessProbe", "livenessProbe"):
        command = probe_command(probe)
        assert command[0] == "sockherd" and build_parser().parse_args(command[1:]).config == Path(IMAGE_CONFIG)


def test_the_grace_period_covers_pre_stop_and_the_shutdown_ladder() -> None:
    timeouts = load_config(DOCKER / "sockherd.toml").timeouts
    pre_stop = probe_command("preStop")
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + timeouts.linger + timeouts.shutdown + timeouts.kill
    assert deployment_number("terminationGracePeriodSeconds") >= needed + 1


def test_the_docs_show_the_example_files_as_they_are() -> None:
    docs = (REPO / "docs" / "containers.md").read_text()
    for name in ("Dockerfile", "deployment.yaml", "sockherd.toml"):
        assert (DOCKER / name).read_text().strip() in docs, f"docs/containers.md shows another {name}"


class Image:
    """examples/docker's image as a directory: /app and the command the container runs."""

    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.app = root / "app"
        self.app.mkdir()
        for source in dockerfile_copies_to_app():
            shutil.copy(source, self.app)
        self.port = free_port()
        # The one change from the image: a local port and tmp_dir, by `extends`.
        self.config = self.app / "local.toml"
        self.config.write_text(
            f'extends = "sockherd.toml"\ntmp_dir = "{tmp_dir}"\nlisten = ["tcp://127.0.0.1:{self.port}"]\n'
        )
        self.env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}

    def localise(self, argv: list[str]) -> list[str]:
        return [str(self.config) if arg == IMAGE_CONFIG else arg for arg in argv]

    def probe(self, probe: str) -> subprocess.CompletedProcess[str]:
        argv = self.localise(probe_command(probe))
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30, check=False)

    def sockherd(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["sockherd", *args, "-c", str(self.config)]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=False)

    def served(self) -> int:
        """Requests the app has begun to handle, over every worker (hello's `stats` request)."""
        stats = self.sockherd("send-req", "stats")
        assert stats.returncode == 0, stats.stderr
        return sum(int(n) for n in re.findall(r'"served": (\d+)', stats.stdout))

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:
            body: bytes = response.read()
            return body.decode()


@pytest.fixture
def image(tmp_path: Path, tmp_dir: Path) -> Image:
    tmp_dir.rmdir()  # the daemon creates it, as in the container
    return Image(tmp_path, tmp_dir)


@pytest.fixture
def container(image: Image, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    with (tmp_path / "container.log").open("w") as log:
        proc = subprocess.Popen(
            image.localise(dockerfile_cmd()),
            cwd=image.app,
            env=image.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    yield proc
    end_daemon(proc, image.tmp_dir / "sockherd.ipc")  # the test may have failed before its SIGTERM


def test_the_image_serves_answers_its_probes_and_drains_on_sigterm(
    image: Image, container: subprocess.Popen[str], tmp_path: Path
) -> None:
    ready = wait_for(lambda: image.probe("readinessProbe").returncode == 0 or None, 30, "the readiness probe")
    assert ready
    assert image.probe("readinessProbe").stdout.strip() == "healthy"
    assert image.get("/").startswith("hello from worker")
    assert image.probe("livenessProbe").returncode == 0

    # `sockherd stop` inside the pod: not ready (out of the Service), still alive.
    stop = image.sockherd("stop")
    assert stop.returncode == 0, stop.stderr
    unready = image.probe("readinessProbe")
    assert unready.returncode == 1 and unready.stdout.startswith("unhealthy: the daemon is stopped;")
    assert image.probe("livenessProbe").returncode == 0
    start = image.sockherd("start")
    assert start.returncode == 0, start.stderr
    assert image.probe("readinessProbe").returncode == 0

    # The kubelet's SIGTERM (after preStop): a request in flight is answered, then PID 1 exits 0.
    before = image.served()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(image.get, "/slow?ms=1500")
        wait_for(lambda: image.served() == before + 1, 10, "the slow request to reach the app")
        sent = time.monotonic()
        container.send_signal(signal.SIGTERM)
        assert slow.result(30).startswith("slept 1500 ms")
    assert container.wait(30) == 0
    took = time.monotonic() - sent
    timeouts = load_config(image.config).timeouts
    assert took < timeouts.shutdown + timeouts.kill
    gone = image.probe("livenessProbe")
    assert gone.returncode == 3, gone.stderr
    log = (tmp_path / "container.log").read_text()
    assert '"event": "exited"' in log and "SIGTERM: graceful quit" in log
