"""`vggembed serve`'s REST API: TensorFlow Serving's, over aiohttp, feeding `serve.Server`'s one queue.

TensorFlow Serving's paths, each also under `/versions/N` or `/labels/LABEL` after the name:

- `POST /v1/models/NAME:predict`: `{"instances": [{"b64": "..."}, ...]}` (row format) or `{"inputs": [...]}`
  (columnar), optional `"signature_name"` (`serving_default`: encoded images; `pixels`: 224x224x3 RGB lists in
  0..255) and `"output_filter"` (names to return). The answer is TensorFlow Serving's: `{"predictions": [...]}`
  for rows, `{"outputs": ...}` for columns; with one output each instance is its value, with several an object
  of named outputs. Errors are `{"error": "..."}` naming the instance.
- `POST /v1/models/NAME:classify`: `{"examples": [{"images": {"b64": "..."}}, ...]}`, answered
  `{"result": [[[label, score], ...], ...]}` from the recipe's top-K (`top_label`, `top_prob`; needs `--top`).
- `GET /v1/models/NAME`: the status document; `GET /v1/models/NAME/metadata`: the signatures, in the JSON form
  of GetModelMetadataResponse.

Beside them: `POST /embed` (one raw image body; one object of named outputs) and `GET /metrics` (Prometheus
text for both protocols).

Bodies are read asynchronously (a slow client holds a connection, never the model or a decoding thread) with
`read_timeout`, and above `max_body` bytes refused with 413; a connection that sends no whole request head
within `read_timeout`, or idles that long, is closed; beyond `max_connections` open connections a new one is
answered 503 at once and closed. Every malformed request is a 4xx with words (a JSON body nested too deeply
included, a body not in its Content-Encoding), never a 500. A client that closes its connection before its
answer is counted as 499 (`CLIENT_CLOSED`), and its images waiting in the queue are taken out unrun.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import sys
import time

import numpy as np

from ..errors import reason
from .serve import INPUT_NAMES, Front, Refused, Server

STATUS = {"invalid": 400, "not_found": 404, "too_large": 413, "busy": 503, "unavailable": 503, "internal": 500}
# The code counted (never sent: nobody is there to read it) for a request whose client closed its connection
# before its answer: nginx's "client closed request". Not a 500, which is the server's own failure; like any 4xx
# (and like a gRPC call's CANCELLED) it counts in vggembed_errors_total.
CLIENT_CLOSED = 499
# TensorFlow Serving's model paths: NAME, then /versions/N or /labels/L, then :VERB or /metadata.
MODEL_PATH = re.compile(r"(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
                        r"(?::(?P<verb>[A-Za-z]+)|/(?P<metadata>metadata))?")


class HTTPError(Exception):
    """An answer other than 200: status, one-line message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _one_line(e: BaseException) -> str:
    """aiohttp's words for a request it could not read, on one line and without the client's bytes it quotes
    (`Invalid char in url path:\n\n  b'GET /\\xff ...'\n  ^` is `Invalid char in url path`)."""
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    text = re.sub(r"^\d{3}, message:\s*", "", text.strip())  # aiohttp's str() of its own errors
    text = text.split("\n", 1)[0].split(": b'", 1)[0].split(': b"', 1)[0]
    text = text.split(". ", 1)[0]  # "... brotli (br). Please install `Brotli`": advice for whoever runs aiohttp
    return text.rstrip(" :.")[:200]


def http_error(e: Refused) -> HTTPError:
    return HTTPError(STATUS[e.kind], e.message, {"Retry-After": "1"} if STATUS[e.kind] == 503 else None)


def _json_value(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


def _load_json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise HTTPError(400, "body is nested too deeply to be a request") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"body is not JSON: {e}") from None
    except ValueError:  # Python's own limit on reading long integers (its words advise sys.set_int_max_str_digits)
        raise HTTPError(400, f"body has a number of more than {sys.get_int_max_str_digits()} digits") from None


def _b64(i: int, value) -> bytes:
    if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
        raise HTTPError(400, f'instance {i}: an image must be {{"b64": "<base64 of the file>"}}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPError(400, f"instance {i}: bad base64: {e}") from None


class Rest:
    def __init__(self, server: Server):
        self.server, self.config, self.metrics = server, server.config, server.metrics

    # ------------------------------------------------------- parsing
    def parse_predict(self, body: bytes) -> tuple[str, list, bool, list[str]]:
        """(signature, instances, row format?, output names) from a predict body."""
        doc = _load_json(body)
        if not isinstance(doc, dict):
            raise HTTPError(400, "body must be a JSON object with \"instances\" or \"inputs\"")
        name = doc.get("signature_name", "serving_default")
        if not isinstance(name, str):
            raise HTTPError(400, "signature_name must be a string")
        signature = self.server.signature(name)
        if ("instances" in doc) == ("inputs" in doc):
            raise HTTPError(400, "body must have exactly one of \"instances\" (rows) or \"inputs\" (columns)")
        row = "instances" in doc
        wanted = doc.get("output_filter", self.server.names)
        if not isinstance(wanted, list) or not wanted or not all(isinstance(w, str) for w in wanted):
            raise HTTPError(400, "output_filter must be a non-empty list of output names")
        wanted = self.server.check_outputs(wanted)
        key = INPUT_NAMES[signature]
        value = doc["instances"] if row else doc["inputs"]
        if not row and isinstance(value, dict):
            if set(value) != {key}:
                raise HTTPError(400, f"inputs must name the one input {key!r}")
            value = value[key]
        if not isinstance(value, list) or not value:
            raise HTTPError(400, f"{'instances' if row else 'inputs'} must be a non-empty list")
        items = [self._instance(i, v, key, signature, row) for i, v in enumerate(value)]
        return signature, items, row, wanted

    @staticmethod
    def _instance(i: int, value, key: str, signature: str, row: bool):
        if row and isinstance(value, dict) and set(value) == {key}:
            value = value[key]
        if signature == "pixels":
            return value
        return _b64(i, value)

    def parse_classify(self, body: bytes) -> list[bytes]:
        """The images of a classify body: `{"examples": [{"images": {"b64": "..."}}, ...]}`. As in TensorFlow
        Serving, an example's features are named by the model's input: here `images`, the one feature; the
        signature is serving_default (encoded images): pixels are for :predict."""
        doc = _load_json(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("examples"), list) or not doc["examples"]:
            raise HTTPError(400, 'body must be a JSON object with "examples": a non-empty list of '
                                 '{"images": {"b64": "..."}}')
        name = doc.get("signature_name", "serving_default")
        if not isinstance(name, str):
            raise HTTPError(400, "signature_name must be a string")
        if self.server.signature(name) != "serving_default":
            raise HTTPError(400, f"classify takes encoded images (serving_default); signature_name {name!r} takes "
                                 "pixels: use :predict")
        if doc.get("context"):
            raise HTTPError(400, "context is not taken: put each image in its own example")
        key = INPUT_NAMES["serving_default"]
        items = []
        for i, ex in enumerate(doc["examples"]):
            if not (isinstance(ex, dict) and set(ex) == {key}):
                other = [f for f in ex if f != key] if isinstance(ex, dict) else []
                named = f"; it has feature {other[0][:40]!r}" if other else ""
                raise HTTPError(400, f'example {i}: must be an object with one feature, {{"{key}": {{"b64": '
                                     f'"..."}}}}{named}')
            value = ex[key]
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            items.append(_b64(i, value))
        return items

    @staticmethod
    def answer(results: list[dict], row: bool, wanted: list[str]) -> bytes:
        if row:
            if len(wanted) == 1:
                preds = [_json_value(r[wanted[0]]) for r in results]
            else:
                preds = [{w: _json_value(r[w]) for w in wanted} for r in results]
            return json.dumps({"predictions": preds}).encode()
        cols = {w: [_json_value(r[w]) for r in results] for w in wanted}
        return json.dumps({"outputs": cols[wanted[0]] if len(wanted) == 1 else cols}).encode()

    # ---------------------------------------------------------- which model
    def _model(self, path: str) -> dict:
        """The parts of a /v1/models/... path, checked against what is served (404 otherwise)."""
        m = MODEL_PATH.fullmatch(path)
        if not m:
            raise HTTPError(404, f"no such endpoint: /v1/models/{path}")
        parts = m.groupdict()
        version = parts["version"]
        if version is not None:
            if not version.isdigit():
                raise HTTPError(400, f"version {version!r} is not a number")
            version = int(version)
        self.server.check_model(parts["name"], version, parts["label"])
        return parts

    # ---------------------------------------------------------- routes
    async def post_model(self, request, body: bytes):
        parts = self._model(request.match_info["path"])
        verb = parts["verb"]
        loop = asyncio.get_running_loop()
        if verb == "predict":
            request["route"] = "predict"
            signature, items, row, wanted = await loop.run_in_executor(self.server.decoders, self.parse_predict,
                                                                       body)
            results = await self.server.predict(signature, items)
            return await loop.run_in_executor(self.server.decoders, self.answer, results, row, wanted)
        if verb == "classify":
            request["route"] = "classify"
            if not self.server.recipe.top:
                raise HTTPError(400, "classify answers labels: start vggembed serve with --top K or --head HEAD.npz")
            items = await loop.run_in_executor(self.server.decoders, self.parse_classify, body)
            results = await self.server.predict("serving_default", items)
            return json.dumps({"result": [[[str(label), float(p)] for label, p in zip(r["top_label"], r["top_prob"])]
                                          for r in results]}).encode()
        if verb == "regress":
            raise HTTPError(400, "regress is not served: this model has no regression signature (use :predict, "
                                 "or :classify with --top)")
        raise HTTPError(404, f"no such endpoint: POST {request.path} (verbs: predict, classify)")

    async def embed(self, request, body: bytes):
        request["route"] = "embed"
        if not body:
            raise HTTPError(400, "instance 0: empty body; POST the image file's bytes")
        results = await self.server.predict("serving_default", [body])
        return json.dumps({w: _json_value(results[0][w]) for w in self.server.names}).encode()

    def status(self, parts: dict) -> bytes:
        return json.dumps({"model_version_status": [
            {"version": str(self.config.version), "state": "AVAILABLE",
             "status": {"error_code": "OK", "error_message": ""}}]}).encode()

    def metadata(self, parts: dict) -> bytes:
        return json.dumps({"model_spec": {"name": parts["name"], "signature_name": "",
                                          "version": str(self.config.version)},
                           "metadata": {"signature_def": self.server.signature_defs()}}).encode()

    async def get_model(self, request):
        from aiohttp import web

        parts = self._model(request.match_info["path"])
        if parts["verb"]:
            raise HTTPError(405, f"{request.path} takes POST")
        request["route"] = "metadata" if parts["metadata"] else "status"
        body = self.metadata(parts) if parts["metadata"] else self.status(parts)
        return web.Response(body=body, content_type="application/json")

    # ------------------------------------------------------------ app
    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=self.config.max_body, middlewares=[self._middleware])
        app.router.add_post("/v1/models/{path:.+}", self._with_body(self.post_model))
        app.router.add_post("/embed", self._with_body(self.embed))
        app.router.add_get("/v1/models/{path:.+}", self.get_model)
        app.router.add_get("/metrics", self._metrics)
        return app

    def _with_body(self, handler):
        async def route(request):
            from aiohttp import web

            request["route"] = "predict"
            start = time.perf_counter()
            declared = request.content_length
            if declared is not None and declared > self.config.max_body:
                raise HTTPError(413, f"body of {declared} bytes is over --max-body {self.config.max_body}")
            try:
                body = await asyncio.wait_for(request.read(), self.config.read_timeout)
            except asyncio.TimeoutError:
                raise HTTPError(408, f"body not received within {self.config.read_timeout:g}s") from None
            except web.HTTPRequestEntityTooLarge:
                raise HTTPError(413, f"body is over --max-body {self.config.max_body} bytes") from None
            except web.RequestPayloadError as e:  # a Content-Encoding the bytes are not in, a broken chunk
                raise HTTPError(400, f"body could not be read: {_one_line(e.__cause__ or e)}") from None
            except ConnectionError:  # the client closed the connection before its whole body arrived
                raise HTTPError(CLIENT_CLOSED, "the client closed the connection before sending the whole "
                                               "body") from None
            out = await handler(request, body)
            self.metrics.request_seconds.observe(time.perf_counter() - start)
            return web.Response(body=out, content_type="application/json")

        return route

    async def _metrics(self, request):
        from aiohttp import web

        request["route"] = "metrics"
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def _authorized(self, request) -> bool:
        if self.config.token is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.config.token}".encode())

    @property
    def _middleware(self):
        from aiohttp import web

        @web.middleware
        async def middleware(request, handler):
            status, headers = 200, {}
            try:
                if not self._authorized(request):
                    raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                    {"WWW-Authenticate": "Bearer"})
                try:
                    response = await handler(request)
                except Refused as e:
                    raise http_error(e) from None
                status = response.status
                return response
            except HTTPError as e:
                status, message, headers = e.status, e.message, e.headers
            except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 ...
                status, message, headers = e.status, e.reason, {}
                if e.status == 404:
                    message = f"no such endpoint: {request.method} {request.path}"
            except Exception as e:  # noqa: BLE001 - a failure in the model (TensorFlow's own kinds): one line
                status, message, headers = 500, f"internal error: {reason(e)}", {}
            except asyncio.CancelledError:  # the client closed its connection (handler_cancellation)
                status = CLIENT_CLOSED
                raise
            finally:
                self.metrics.requests[request.get("route", "other"), status] += 1
            return web.Response(body=json.dumps({"error": message}).encode(), status=status,
                                content_type="application/json", headers=headers)

        return middleware


# ------------------------------------------------------------- listening
def _connection_class():
    """aiohttp's connection handler, answering the requests it cannot parse as the rest of the API answers.

    aiohttp answers a request it cannot read before any route sees it (bad bytes in the path, a bad or duplicate
    Content-Length, a header line over 8 KiB, a Content-Encoding it cannot decode): a text/plain 400, and an
    "Error handling request" line with the parser's traceback on the log for every one of them (after a body it
    could not decode, "Unhandled exception" with one), so any client could flood the server's log. Here such a
    request is answered `{"error": "malformed HTTP request: ..."}` and counted in the metrics (route
    "malformed"), and nothing is logged for what a client did wrong (aiohttp's parse errors, an unreadable body, a
    closed connection); anything else aiohttp catches (a failure of the server's own) is still logged whole."""
    from aiohttp import http_exceptions, web

    client_faults = (http_exceptions.HttpProcessingError, web.RequestPayloadError, ConnectionError)

    class Connection(web.RequestHandler):
        def __init__(self, manager, metrics, **kwargs):
            super().__init__(manager, **kwargs)
            self.metrics = metrics

        def log_exception(self, *args, **kwargs):
            exc = kwargs.get("exc_info")
            if exc is True:
                exc = sys.exc_info()[1]
            if not isinstance(exc, client_faults):
                super().log_exception(*args, **kwargs)

        def handle_error(self, request, status=500, exc=None, message=None):
            if status >= 500:  # an exception escaped the app (its middleware answers every failure of its own)
                self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
                text = f"internal error: {reason(exc)}" if exc is not None else "internal error"
            else:
                text = f"malformed HTTP request: {_one_line(exc) if exc is not None else message}"
            self.metrics.requests[request.get("route", "malformed" if status < 500 else "other"), status] += 1
            if request.writer.output_size > 0:  # as aiohttp's: part of an answer went out, the connection is broken
                raise ConnectionError("Response is sent already, cannot send another response with the error")
            response = web.Response(status=status, body=json.dumps({"error": text}).encode(),
                                    content_type="application/json")
            response.force_close()
            return response

    return Connection


class _Refuse(asyncio.Protocol):
    """A connection over --max-connections: answered 503 at once, then closed (after the client has had a moment
    to read it: closing with its request unread would reset the connection and lose the answer)."""

    def __init__(self, answer: bytes):
        self.answer = answer

    def connection_made(self, transport):
        transport.write(self.answer)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data):
        pass  # the request is not read

    def eof_received(self):
        return False  # the transport closes


async def start(server: Server) -> Front:
    """Listen on --host/--port; a `Front` whose `stop()` stops listening and answers every request in flight."""
    from aiohttp import web

    config = server.config
    rest = Rest(server)
    # keepalive_timeout: a connection that has not sent a whole request (headers) within read_timeout, or sits
    # idle that long between requests, is closed (aiohttp's own default is an hour: slow-header clients could
    # hold every file descriptor).
    options = {"access_log": None, "keepalive_timeout": config.read_timeout}
    # handler_cancellation: a client that closes its connection cancels its handler, so its images are taken out
    # of the queue unrun (Server.predict withdraws them), as a gRPC call's are (aiohttp's default runs them).
    runner = web.AppRunner(rest.app(), shutdown_timeout=config.read_timeout + 60, handler_cancellation=True,
                           **options)
    await runner.setup()
    handlers = runner.server
    connection, loop = _connection_class(), asyncio.get_running_loop()
    server.metrics.connections["rest"] = lambda: len(handlers.connections)
    message = json.dumps({"error": f"too many connections: {config.max_connections} are open "
                                   "(--max-connections); retry shortly"}).encode()
    refusal = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(message), message))

    def factory():
        if len(handlers.connections) >= config.max_connections:
            server.metrics.refused_connections["rest"] += 1
            return _Refuse(refusal)
        return connection(handlers, server.metrics, loop=loop, **options)

    listening = await loop.create_server(factory, config.host, config.port, backlog=1024, reuse_address=True)

    async def stop():
        listening.close()
        await runner.cleanup()  # answer every request in flight, then close the connections

    return Front("rest", listening.sockets[0].getsockname()[:2], stop)
