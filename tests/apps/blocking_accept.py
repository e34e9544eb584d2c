"""A server with no event loop: one thread blocked in accept(2) on the inherited fd 3."""

import socket

listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    conn.recv(65536)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    conn.close()
