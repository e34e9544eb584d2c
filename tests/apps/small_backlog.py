"""An unmodified stdlib HTTP server on the worker's socket: socketserver listens with a backlog of 5."""

import os
import socketserver
from http.server import BaseHTTPRequestHandler


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"pid={os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(socketserver.UnixStreamServer):
    pass  # request_queue_size stays socketserver's default: 5


if __name__ == "__main__":
    with Server(os.environ["SOCKHERD_SOCKET"], Hello) as server:
        os.chmod(os.environ["SOCKHERD_SOCKET"], 0o660)
        server.serve_forever()
