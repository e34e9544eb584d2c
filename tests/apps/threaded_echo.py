"""The echo example on sockherd.server's threaded base (blocking code, a thread per connection)."""

from __future__ import annotations

import os
import socket

from sockherd import worker
from sockherd.server import serve_threaded


def echo(conn: socket.socket, address: object) -> None:
    conn.sendall(f"hello from worker {worker.id} (pid {os.getpid()})\n".encode())
    with conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(line)


if __name__ == "__main__":
    serve_threaded(echo, port=9000)
