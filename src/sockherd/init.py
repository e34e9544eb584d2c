"""``sockherd init``: a starter config and the nginx and systemd snippets that match it.

The nginx snippet is the one the docs explain: ``max_fails=0`` because sockherd
republishes a socket in milliseconds and nginx's default (one failure takes the
upstream out for 10 s) turns a millisecond gap into ten seconds of 502s.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

STARTER_CONFIG = """\
# sockherd configuration: see docs/config.md for every key.
name = "{name}"
command = ["python", "-m", "sockherd.uvicorn", "app:app"]
tmp_dir = "/run/{name}"
workers = 2
# ready = "socket"   # for servers that do not use the sockherd library
# stdout = "log/{name}.log"
# stderr = "log/{name}.log"
"""


def nginx_snippet(name: str, tmp_dir: str, workers: int, socket_file: str = "app.{worker}.sock") -> str:
    servers = "\n".join(
        f"    server unix:{tmp_dir}/{socket_file.format(worker=i)} max_fails=0;" for i in range(workers)
    )
    return f"""\
upstream {name} {{
{servers}
    keepalive 32;
}}

server {{
    listen 80;
    location / {{
        proxy_pass http://{name};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_next_upstream error timeout;
    }}
}}
"""


def systemd_unit(name: str, workdir: Path, exe: str) -> str:
    return f"""\
[Unit]
Description={name} (sockherd)
After=network.target

[Service]
Type=notify
NotifyAccess=main
WorkingDirectory={workdir}
ExecStart={exe} daemon
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM goes to the daemon alone, which drains its workers in stages. If the daemon
# dies, its workers keep serving and the daemon systemd starts again adopts them.
KillMode=process
TimeoutStopSec=60
# Every crash (a signal, a non-zero exit); not a clean `sockherd terminate`.
Restart=on-failure
RuntimeDirectory={name}
RuntimeDirectoryMode=2750
RuntimeDirectoryPreserve=yes
# The app's own user; nginx reaches the sockets through the group.
User={name}
Group=www-data

[Install]
WantedBy=multi-user.target
"""


def run_init(cwd: Path, *, force: bool = False) -> int:
    target = cwd / "sockherd.toml"
    name = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in cwd.name) or "app"
    if target.exists() and not force:
        print(f"sockherd: {target} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    target.write_text(STARTER_CONFIG.format(name=name))
    exe = shutil.which("sockherd") or f"{sys.executable} -m sockherd"
    print(f"wrote {target}\n")
    print(f"# nginx (e.g. /etc/nginx/conf.d/{name}.conf):\n")
    print(nginx_snippet(name, f"/run/{name}", 2))
    print(f"# systemd (/etc/systemd/system/{name}.service):\n")
    print(systemd_unit(name, cwd, exe))
    return 0
