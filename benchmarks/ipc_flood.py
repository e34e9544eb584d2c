"""The IPC socket under a flood: 1,000 idle connections and 64 clients that never read.

    python benchmarks/ipc_flood.py

One daemon with 2 workers. From one uid (the daemon's), 1,000 connections that never
say hello, and 64 that say hello, then ask `status` over and over without reading a
reply. Meanwhile: how long a fresh `status` takes, whether a `restart` succeeds, and
the daemon's RSS. Targets (issue 8): status within 1 s, the restart succeeds, RSS under
100 MB.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import sys
import time

import psutil
from _harness import REPO, daemon, verdict

from sockherd import protocol

TINY = {"command": [sys.executable, str(REPO / "tests" / "apps" / "tinyapp.py"), "{socket}"], "workers": 2}
IDLE, HOGS = 1000, 64


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    return sock


def main() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    ok = True
    with daemon(TINY) as d:
        d.wait_ready(2)
        proc = psutil.Process(d.proc.pid)
        rss_before = proc.memory_info().rss
        path = str(d.ipc)
        opened: list[socket.socket] = []
        try:
            for _ in range(IDLE):
                with contextlib.suppress(OSError):
                    opened.append(connect(path))
            hogs = []
            for _ in range(HOGS):
                hog = connect(path)
                hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                hog.sendall(protocol.message("hello", {"role": "client"}, id=0))
                hogs.append(hog)
            opened += hogs
            request = protocol.message("status", id=1)
            peak = rss_before
            for _ in range(40):
                for hog in hogs:
                    with contextlib.suppress(OSError):
                        hog.sendall(request * 20)
                peak = max(peak, proc.memory_info().rss)
            started = time.monotonic()
            d.status()
            status_s = time.monotonic() - started
            restart = d.cli("restart")
            peak = max(peak, proc.memory_info().rss)
        finally:
            for sock in opened:
                sock.close()
        print(
            f"{IDLE} idle + {HOGS} non-reading connections: status answered in {status_s * 1000:.1f} ms; "
            f"restart exit {restart.returncode}; daemon RSS {rss_before / 2**20:.1f} MiB before, "
            f"peak {peak / 2**20:.1f} MiB"
        )
        ok &= verdict("status within 1 s under the flood", status_s < 1.0, f"{status_s * 1000:.1f} ms")
        ok &= verdict("restart succeeds under the flood", restart.returncode == 0, f"exit {restart.returncode}")
        ok &= verdict("daemon RSS under 100 MB", peak < 100 * 2**20, f"{peak / 2**20:.1f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
