"""FastAPI under sockherd's uvicorn runner: ``python -m sockherd.uvicorn main:app``.

* ``GET /`` names the framework, the code's revision (the ``REVISION`` file, read
  once at import: what a deploy changes), the database's schema version, and the
  worker that answered;
* ``POST /echo`` returns the request body.

The app is wrapped in :class:`sockherd.asgi.SuspendMiddleware`, so a deploy started
with ``sockherd restart --suspended`` holds requests while ``python migrate.py`` runs,
and ``sockherd resume`` lets them through to the new code and the new schema.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import fastapi
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from migrate import DATABASE, schema_version

from sockherd import worker
from sockherd.asgi import SuspendMiddleware

HERE = Path(__file__).resolve().parent
REVISION = (HERE / "REVISION").read_text().strip() if (HERE / "REVISION").exists() else "dev"

app = FastAPI()
app.add_middleware(SuspendMiddleware)  # hold requests while a suspended deploy migrates


@app.get("/", response_class=PlainTextResponse)
def hello() -> str:
    # A plain `def`: FastAPI runs it in a thread, where blocking sqlite3 calls belong.
    with contextlib.closing(sqlite3.connect(DATABASE)) as db:
        schema = schema_version(db)
    return (
        f"hello from fastapi {fastapi.__version__}, revision {REVISION}, schema {schema} "
        f"(worker {worker.id or 'standalone'}, pid {os.getpid()})\n"
    )


@app.post("/echo")
async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")
