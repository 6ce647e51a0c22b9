"""Real servers on 127.0.0.1 for tests and benchmarks: an HTTP file server with
scripted misbehaviour, and moto's S3-compatible server."""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import logging
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request


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
    and, misbehaving as servers on the web do:
      /trickle/P    sends the headers, then one byte of the body every `trickle_seconds`
      /silent/P     sends the headers (Content-Length and all), then nothing
      /endless/P    sends a chunked body that never ends (zeros)
      /loop/P       redirects to itself
      /away/P       redirects to `away` + P (another server)
      /longer/P     declares a Content-Length 1000 bytes longer than the body, sends the body, closes
      /shorter/P    declares half the body's length and sends all of it
      /throttle/P   answers 429 with `Retry-After: retry_after` to every request
      /throttleonce/P  does that to the first request only, then serves the file
      /reset/P      sends half the body, then resets the connection (RST)
      /status/N/P   answers HTTP status N
      /hold/P       sets `held`, then answers only once `release` is set: a test knows that a reader
                    is waiting on P, and lets it go on when it chooses (a handshake, not a sleep)
    Anything else not in `files` is a 404. `latency` delays every response
    (a remote store's round trip). `requests` counts requests per path, `sent`
    the body bytes written per path (in 64 KiB writes, so a client that
    hangs up stops it, give or take what the sockets buffer), `times` when
    each request came (time.monotonic()). Answers that never end stop when
    the server does.
    """

    def __init__(self, files: dict[str, bytes], latency: float = 0.0, slow_seconds: float = 0.5,
                 trickle_seconds: float = 0.2, retry_after: str = "3600", away: str = "", host: str = "127.0.0.1",
                 tls: tuple[str, str] | None = None):
        self.files = files
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.trickle_seconds = trickle_seconds
        self.retry_after = retry_after
        self.away = away
        self.requests: collections.Counter = collections.Counter()
        self.sent: collections.Counter = collections.Counter()
        self.times: collections.defaultdict = collections.defaultdict(list)
        self.lock = threading.Lock()
        self.closing = threading.Event()
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
                    server.times[self.path].append(time.monotonic())
                    count = server.requests[self.path]
                if server.latency:
                    time.sleep(server.latency)
                m = re.match(r"^/(slow|fail500|busy|cutonce|cut|denied|chunked|hold|trickle|silent|endless|loop|away|longer"
                             r"|shorter|throttleonce|throttle|reset|status/\d+)(/.*)$", self.path)
                kind, path = (m.group(1), m.group(2)) if m else (None, self.path)
                if kind == "hold":
                    server.held.set()
                    if not server.release.wait(timeout=600):  # only a guard against a test that hangs
                        return self.status(504)
                if kind == "slow":
                    time.sleep(server.slow_seconds)
                if kind == "denied":
                    return self.status(403)
                if kind and kind.startswith("status/"):
                    return self.status(int(kind.split("/")[1]))
                if kind == "loop":
                    return self.status(302, {"Location": self.path})
                if kind == "away":
                    return self.status(302, {"Location": server.away + path})
                if kind == "throttle" or (kind == "throttleonce" and count == 1):
                    return self.status(429, {"Retry-After": server.retry_after})
                if kind == "endless":
                    return self.endless()
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
                    declared = {"longer": end - start + 1000, "shorter": (end - start) // 2}.get(kind, end - start)
                    self.send_header("Content-Length", str(declared))
                self.send_header("Accept-Ranges", "bytes")
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
                self.end_headers()
                if head:
                    return
                part = body[start:end]
                if kind in ("trickle", "silent"):
                    return self.trickle(part if kind == "trickle" else b"")
                if kind == "reset":
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # now, before the server's own shutdown() sends a FIN
                    self.close_connection = True
                    return
                if kind == "longer":
                    self.wfile.write(part)
                    self.wfile.flush()
                    self.close_connection = True
                    return
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

            def trickle(self, part):
                """One byte of `part` every trickle_seconds, then silence, until the client or the server goes."""
                self.wfile.flush()
                self.close_connection = True
                try:
                    for i in range(len(part)):
                        if server.closing.wait(server.trickle_seconds):
                            return
                        self.wfile.write(part[i: i + 1])
                        self.wfile.flush()
                        with server.lock:
                            server.sent[self.path] += 1
                    server.closing.wait()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def endless(self):
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.close_connection = True
                piece = bytes(1 << 16)
                try:
                    while not server.closing.is_set():
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        with server.lock:
                            server.sent[self.path] += len(piece)
                except (BrokenPipeError, ConnectionResetError):
                    pass

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

        self.httpd = Server((host, 0), Handler)
        self.scheme = "http"
        if tls is not None:  # (certificate file, key file): HTTPS
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by itself (so no client trusts it), and its key: files in `folder`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_file, key_file


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

    @contextlib.contextmanager
    def recording(self, folder):
        """Record the requests the server answers inside the block, with moto's own recorder (a file in
        `folder`): yields a list that holds (method, path) for each once the block ends."""
        from moto.moto_api import recorder

        recorder._location = os.path.join(folder, "moto-requests.jsonl")
        self._recorder("reset-recording")
        self._recorder("start-recording")
        got: list[tuple[str, str]] = []
        try:
            yield got
        finally:
            self._recorder("stop-recording")
            for line in self._recorder("download-recording").splitlines():
                entry = json.loads(line)
                got.append((entry["method"], urllib.parse.urlsplit(entry["url"]).path))

    def _recorder(self, action: str) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
        with opener.open(urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}", data=b"")) as r:
            return r.read().decode()

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
