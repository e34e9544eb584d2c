"""A worker that speaks the IPC protocol by hand and abuses it, for the messaging tests.

It says hello, reports online, then: answers every request with a flood of replies
(most for request ids it was never given), sends garbage to the daemon on a second
connection, and keeps its first connection busy with unsolicited messages.
"""

from __future__ import annotations

import json
import os
import socket
import threading

IPC = os.environ["SOCKHERD_IPC"]
WORKER_ID = os.environ["SOCKHERD_WORKER_ID"]


def frame(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def garbage() -> None:
    junk = socket.socket(socket.AF_UNIX)
    junk.connect(IPC)
    hello = {"type": "hello", "id": 1, "data": {"role": "worker", "id": WORKER_ID, "version": 1}}
    junk.sendall(frame(hello))
    try:
        while True:
            junk.sendall(b"\xff\xfe not json at all \n" + b"{" * 5000 + b"\n")
    except OSError:
        pass  # the daemon closed it, as it should


sock = socket.socket(socket.AF_UNIX)
sock.connect(IPC)
hello = {"type": "hello", "id": 1, "data": {"role": "worker", "id": WORKER_ID, "pid": os.getpid(), "version": 1}}
sock.sendall(frame(hello) + frame({"type": "online"}))
threading.Thread(target=garbage, daemon=True).start()
buffer = b""
while True:
    data = sock.recv(65536)
    if not data:
        break
    buffer += data
    while b"\n" in buffer:
        line, buffer = buffer.split(b"\n", 1)
        msg = json.loads(line)
        if msg.get("type") == "shutdown":
            raise SystemExit(0)
        if msg.get("type") == "request":
            rid = msg["id"]
            try:
                for n in range(20000):
                    target = rid if n % 2 == 0 else rid + 1000 + n  # half for ids it was never given
                    sock.sendall(frame({"type": "reply", "request_id": target, "data": "z" * 2000, "done": False}))
                sock.sendall(frame({"type": "reply", "request_id": rid, "done": True}))
            except OSError:
                raise SystemExit(0) from None
