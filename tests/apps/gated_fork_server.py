"""A fork server that speaks sockherd's preload protocol and forks only when a test says so.

    python gated_fork_server.py GATE_DIR      (as a `preload = true` command)

It does what :mod:`sockherd.preload` does, at the protocol level (ready, then one
request per worker: its environment plus its log files and listeners as descriptors;
fork, fork again, answer with the grandchild's pid), except that before forking for
its Nth request it writes ``GATE_DIR/PID-N.waiting`` and waits until the test creates
``GATE_DIR/PID-N``. It writes the worker's pid to ``GATE_DIR/PID-N.pid`` before it
answers, and the worker execs tinyapp on its socket, so a test can hold a fork in flight while the daemon does
something else, then let it complete and watch what happens to the late worker.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

TINYAPP = Path(__file__).with_name("tinyapp.py")


def main() -> None:
    gate = Path(sys.argv[1])
    channel = socket.socket(fileno=int(os.environ.pop("SOCKHERD_PRELOAD_FD")))
    channel.sendall(json.dumps({"ready": True}).encode())
    count = 0
    while True:
        data, fds, _, _ = socket.recv_fds(channel, 65536, 64)
        if not data:
            os._exit(0)
        count += 1
        name = f"{os.getpid()}-{count}"
        (gate / f"{name}.waiting").touch()
        while not (gate / name).exists():  # the test's gate: a file it creates
            time.sleep(0.005)
        request = json.loads(data)
        read_end, write_end = os.pipe()
        middle = os.fork()
        if middle == 0:
            if os.fork() == 0:
                os.setsid()
                os.write(write_end, str(os.getpid()).encode())  # as sockherd.preload: after setsid
                os.close(write_end)
                for fd, target in zip(fds, [1 if n == "stdout" else 2 for n in request["outputs"]], strict=False):
                    os.dup2(fd, target)
                env = {**os.environ, **request["env"]}
                os.execve(sys.executable, [sys.executable, str(TINYAPP), env["SOCKHERD_SOCKET"]], env)
            os._exit(0)
        os.close(write_end)
        pid = int(os.read(read_end, 64))  # the worker's, written after its setsid
        os.close(read_end)
        os.waitpid(middle, 0)
        for fd in fds:
            os.close(fd)
        (gate / f"{name}.pid").write_text(str(pid))  # before the answer: the daemon may kill it at once
        channel.sendall(json.dumps({"pid": pid}).encode())


if __name__ == "__main__":
    main()
