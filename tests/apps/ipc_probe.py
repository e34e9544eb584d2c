"""Try to talk to a daemon's IPC socket; print what happened (run as another user)."""

import socket
import sys

sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("denied")
    sys.exit(0)
try:
    sock.sendall(b'{"type":"hello","id":1,"data":{"role":"client"}}\n')
    answer = sock.recv(100)
except (BrokenPipeError, ConnectionResetError):  # closed before or after our hello
    answer = b""
print("answer:", answer)
