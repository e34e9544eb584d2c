"""A real nginx in front of the published symlinks, configured as the docs say."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from support.http import LoadResult

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Nginx:
    def __init__(
        self,
        workdir: Path,
        sockets: Sequence[Path | str],
        *,
        keepalive: bool,
        max_fails: int | None = 0,
        user: str | None = None,
    ) -> None:
        """``sockets``: UNIX socket paths, or any nginx upstream address as a string
        (``"127.0.0.1:8001"``, ``"unix:/run/x.sock"``). ``max_fails=None``: nginx's
        defaults (``max_fails=1 fail_timeout=10s``)."""
        if not os.path.exists(NGINX):
            raise RuntimeError("nginx is not installed: run `bash .ci/run` or `apt-get install nginx-light`")
        self.workdir = workdir
        self.port = free_port()
        self.error_log = workdir / "error.log"
        addresses = [f"unix:{s}" if isinstance(s, Path) else s for s in sockets]
        fails = "" if max_fails is None else f" max_fails={max_fails}"
        servers = "\n".join(f"        server {address}{fails};" for address in addresses)
        # nginx's workers run as ``user`` (Debian's www-data, say), else as root when we are.
        user_line = f"user {user};" if user else ("user root;" if os.geteuid() == 0 else "")
        conf = f"""
{user_line}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    upstream app {{
{servers}
        {"keepalive 32;" if keepalive else ""}
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(conf)
        self.proc = subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(self.conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nginx did not start: {err} {self.errors()}")
            time.sleep(0.01)

    def errors(self) -> list[str]:
        """error_log lines at [error] or worse (an upstream reset or refusal shows here)."""
        if not self.error_log.exists():
            return []
        levels = ("[error]", "[crit]", "[alert]", "[emerg]")
        return [line for line in self.error_log.read_text().splitlines() if any(lv in line for lv in levels)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def assert_clean(result: LoadResult, nginx: Nginx) -> None:
    """A load through nginx that lost nothing: no failed request, POSTs among them, and
    nothing in nginx's error log (a failed connect is logged even when retried)."""
    assert result.failures == [], f"{len(result.failures)} failed of {result.total}: {result.failures[:10]}"
    assert result.methods["POST"] > 50, result.methods
    assert nginx.errors() == [], nginx.errors()[:10]
