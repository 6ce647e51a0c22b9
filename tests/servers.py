"""Real servers on 127.0.0.1 for tests and benchmarks: an HTTP file server with
scripted misbehaviour, and moto's S3-compatible server."""

from __future__ import annotations

import collections
import http.server
import logging
import os
import re
import sys
import threading
import time


class FileServer:
    """Serve `files` ({path: bytes}) over HTTP on 127.0.0.1, with Range support.

    Paths may be prefixed to script a behaviour (the rest of the path names
    the file):
      /slow/P       waits `slow_seconds` before answering
      /fail500/P    answers 500 to the first request, then the file
      /busy/P       answers 503 with Retry-After to the first two requests
      /cutonce/P    sends half the body of the first response, then closes the connection
      /cut/P        always does that
      /denied/P     answers 403
      /chunked/P    sends the body with chunked transfer encoding, no Content-Length
      /hold/P       sets `held`, then answers only once `release` is set: a test knows that a reader
                    is waiting on P, and lets it go on when it chooses (a handshake, not a sleep)
    Anything else not in `files` is a 404. `latency` delays every response
    (a remote store's round trip). `requests` counts requests per path, `sent`
    the body bytes written per path (in 64 KiB writes, so a client that
    hangs up stops it, give or take what the sockets buffer).
    """

    def __init__(self, files: dict[str, bytes], latency: float = 0.0, slow_seconds: float = 0.5):
        self.files = files
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.requests: collections.Counter = collections.Counter()
        self.sent: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.held = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else the body waits 40 ms for a delayed ACK

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(head=True)

            def do_GET(self):
                self.respond(head=False)

            def respond(self, head):
                with server.lock:
                    server.requests[self.path] += 1
                    count = server.requests[self.path]
                if server.latency:
                    time.sleep(server.latency)
                m = re.match(r"^/(slow|fail500|busy|cutonce|cut|denied|chunked|hold)(/.*)$", self.path)
                kind, path = (m.group(1), m.group(2)) if m else (None, self.path)
                if kind == "hold":
                    server.held.set()
                    if not server.release.wait(timeout=600):  # only a guard against a test that hangs
                        return self.status(504)
                if kind == "slow":
                    time.sleep(server.slow_seconds)
                if kind == "denied":
                    return self.status(403)
                if kind == "fail500" and count == 1 and not head:
                    return self.status(500)
                if kind == "busy" and count <= 2 and not head:
                    return self.status(503, {"Retry-After": "0"})
                body = server.files.get(path)
                if body is None:
                    return self.status(404)
                start, end = 0, len(body)
                rng = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if rng:
                    start = int(rng.group(1))
                    end = min(end, int(rng.group(2)) + 1) if rng.group(2) else end
                self.send_response(206 if rng else 200)
                if kind == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
                self.end_headers()
                if head:
                    return
                part = body[start:end]
                if kind == "cut" or (kind == "cutonce" and count == 1):
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                try:
                    for i in range(0, len(part), 1 << 16):
                        piece = part[i: i + (1 << 16)]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if kind == "chunked" else piece)
                        with server.lock:
                            server.sent[self.path] += len(piece)
                    if kind == "chunked":
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):  # the client hung up: stop sending
                    self.close_connection = True

            def status(self, code, headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog of 5 drops concurrent connections (1 s SYN retries)

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], ConnectionError):  # a client killed mid-request: no news
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class S3Server:
    """moto's standalone S3-compatible server on 127.0.0.1, with fake credentials
    and the endpoint set in the environment the way AWS tools read it."""

    ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def __enter__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # its request log would mix into stderr
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.endpoint = "http://127.0.0.1:%d" % self.server._server.server_address[1]
        self.env = dict(self.ENV, AWS_ENDPOINT_URL_S3=self.endpoint)
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self._forget_clients()
        return self

    @staticmethod
    def _forget_clients():
        """s3fs keeps one client per set of arguments for the process: one made for
        another server's endpoint must not be reused."""
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"})

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._forget_clients()
        self.server.stop()
