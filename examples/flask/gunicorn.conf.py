"""gunicorn's settings, read from the working directory: under sockherd and standalone.

sockherd starts one gunicorn master per worker slot; each master serves the socket
sockherd chose, with the backlog sockherd asks for. Standalone (no SOCKHERD_SOCKET) it
is plain gunicorn on 127.0.0.1:8000.
"""

from __future__ import annotations

import os

socket_path = os.environ.get("SOCKHERD_SOCKET")
bind = [f"unix:{socket_path}" if socket_path else "127.0.0.1:8000"]
backlog = int(os.environ.get("SOCKHERD_BACKLOG", "2048"))

# Import the app in the master, before gunicorn sends READY=1: a release that fails to
# import then fails its deploy, instead of being published and crash-looping.
preload_app = True

workers = 2  # processes inside each sockherd worker
worker_class = "gthread"  # the sync worker ignores keepalive and closes every connection
threads = 4
keepalive = 75  # seconds; above nginx's upstream keepalive_timeout (60 s)
graceful_timeout = 25  # below sockherd's shutdown_timeout, so gunicorn finishes its own drain
control_socket_disable = True  # gunicorn >= 25.1: one control socket per master is not needed here
