"""The Node.js worker of docs/integration.md (examples/node/server.js), for real.

Node comes from Debian's packages (scripts/test installs it), so this never skips in CI.
"""

from __future__ import annotations

import json
import re
import shutil

from conftest import DaemonFactory
from support.daemon import REPO, wait_for
from support.http import unix_get

NODE_DIR = REPO / "examples" / "node"


def test_the_docs_show_the_tested_file() -> None:
    text = (REPO / "docs" / "integration.md").read_text()
    blocks = re.findall(r"```js\n(.*?)```", text, re.S)
    assert (NODE_DIR / "server.js").read_text() in blocks


def test_a_node_worker_serves_restarts_and_answers_requests(start_daemon: DaemonFactory) -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    assert node is not None, "node is missing: scripts/test installs it (apt-get install nodejs)"
    daemon = start_daemon({"command": [node, "server.js"], "cwd": str(NODE_DIR), "workers": 2})
    status = daemon.wait_ready(2)
    wait_for(lambda: all(w["integrated"] for w in daemon.status()["workers"]), 10, "the node workers' hello")
    response = unix_get(str(daemon.tmp_dir / "app.0.sock"))
    assert response.status == 200 and b"hello from node worker 0-" in response.body

    result = daemon.cli("send-req", "--json", "pid")
    assert result.returncode == 0, result.stdout + result.stderr
    pids = {w["pid"] for w in status["workers"]}
    assert {json.loads(line)["data"]["pid"] for line in result.stdout.splitlines()} == pids
    streamed = [json.loads(line) for line in daemon.cli("send-req", "--json", "-w", "1", "count").stdout.splitlines()]
    assert [item["data"] for item in streamed] == [1, 2, 3]
    assert daemon.cli("send-msg", "-w", "0", "hello", '{"x": 1}').returncode == 0
    wait_for(lambda: "hello" in daemon.cli("send-req", "-w", "0", "messages").stdout, 5, "the message")
    missing = daemon.cli("send-req", "nope")
    assert missing.returncode == 1 and "no handler for request" in missing.stdout

    assert daemon.cli("restart").returncode == 0  # the shutdown message drains them
    assert not pids & daemon.published_pids()
    daemon.wait_log(r"stopping: sent the shutdown message")
