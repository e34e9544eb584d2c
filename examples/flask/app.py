"""Flask under unmodified gunicorn: ``gunicorn app:app`` (settings in gunicorn.conf.py).

The app knows nothing of sockherd: gunicorn binds the worker's socket
(``SOCKHERD_SOCKET``), tells the daemon it is ready with sd_notify ``READY=1``, and
drains on SIGTERM, sockherd's default ``stop_signal``.
"""

from __future__ import annotations

import os
from importlib.metadata import version

from flask import Flask, request

app = Flask(__name__)
FLASK_VERSION = version("flask")


@app.get("/")
def hello() -> tuple[str, dict[str, str]]:
    worker = os.environ.get("SOCKHERD_WORKER_ID", "standalone")
    # os.getpid() is the gunicorn worker (a child of the process sockherd started).
    body = f"hello from flask {FLASK_VERSION} (worker {worker}, pid {os.getpid()})\n"
    return body, {"Content-Type": "text/plain; charset=utf-8"}


@app.post("/echo")
def echo() -> tuple[bytes, dict[str, str]]:
    return request.get_data(), {"Content-Type": "application/octet-stream"}
