"""Every command transcript in the docs is what the product really prints.

Each ```console block with output has a scenario here, keyed by its doc and the
``<!-- transcript: NAME -->`` marker above it: the scenario puts a real daemon running
a copy of examples/hello into the state the transcript starts from (a crash loop, a
broken worker, a dead daemon: produced for real, never faked), runs the block's
commands one by one through ``bash -c`` as a reader would (in the copy, with the venv's
``sockherd`` first on PATH; see :class:`support.transcripts.Shell`), and compares each
command's output with the doc by the rules of :func:`support.transcripts.match`.
Flags after the marker's name: ``unordered`` compares a daemon's log line by line in
any order; ``racy`` lets a block whose output depends on a race between two failing
workers match in one of ``RACY_RUNS`` runs. Blocks without output are usage examples:
for them, as for every block, each ``sockherd …`` command line must parse.

Scenarios that continue from a plainly running example share one daemon (``shared``)
and first :meth:`Hello.reset` it to the configuration they need; the others start
their own.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from sockherd.cli import build_parser
from sockherd.client import Client, DaemonUnreachable
from support.daemon import EXAMPLE, REPO, RunningDaemon, bump, installable_copy, short_tmp_dir, wait_for, write_config
from support.http import unix_get
from support.lines import Worker
from support.transcripts import Block, Shell, check_block, parse_blocks, sockherd_invocations

BLOCKS = [block for doc in sorted((REPO / "docs").glob("*.md")) for block in parse_blocks(doc)]
HELLO = ["python", "-m", "sockherd.uvicorn", "hello:app"]
LOG = "log/app.log"  # worker output in a file: failed starts then show its last lines
IMPORT_ERROR = "import nonexistent_module\n"  # a bad release

RACY_RUNS = 4  # a `racy` block must match in one of this many runs

Outputs = list[list[str]]
Ran = tuple[Outputs, Mapping[str, str]]  # each command's output, and real → doc paths


def shell_env(home: Path) -> dict[str, str]:
    """A reader's terminal: the venv's sockherd and python first on PATH, no sockherd contract inherited.

    Output goes to a pipe, not a terminal: Python is told not to buffer it, so that
    stdout and stderr interleave as on a terminal, and curl not to draw its progress
    meter (it does only when its output is not a terminal; errors it still shows):
    ``home`` has the .curlrc that says so.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKHERD_") and k != "NOTIFY_SOCKET"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    env["PYTHONUNBUFFERED"] = "1"
    env["LC_ALL"] = "C.UTF-8"
    env["CURL_HOME"] = str(home)
    (home / ".curlrc").write_text("--silent\n--show-error\n")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Hello:
    """examples/hello copied under a short private root, and the doc's names for its paths.

    The docs show the copy as /tmp/doc/hello (the root as /tmp/doc), its tmp_dir as
    ``tmp_doc`` and its dev server as port 8000.
    """

    def __init__(
        self,
        stack: contextlib.ExitStack,
        *,
        tmp_doc: str = "/tmp/sockherd-hello",
        at: str = "hello",
        example: Path = EXAMPLE,
    ) -> None:
        self.stack = stack
        self.root = short_tmp_dir()
        stack.callback(shutil.rmtree, self.root, ignore_errors=True)
        stack.callback(self.kill_leftovers)
        self.app = self.root / at
        shutil.copytree(example, self.app, ignore=shutil.ignore_patterns("__pycache__"))
        (self.app / "log").mkdir()
        self.code = (EXAMPLE / "hello.py").read_text()
        self.tmp_dir = self.root / "t"  # not created: the daemon does it
        self.port = free_port()
        self.paths = {
            str(self.tmp_dir): tmp_doc,
            str(self.root): "/tmp/doc",
            f"localhost:{self.port}": "localhost:8000",
        }
        self.daemon: RunningDaemon | None = None

    def kill_leftovers(self) -> None:
        """Every process still running for a daemon of this sandbox (one a block started, say)."""
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("SOCKHERD_IPC", "").startswith(str(self.root)):
                    proc.kill()

    @property
    def ipc(self) -> Path:
        return self.tmp_dir / "sockherd.ipc"

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {"command": HELLO, "tmp_dir": str(self.tmp_dir), "workers": 2, "dev_server": self.port, **extra}

    def configure(self, **extra: Any) -> None:
        write_config(self.app / "sockherd.toml", self.settings(**extra))

    def start(self, *args: str, env: Mapping[str, str] | None = None, **extra: Any) -> RunningDaemon:
        daemon = RunningDaemon(
            self.app, self.settings(**extra), list(args), env={**shell_env(self.root), **(env or {})}
        )
        self.stack.callback(daemon.stop)
        self.daemon = daemon
        return daemon

    def break_code(self, line: str = IMPORT_ERROR) -> None:
        """A release whose hello.py fails (at import, by default): what the next workers load."""
        (self.app / "hello.py").write_text(self.code.replace("\nfrom sockherd import worker\n", "\n" + line, 1))

    def restore_code(self) -> None:
        (self.app / "hello.py").write_text(self.code)

    def shell(self, cwd: Path | None = None) -> Shell:
        return Shell(cwd or self.app, shell_env(self.root), self.paths)

    def run(
        self,
        block: Block,
        before: Mapping[int, Callable[[], object]] | None = None,
        after: Callable[[], object] | None = None,
        cwd: Path | None = None,
    ) -> Ran:
        return self.shell(cwd).run(block, before, after), self.paths

    def reset(self, **extra: Any) -> RunningDaemon:
        """The example running with ``extra`` in its config: every slot online, standbys ready, nothing suspended."""
        self.restore_code()
        daemon = self.daemon
        state = None
        if daemon is not None:
            try:
                state = daemon.status()["daemon"]["state"]
            except (DaemonUnreachable, OSError):  # terminated
                daemon.proc.wait(30)
        if daemon is None or state is None:
            daemon = self.start(**extra)
        else:
            self.configure(**extra)
            assert daemon.cli("start" if state == "stopped" else "reload").returncode == 0
            if not healthy(daemon):  # suspended, or a slot in a crash loop
                assert daemon.cli("restart").returncode == 0
        wait_for(lambda: healthy(daemon), 20, "the example to run as configured")
        return daemon


def healthy(daemon: RunningDaemon) -> bool:
    """Every slot online, every standby ready, nothing suspended or in progress."""
    try:
        status = daemon.status()
    except (DaemonUnreachable, OSError):
        return False
    d = status["daemon"]
    online = [w for w in status["workers"] if w["published"] and w["state"] == "online"]
    ready = [w for w in status["workers"] if w["index"] is None and w["state"] == "suspended"]
    return (
        d["state"] == "running"
        and not d["suspended"]
        and d["operation"] is None
        and len(online) == len(status["workers"]) - len(ready) == d["workers"]
        and len(ready) == d["standby"]
    )


@dataclass
class Context:
    """What a scenario gets: its own sandboxes (cleaned up after the test) and the shared one."""

    stack: contextlib.ExitStack
    request: pytest.FixtureRequest

    def hello(self, **kwargs: Any) -> Hello:
        return Hello(self.stack, **kwargs)

    def shared(self) -> Hello:
        hello: Hello = self.request.getfixturevalue("shared")
        return hello


Scenario = Callable[[Block, Context], Ran]
SCENARIOS: dict[tuple[str, str], Scenario] = {}


def scenario(doc: str, marker: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[(doc, marker)] = fn
        return fn

    return register


@pytest.fixture(scope="module")
def shared() -> Iterator[Hello]:
    with contextlib.ExitStack() as stack:
        yield Hello(stack)


@pytest.fixture
def context(request: pytest.FixtureRequest) -> Iterator[Context]:
    with contextlib.ExitStack() as stack:
        yield Context(stack, request)


def block_id(block: Block) -> str:
    return f"{block.path.name}:{block.marker or block.line}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.has_output], ids=block_id)
def test_transcript(block: Block, context: Context) -> None:
    assert block.marker, f"{block.where}: add a <!-- transcript: NAME --> line above the block, and a scenario here"
    run = SCENARIOS.get((block.path.name, block.marker))
    assert run is not None, f"{block.where}: no scenario for this block in {Path(__file__).name}"
    runs = RACY_RUNS if block.racy else 1
    reports = []
    for _ in range(runs):
        report = check_block(block, *run(block, context))
        if report is None:
            return
        reports.append(report)
    pytest.fail("\n".join(reports), pytrace=False)


def test_every_scenario_has_its_block() -> None:
    blocks = {(b.path.name, b.marker) for b in BLOCKS if b.has_output}
    assert set(SCENARIOS) <= blocks, f"scenarios without a block in the docs: {sorted(set(SCENARIOS) - blocks)}"


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_sockherd_command_lines_parse(block: Block) -> None:
    for command in block.commands:
        for argv in sockherd_invocations(command.text):
            usage = io.StringIO()
            with contextlib.redirect_stderr(usage), contextlib.suppress(SystemExit):
                build_parser().parse_args(argv)
            assert not usage.getvalue(), f"{block.where}: `{command.text}` (line {command.line}):\n{usage.getvalue()}"


# --- helpers for the scenarios -------------------------------------------------------


def published(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {w["index"]: w for w in status["workers"] if w["published"]}


def wait_daemon(ipc: Path, workers: int) -> None:
    """Until a daemon answers on ``ipc`` with ``workers`` published and nothing in progress."""

    def ready() -> bool:
        try:
            with Client(ipc, timeout=10) as client:
                status = client.call("status")
        except (DaemonUnreachable, OSError):
            return False
        return len(published(status)) == workers and status["daemon"]["operation"] is None

    wait_for(ready, 20, f"a daemon on {ipc} with {workers} workers")


def held_by_dev_server(daemon: RunningDaemon, port: int) -> bool:
    """The dev server holds a client connection open (a request waiting for a worker's answer)."""
    connections = psutil.Process(daemon.proc.pid).net_connections(kind="tcp")
    return any(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in connections)


# --- cli.md ----------------------------------------------------------------------------


@scenario("cli.md", "daemon-log")
def cli_daemon_log(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello(at="examples/hello")
    hello.configure()
    command = block.commands[0]
    proc = subprocess.Popen(
        ["bash", "-c", command.text],
        cwd=hello.root,
        env=shell_env(hello.root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log = Worker(proc, "")
    reader = threading.Thread(target=log.collect, daemon=True)
    reader.start()
    try:
        log.wait_line(" is serving")
        log.wait_line("serving on", count=2)
        with Client(hello.ipc) as client:
            client.call("terminate")
        proc.wait(20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(5)
        assert proc.stdout is not None
        proc.stdout.close()
    return [log.lines], hello.paths


@scenario("cli.md", "status")
def cli_status(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset(standby=1)
    return hello.run(block)


@scenario("cli.md", "status-dead-daemon")
def cli_status_dead_daemon(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    daemon = hello.start()
    daemon.wait_ready(2)
    daemon.proc.kill()  # the workers keep running
    daemon.proc.wait()
    return hello.run(block)


@scenario("cli.md", "config")
def cli_config(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset()
    return hello.run(block)


@scenario("cli.md", "start-after-fix")
def cli_start_after_fix(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    daemon = hello.start(command=["python", "-m", "sockherd.uvicorn", "helo:app"])  # a typo: the first start fails
    daemon.wait_log(r"fix the app, then run `sockherd start`")
    hello.configure()  # fixed
    return hello.run(block)


@scenario("cli.md", "start-stop-start")
def cli_start_stop_start(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    assert hello.reset(standby=1).cli("stop").returncode == 0
    return hello.run(block)


@scenario("cli.md", "restart-upgrade")
def cli_restart_upgrade(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    site = installable_copy(hello.root / "site", "0.1.0")  # what `pip install sockherd==0.1.0` leaves
    daemon = hello.start(env={"PYTHONPATH": str(site)}, standby=1)
    wait_for(lambda: healthy(daemon), 20, "the example to run")
    return hello.run(block, before={0: lambda: bump(site, "0.2.0")})  # `pip install -U sockherd`


@scenario("cli.md", "restart-suspended")
def cli_restart_suspended(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset(standby=1)
    return hello.run(block)


@scenario("cli.md", "restart")
@scenario("concepts.md", "restart")
def restart(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset()
    return hello.run(block)


@scenario("cli.md", "restart-fails-twice")
def cli_restart_fails_twice(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset(stdout=LOG, stderr=LOG)
    hello.break_code()
    return hello.run(block)


@scenario("cli.md", "resume")
def cli_resume(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    assert hello.reset().cli("restart", "--suspended").returncode == 0
    return hello.run(block)


@scenario("cli.md", "set-workers")
@scenario("cli.md", "set-standby")
@scenario("cli.md", "stop")
@scenario("cli.md", "terminate")
@scenario("index.md", "quick-start")
@scenario("index.md", "suspended-deploy")
def from_the_example_running(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset()
    return hello.run(block)


@scenario("cli.md", "send-msg")
def cli_send_msg(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()  # its own: the greeting the message sets would stay in the shared one
    hello.start().wait_ready(2)
    return hello.run(block)


@scenario("cli.md", "send-req")
def cli_send_req(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset()
    return hello.run(block)


@scenario("cli.md", "reload")
def cli_reload(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset()
    return hello.run(
        block,
        before={
            0: lambda: hello.configure(linger=0.5),
            1: lambda: hello.configure(linger=0.5, environment={"RELEASE": "2"}),
        },
    )


@scenario("cli.md", "reload-invalid-toml")
@scenario("deployment.md", "reload-invalid-toml")
def reload_invalid_toml(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset()
    config = hello.app / "sockherd.toml"
    config.write_text(config.read_text() + "workers = 3\n")  # a key given twice
    return hello.run(block)


@scenario("cli.md", "reload-stopped")
def cli_reload_stopped(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    assert hello.reset().cli("stop").returncode == 0
    hello.configure(command=[*HELLO[:-1], "--log-level", "warning", HELLO[-1]], workers=3)
    return hello.run(block)


@scenario("cli.md", "init")
def cli_init(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    return hello.run(block, cwd=hello.root)


# --- concepts.md -----------------------------------------------------------------------


@scenario("concepts.md", "ls-tmp-dir")
def concepts_ls_tmp_dir(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    hello.start(socket_group="www-data").wait_ready(2)  # the daemon creates tmp_dir
    return hello.run(block)


@scenario("concepts.md", "restart-fails")
def concepts_restart_fails(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset(stdout=LOG, stderr=LOG)
    hello.break_code()
    return hello.run(block)


@scenario("concepts.md", "rolling-restart")
def concepts_rolling_restart(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    hello.start(workers=3, strategy="rolling").wait_ready(3)
    return hello.run(block)


@scenario("concepts.md", "rolling-restart-rolls-back")
def concepts_rolling_restart_rolls_back(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    hello.start(workers=3, strategy="rolling", stdout=LOG, stderr=LOG).wait_ready(3)
    # A release that cannot start in slot 2 (say, a resource only two workers get).
    hello.break_code('if os.environ["SOCKHERD_INDEX"] == "2":\n    raise SystemExit(1)\nfrom sockherd import worker\n')
    return hello.run(block)


@scenario("concepts.md", "suspended-deploy")
def concepts_suspended_deploy(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    daemon = hello.reset(standby=1)
    held = lambda: wait_for(lambda: held_by_dev_server(daemon, hello.port), 10, "curl's request to be held")  # noqa: E731
    return hello.run(block, before={3: held})


@scenario("concepts.md", "standby-promoted")
def concepts_standby_promoted(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    daemon = hello.reset(standby=1)
    status = daemon.status()
    standby = next(w for w in status["workers"] if w["index"] is None)
    os.kill(published(status)[0]["pid"], signal.SIGKILL)
    wait_for(lambda: published(daemon.status())[0]["pid"] == standby["pid"], 10, "the standby to take slot 0")
    wait_for(lambda: healthy(daemon), 10, "a new standby")
    return hello.run(block)


@scenario("concepts.md", "crash-loop")
def concepts_crash_loop(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    daemon = hello.reset()
    hello.break_code()  # every replacement now dies at start-up
    os.kill(published(daemon.status())[0]["pid"], signal.SIGKILL)

    def backing_off() -> bool:
        slot = daemon.status()["slots"][0]
        return bool(slot["next_attempt_at"]) and slot["next_attempt_at"] - time.time() > 1.0

    wait_for(backing_off, 20, "slot 0 to back off for more than a second")
    return hello.run(block)


POOL = '''\
"""hello, with a database pool that can wedge: GET /wedge, and the worker reports itself broken."""

from sockherd import worker

from hello import app as hello


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/wedge":
        worker.report_broken("database pool exhausted")
    await hello(scope, receive, send)
'''


@scenario("concepts.md", "broken-worker")
def concepts_broken_worker(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    (hello.app / "pool.py").write_text(POOL)
    command = ["python", "-m", "sockherd.uvicorn", "--log-level", "warning", "pool:app"]
    daemon = hello.start(command=command, linger=5)  # the status below is taken during the linger
    status = daemon.wait_ready(2)
    broken = next(w for w in status["workers"] if w["index"] == 0)
    mark = daemon.mark()
    unix_get(str(hello.tmp_dir / "app.0.sock"), "/wedge")
    daemon.wait_log(r"reports itself broken", start=mark)
    # The linger lasts while the old socket's queue is not empty: freeze the broken worker
    # and leave one connection waiting in its queue, as nginx's last connect would.
    os.kill(broken["pid"], signal.SIGSTOP)
    waiting = socket.socket(socket.AF_UNIX)
    try:
        waiting.connect(broken["socket"])
        daemon.wait_log(r"published worker #0 .* as app\.0\.sock", start=mark)
        return hello.run(block)
    finally:
        os.kill(broken["pid"], signal.SIGCONT)
        waiting.close()


@scenario("concepts.md", "scaling")
def concepts_scaling(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    daemon = hello.reset()

    def sigttou() -> None:
        daemon.proc.send_signal(signal.SIGTTOU)
        wait_for(lambda: len(published(daemon.status())) == 1, 10, "SIGTTOU to take a worker away")
        wait_for(lambda: daemon.status()["daemon"]["operation"] is None, 10, "the scale-down to end")

    return hello.run(block, before={3: sigttou})


# --- deploying.md ----------------------------------------------------------------------


@scenario("deploying.md", "keep-previous")
def deploying_keep_previous(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()  # its own: a kept generation would outlive the scenario in the shared one
    hello.start().wait_ready(2)
    return hello.run(block)


@scenario("deploying.md", "canary")
def deploying_canary(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    hello.start(workers=4).wait_ready(4)
    return hello.run(block)


# --- deployment.md ---------------------------------------------------------------------


@scenario("deployment.md", "release-directories")
def deployment_release_directories(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello(at="rel/releases/r1")
    settings = hello.settings()
    del settings["dev_server"]
    write_config(hello.app / "sockherd.toml", settings)
    current = hello.root / "rel" / "current"
    current.symlink_to("releases/r1")

    def first_gone() -> None:
        wait_for(lambda: not hello.ipc.exists(), 20, "the first daemon to exit")

    return hello.run(
        block,
        before={1: lambda: wait_daemon(hello.ipc, 2), 3: first_gone, 4: lambda: wait_daemon(hello.ipc, 2)},
        after=lambda: _terminate(hello.ipc),
        cwd=current,
    )


def _terminate(ipc: Path) -> None:
    with contextlib.suppress(DaemonUnreachable, OSError), Client(ipc) as client:
        client.call("terminate")


@scenario("deployment.md", "reload")
def deployment_reload(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset()
    return hello.run(
        block,
        before={
            0: lambda: hello.configure(linger=0.5),
            1: lambda: hello.configure(linger=0.5, environment={"RELEASE": "2"}),
            2: lambda: hello.configure(linger=0.5, environment={"RELEASE": "2"}, standby=1),
        },
    )


@scenario("deployment.md", "reload-restart-fails")
def deployment_reload_restart_fails(block: Block, ctx: Context) -> Ran:
    hello = ctx.shared()
    hello.reset(stdout=LOG, stderr=LOG)
    nope = [*HELLO[:-1], "hello:nope"]
    return hello.run(block, before={0: lambda: hello.configure(stdout=LOG, stderr=LOG, command=nope)})


# --- integration.md --------------------------------------------------------------------

HELD = '''\
"""hello, whose held requests give up after a second: 503 with Retry-After."""

from sockherd.asgi import SuspendMiddleware

from hello import hello_app

app = SuspendMiddleware(hello_app, timeout=1)
'''


@scenario("integration.md", "suspend-timeout")
def integration_suspend_timeout(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello(tmp_doc="/tmp/sockherd-t503")
    (hello.app / "held.py").write_text(HELD)
    daemon = hello.start("--no-start", command=["python", "-m", "sockherd.uvicorn", "held:app"], workers=1)
    wait_for(hello.ipc.exists, 10, "the IPC socket")
    assert daemon.cli("start", "--suspended").returncode == 0
    return hello.run(block)


SERVER = '''\
"""A worker without the sockherd library: it binds $SOCKHERD_SOCKET and says READY=1 over sd_notify."""

import os
import socket
import socketserver
from http.server import BaseHTTPRequestHandler


def sd_notify(state: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), "\\0" + path[1:] if path.startswith("@") else path)


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from pid {os.getpid()}\\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self):
        return "-"


server = socketserver.UnixStreamServer(os.environ["SOCKHERD_SOCKET"], Hello)
sd_notify("READY=1\\nSTATUS=serving")
server.serve_forever()
'''


@scenario("integration.md", "sd-notify-status")
def integration_sd_notify_status(block: Block, ctx: Context) -> Ran:
    hello = ctx.hello()
    (hello.app / "server.py").write_text(SERVER)
    hello.start(command=["python", "server.py"], workers=1).wait_ready(1)
    return hello.run(block)


@scenario("integration.md", "node-send-req")
def integration_node_send_req(block: Block, ctx: Context) -> Ran:
    node = ctx.hello(at="node", example=REPO / "examples" / "node")
    node.start(command=["node", "server.js"]).wait_ready(2)
    return node.run(block)
