"""A child process's output, collected line by line, to wait on as an event stream."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

TIMEOUT = 10.0


@dataclass
class Worker:
    """A worker process started by a test; ``stream`` (stdout or stderr) is collected."""

    proc: subprocess.Popen[str]
    socket_path: str
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    collector: threading.Thread | None = None

    def collect(self, stream: IO[str] | None = None) -> None:
        source = stream or self.proc.stdout or self.proc.stderr
        assert source is not None
        for line in source:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_line(self, text: str, count: int = 1) -> str:
        """The ``count``-th line containing ``text``, once it has been written."""

        def matches() -> list[str]:
            return [line for line in self.lines if text in line]

        with self.cond:
            if not self.cond.wait_for(lambda: len(matches()) >= count, TIMEOUT):
                raise AssertionError(f"worker never wrote {text!r}; its output:\n" + "\n".join(self.lines))
            return matches()[count - 1]


def worker_env(ipc: str, socket_path: str, **overrides: str) -> dict[str, str]:
    """This process's environment minus any sockherd contract, plus a worker's contract."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKHERD_") and k != "NOTIFY_SOCKET"}
    env |= {
        "SOCKHERD_SOCKET": socket_path,
        "SOCKHERD_WORKER_ID": "hello-1",
        "SOCKHERD_INDEX": "0",
        "SOCKHERD_IPC": ipc,
        "SOCKHERD_SUSPENDED": "0",
    }
    return env | overrides


def start_worker_process(argv: list[str], env: dict[str, str], cwd: Path, *, merge_output: bool) -> Worker:
    """A worker subprocess whose output (stdout+stderr merged, or stderr alone) is collected."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if merge_output else subprocess.DEVNULL,
        stdout=subprocess.PIPE if merge_output else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
    )
    worker = Worker(proc, env["SOCKHERD_SOCKET"])
    worker.collector = threading.Thread(target=worker.collect, daemon=True)
    worker.collector.start()
    return worker


def stop_worker_process(worker: Worker) -> None:
    """Kill (also a worker left stopped by SIGSTOP), reap, and close its pipes."""
    if worker.proc.poll() is None:
        worker.proc.kill()
    worker.proc.wait()
    if worker.collector is not None:
        worker.collector.join(TIMEOUT)
    for stream in (worker.proc.stdin, worker.proc.stdout, worker.proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
