"""A child process's output, collected line by line, to wait on as an event stream."""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass, field
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
