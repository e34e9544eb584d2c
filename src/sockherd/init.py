"""``sockherd init``: a starter config and the nginx and systemd snippets that match it.

The nginx snippet is the one the docs explain. Per-worker sockets: ``max_fails=0``
because sockherd republishes a socket in milliseconds and nginx's default (one failure
takes the upstream out for 10 s) turns a millisecond gap into ten seconds of 502s.
Shared listener (``--listen``): one ``server`` line and nginx's defaults, which nginx
does not apply to a single server.
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

LISTEN_CONFIG = """\
# sockherd configuration: see docs/config.md for every key.
name = "{name}"
command = ["python", "-m", "sockherd.uvicorn", "app:app"]
tmp_dir = "/run/{name}"
workers = 2
# One socket for every worker, owned by the daemon (docs/concepts.md, "Two listener
# modes"); add "tcp://127.0.0.1:8000" to serve a port as well.
listen = ["unix:///run/{name}/{name}.sock"]
# stdout = "log/{name}.log"
# stderr = "log/{name}.log"
"""


def _server_block(name: str, *, retry: bool) -> str:
    retry_line = "        proxy_next_upstream error timeout;\n" if retry else ""
    return f"""\
server {{
    listen 80;
    location / {{
        proxy_pass http://{name};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
{retry_line}    }}
}}
"""


def nginx_snippet(name: str, tmp_dir: str, workers: int, socket_file: str = "app.{worker}.sock") -> str:
    servers = "\n".join(
        f"    server unix:{tmp_dir}/{socket_file.format(worker=i)} max_fails=0;" for i in range(workers)
    )
    upstream = f"upstream {name} {{\n{servers}\n    keepalive 32;\n}}\n"
    return upstream + "\n" + _server_block(name, retry=True)


def nginx_listen_snippet(name: str, address: str) -> str:
    upstream = f"""\
upstream {name} {{
    # One server: every worker accepts from the daemon's socket. nginx does not apply
    # max_fails to a single server, so its defaults are right here.
    server unix:{address.removeprefix("unix://")};
    keepalive 32;
}}
"""
    return upstream + "\n" + _server_block(name, retry=False)


def systemd_socket_unit(name: str, address: str) -> str:
    return f"""\
[Unit]
Description={name} listener (sockherd)

[Socket]
ListenStream={address.removeprefix("unix://")}
SocketMode=0660
SocketGroup=www-data
Backlog=4096

[Install]
WantedBy=sockets.target
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


def run_init(cwd: Path, *, force: bool = False, listen: bool = False) -> int:
    target = cwd / "sockherd.toml"
    name = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in cwd.name) or "app"
    if target.exists() and not force:
        print(f"sockherd: {target} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    target.write_text((LISTEN_CONFIG if listen else STARTER_CONFIG).format(name=name))
    exe = shutil.which("sockherd") or f"{sys.executable} -m sockherd"
    address = f"unix:///run/{name}/{name}.sock"
    print(f"wrote {target}\n")
    print(f"# nginx (e.g. /etc/nginx/conf.d/{name}.conf):\n")
    print(nginx_listen_snippet(name, address) if listen else nginx_snippet(name, f"/run/{name}", 2))
    print(f"# systemd (/etc/systemd/system/{name}.service):\n")
    print(systemd_unit(name, cwd, exe))
    if listen:
        print(
            f"# optional, systemd socket activation (/etc/systemd/system/{name}.socket): systemd holds the\n"
            "# listener, so even a crashed daemon's restart never closes it (docs/deployment.md):\n"
        )
        print(systemd_socket_unit(name, address))
    return 0
