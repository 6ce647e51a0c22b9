"""`vggembed serve`: a warm network behind HTTP, speaking TensorFlow Serving's REST predict API.

- `POST /v1/models/NAME:predict` (also `/v1/models/NAME/versions/1:predict`):
  `{"instances": [{"b64": "..."}, ...]}` (row format) or `{"inputs": [...]}`
  (columnar), optional `"signature_name"` (`serving_default`: encoded images;
  `pixels`: 224x224x3 RGB lists in 0..255) and `"output_filter"` (names to
  return). The answer is TensorFlow Serving's: `{"predictions": [...]}` for
  rows, `{"outputs": ...}` for columns; with one output each instance is its
  value, with several an object of named outputs. Errors are
  `{"error": "..."}` naming the instance.
- `GET /v1/models/NAME`: TensorFlow Serving's status document.
- `POST /embed`: one raw image body; answers one object of named outputs.
- `GET /metrics`: Prometheus text (requests by route and code, images,
  batch sizes, request and model latency, images waiting).

Requests that arrive together run as one batch (`Batcher`: up to
`batch_size`, waiting at most `max_wait` for the batch to fill) on one model
thread off the event loop; decoding (`images.decode.prepare`, with the same
structure and bomb checks as `embed`) runs on a pool of threads. A batch of n
images runs as n (one image alone costs one image), so a served row equals
`embed`'s row for the same image bytes at the same batch shape; with
`fixed_batch` every batch is padded to `batch_size` (as `embed` pads,
`engines.local.pad_to`), so a row never depends on what shared its batch.

At most `queue_size` images are admitted and not yet running; past that a
request is refused at once with 503 and `Retry-After`, so load never builds an
unbounded backlog. Bodies are read asynchronously (a slow client holds a
connection, never the model or a decoding thread) with `read_timeout`, and
above `max_body` bytes refused with 413; a connection that sends no whole
request head within `read_timeout`, or idles that long, is closed. SIGTERM (and SIGINT, SIGHUP) stops
listening, runs what is waiting at once, answers every request in flight and
returns.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import hmac
import ipaddress
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import ImageError, VGGEmbedError, reason
from ..images.decode import DEFAULT_MAX_PIXELS, prepare
from ..net.export import input_shape
from .local import compute

SIGNATURES = ("serving_default", "pixels")
INPUT_NAMES = {"serving_default": "images", "pixels": "pixels"}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8501
    name: str = "vggembed"
    batch_size: int = 16
    fixed_batch: bool = False  # pad every batch to batch_size: rows independent of what shared the batch
    max_wait: float = 0.005  # seconds a batch waits to fill
    queue_size: int = 64  # images admitted and not yet running
    max_body: int = 64 << 20
    read_timeout: float = 30.0
    workers: int = 2  # decoding threads
    max_pixels: int = DEFAULT_MAX_PIXELS
    token: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPError(Exception):
    """An answer other than 200: status, one-line message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ------------------------------------------------------------------ metrics
class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """Counters and histograms, written in Prometheus' text format (no dependency)."""

    def __init__(self):
        self.requests = collections.Counter()  # (route, code)
        self.images = 0
        self.waiting = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.request_seconds = Histogram(SECONDS_BUCKETS)
        self.model_seconds = Histogram(SECONDS_BUCKETS)

    def render(self) -> str:
        lines = ["# HELP vggembed_requests_total HTTP requests by route and status code.",
                 "# TYPE vggembed_requests_total counter"]
        lines += [f'vggembed_requests_total{{route="{r}",code="{c}"}} {n}'
                  for (r, c), n in sorted(self.requests.items())]
        errors = sum(n for (_, c), n in self.requests.items() if c >= 400)
        lines += ["# HELP vggembed_errors_total Requests answered with a status of 400 or more.",
                  "# TYPE vggembed_errors_total counter", f"vggembed_errors_total {errors}",
                  "# HELP vggembed_images_total Images run through the network.",
                  "# TYPE vggembed_images_total counter", f"vggembed_images_total {self.images}",
                  "# HELP vggembed_queue_images Images admitted and not yet running.",
                  "# TYPE vggembed_queue_images gauge", f"vggembed_queue_images {self.waiting}"]
        for name, hist, text in (("vggembed_batch_size", self.batch_size, "Images per model batch."),
                                 ("vggembed_request_seconds", self.request_seconds, "Predict/embed latency."),
                                 ("vggembed_model_seconds", self.model_seconds, "Model time per batch.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"] + hist.lines(name)
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ batcher
class Batcher:
    """Dynamic batching: images from many requests run as one batch on the model thread."""

    def __init__(self, run_batch, batch_size: int, max_wait: float, metrics: Metrics):
        self.run_batch, self.batch_size, self.max_wait, self.metrics = run_batch, batch_size, max_wait, metrics
        self.pending: collections.deque = collections.deque()  # (arrival, array, future)
        self.changed = asyncio.Event()
        self.draining = False  # run what arrives at once, without waiting for a batch to fill
        self.closing = False  # and stop once nothing waits
        self.model = ThreadPoolExecutor(1, thread_name_prefix="vggembed-model")

    def submit(self, arrays) -> list:
        loop = asyncio.get_running_loop()
        futures = []
        for a in arrays:
            f = loop.create_future()
            self.pending.append((loop.time(), a, f))
            futures.append(f)
        self.changed.set()
        return futures

    def drain(self) -> None:
        """Run what is waiting, and whatever requests in flight still bring, at once."""
        self.draining = True
        self.changed.set()

    def close(self) -> None:
        """Stop once nothing waits (after every request in flight was answered)."""
        self.draining = self.closing = True
        self.changed.set()

    async def _changed(self, timeout: float | None) -> bool:
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self.pending:
                    if self.closing:
                        return
                    await self._changed(None)
                deadline = self.pending[0][0] + self.max_wait
                while len(self.pending) < self.batch_size and not self.draining:
                    left = deadline - loop.time()
                    if left <= 0 or not await self._changed(left):
                        break
                take = [self.pending.popleft() for _ in range(min(self.batch_size, len(self.pending)))]
                self.metrics.waiting -= len(take)
                take = [t for t in take if not t[2].done()]  # a client that went away
                if not take:
                    continue
                self.metrics.batch_size.observe(len(take))
                start = time.perf_counter()
                try:
                    out = await loop.run_in_executor(self.model, self.run_batch, np.stack([t[1] for t in take]))
                except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                    for t in take:
                        if not t[2].done():
                            t[2].set_exception(e)
                    continue
                self.metrics.model_seconds.observe(time.perf_counter() - start)
                self.metrics.images += len(take)
                for i, t in enumerate(take):
                    if not t[2].done():
                        t[2].set_result({k: v[i] for k, v in out.items()})
        finally:
            self.model.shutdown(wait=True)


# ------------------------------------------------------------------- server
class Server:
    def __init__(self, vgg, recipe, config: Config, log=None):
        self.vgg, self.recipe, self.config = vgg, recipe, config
        self.shape = input_shape(vgg, recipe.resize)
        self.names = recipe.names  # embed's: each output's name, then top_index, top_prob, top_label
        self.metrics = Metrics()
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.decoders = ThreadPoolExecutor(config.workers, thread_name_prefix="vggembed-decode")
        self.batcher: Batcher | None = None

    # --------------------------------------------------------- the model
    def run_batch(self, batch: np.ndarray) -> dict:
        """One batch through the network (on the model thread), padded to the batch size with `fixed_batch`:
        `embed`'s arrays (`local.compute`, one pass), vectors in the recipe's dtype, and the top-K labels."""
        recipe = self.recipe
        out = compute(self.vgg, batch, recipe, self.config.batch_size if self.config.fixed_batch else None)
        for o in recipe.outputs:
            out[o.name] = out[o.name].astype(recipe.dtype, copy=False)
        if recipe.top:
            out["top_label"] = np.array([[self.vgg.label(int(i)) for i in row] for row in out["top_index"]],
                                        object).reshape(len(batch), recipe.top)
        return out

    def warm_up(self) -> None:
        """Build the graph (or the int8 model) before the first request."""
        self.run_batch(np.zeros((1, *self.shape), np.float32))

    def _decode(self, i: int, data: bytes) -> np.ndarray:
        try:
            return prepare(data, resize_mode=self.recipe.resize, size=self.vgg.spec.input_size,
                           max_pixels=self.config.max_pixels, fast_decode=self.recipe.fast_decode)
        except ImageError as e:
            raise HTTPError(400, f"instance {i}: {e.problem}") from None

    def _pixels(self, i: int, value) -> np.ndarray:
        try:
            arr = np.asarray(value, np.float32)
        except (ValueError, TypeError):
            raise HTTPError(400, f"instance {i}: pixels must be nested lists of numbers") from None
        if arr.shape != self.shape:
            raise HTTPError(400, f"instance {i}: pixels have shape {list(arr.shape)}; expected {list(self.shape)}")
        if not np.isfinite(arr).all():
            raise HTTPError(400, f"instance {i}: pixels contain NaN or infinite values")
        return arr

    def _prepare_all(self, signature: str, items: list) -> np.ndarray:
        """Decode or check every instance (on a decoding thread); the first bad one is the error."""
        if signature == "pixels":
            return np.stack([self._pixels(i, v) for i, v in enumerate(items)])
        return np.stack([self._decode(i, v) for i, v in enumerate(items)]).astype(np.float32, copy=False)

    async def _predict(self, signature: str, items: list) -> list[dict]:
        """Admit, prepare and batch `items`; one {output: array} per instance."""
        n = len(items)
        if n > self.config.queue_size:
            raise HTTPError(413, f"{n} instances in one request; this server takes at most {self.config.queue_size} "
                                 "(--queue-size)")
        if self.batcher is None or self.batcher.closing:
            raise HTTPError(503, "shutting down", {"Retry-After": "1"})  # not reached while requests are in flight
        if self.metrics.waiting + n > self.config.queue_size:
            raise HTTPError(503, f"busy: {self.metrics.waiting} images waiting; retry shortly",
                            {"Retry-After": "1"})
        self.metrics.waiting += n
        submitted = False
        try:
            loop = asyncio.get_running_loop()
            batch = await loop.run_in_executor(self.decoders, self._prepare_all, signature, items)
            futures = self.batcher.submit(list(batch))
            submitted = True
            try:
                return list(await asyncio.gather(*futures))
            except asyncio.CancelledError:
                for f in futures:
                    f.cancel()
                raise
        except VGGEmbedError as e:
            raise HTTPError(500, str(e)) from None
        finally:
            if not submitted:
                self.metrics.waiting -= n

    # ------------------------------------------------------- parsing
    def _parse(self, body: bytes) -> tuple[str, list, bool, list[str]]:
        """(signature, instances, row format?, output names) from a predict body."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"body is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise HTTPError(400, "body must be a JSON object with \"instances\" or \"inputs\"")
        signature = doc.get("signature_name", "serving_default")
        if signature not in SIGNATURES:
            raise HTTPError(400, f"unknown signature_name {signature!r}; this model has {', '.join(SIGNATURES)}")
        if ("instances" in doc) == ("inputs" in doc):
            raise HTTPError(400, "body must have exactly one of \"instances\" (rows) or \"inputs\" (columns)")
        row = "instances" in doc
        wanted = doc.get("output_filter", self.names)
        if not isinstance(wanted, list) or not wanted or not all(isinstance(w, str) for w in wanted):
            raise HTTPError(400, "output_filter must be a non-empty list of output names")
        unknown = [w for w in wanted if w not in self.names]
        if unknown:
            raise HTTPError(400, f"unknown output {unknown[0]!r}; this model has {', '.join(self.names)}")
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

    def _instance(self, i: int, value, key: str, signature: str, row: bool):
        if row and isinstance(value, dict) and set(value) == {key}:
            value = value[key]
        if signature == "pixels":
            return value
        if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
            raise HTTPError(400, f'instance {i}: an image must be {{"b64": "<base64 of the file>"}}')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise HTTPError(400, f"instance {i}: bad base64: {e}") from None

    @staticmethod
    def _json_value(v):
        return v.tolist() if isinstance(v, np.ndarray) else v

    def answer(self, results: list[dict], row: bool, wanted: list[str]) -> bytes:
        if row:
            if len(wanted) == 1:
                preds = [self._json_value(r[wanted[0]]) for r in results]
            else:
                preds = [{w: self._json_value(r[w]) for w in wanted} for r in results]
            return json.dumps({"predictions": preds}).encode()
        cols = {w: [self._json_value(r[w]) for r in results] for w in wanted}
        return json.dumps({"outputs": cols[wanted[0]] if len(wanted) == 1 else cols}).encode()

    # ---------------------------------------------------------- routes
    async def predict(self, request, body: bytes):
        name = request.match_info["name"]
        self._check_name(name)
        loop = asyncio.get_running_loop()
        signature, items, row, wanted = await loop.run_in_executor(self.decoders, self._parse, body)
        results = await self._predict(signature, items)
        return await loop.run_in_executor(self.decoders, self.answer, results, row, wanted)

    async def embed(self, request, body: bytes):
        if not body:
            raise HTTPError(400, "instance 0: empty body; POST the image file's bytes")
        results = await self._predict("serving_default", [body])
        return json.dumps({w: self._json_value(results[0][w]) for w in self.names}).encode()

    def _check_name(self, name: str) -> None:
        if name != self.config.name:
            raise HTTPError(404, f"Servable not found for request: Latest({name})")

    def status(self, name: str) -> bytes:
        self._check_name(name)
        return json.dumps({"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}).encode()

    # ------------------------------------------------------------ app
    def app(self):
        from aiohttp import web

        routes = [("POST", r"/v1/models/{name:[^/:]+}:predict", "predict", self.predict),
                  ("POST", r"/v1/models/{name:[^/:]+}/versions/1:predict", "predict", self.predict),
                  ("POST", "/embed", "embed", self.embed)]
        app = web.Application(client_max_size=self.config.max_body, middlewares=[self._middleware])
        for method, path, route, handler in routes:
            app.router.add_route(method, path, functools.partial(self._with_body, route, handler))
        app.router.add_get(r"/v1/models/{name:[^/:]+}", self._status)
        app.router.add_get(r"/v1/models/{name:[^/:]+}/versions/1", self._status)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _with_body(self, route, handler, request):
        from aiohttp import web

        request["route"] = route
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
        out = await handler(request, body)
        self.metrics.request_seconds.observe(time.perf_counter() - start)
        return web.Response(body=out, content_type="application/json")

    async def _status(self, request):
        from aiohttp import web

        request["route"] = "status"
        return web.Response(body=self.status(request.match_info["name"]), content_type="application/json")

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
                response = await handler(request)
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
            finally:
                self.metrics.requests[request.get("route", "other"), status] += 1
            return web.Response(body=json.dumps({"error": message}).encode(), status=status,
                                content_type="application/json", headers=headers)

        return middleware

    # ---------------------------------------------------------- running
    async def serve(self, ready=None) -> str:
        """Listen until SIGTERM/SIGINT/SIGHUP (those not ignored); then drain and return the signal's name."""
        from aiohttp import web

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        received = []

        def on_signal(sig):
            received.append(sig)
            stop.set()

        # A signal the process was started with ignored stays ignored: `nohup vggembed serve &` outlives the
        # terminal that started it, as `embed` does (cli/process.py).
        signals = [sig for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                   if signal.getsignal(sig) is not signal.SIG_IGN]
        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        self.batcher = Batcher(self.run_batch, self.config.batch_size, self.config.max_wait, self.metrics)
        batching = asyncio.create_task(self.batcher.run())
        # keepalive_timeout: a connection that has not sent a whole request (headers) within read_timeout, or
        # sits idle that long between requests, is closed (aiohttp's own default is an hour: slow-header
        # clients could hold every file descriptor).
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=self.config.read_timeout + 60,
                               keepalive_timeout=self.config.read_timeout)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port, backlog=1024)
            await site.start()
            if ready is not None:
                ready(runner.addresses[0][:2])
            await stop.wait()
            self.batcher.drain()  # what waits runs now, and what requests in flight still submit
            await runner.cleanup()  # stop listening; answer every request in flight
        finally:
            self.batcher.close()
            await batching
            self.decoders.shutdown(wait=True)
            for sig in signals:
                loop.remove_signal_handler(sig)
        return signal.Signals(received[0]).name if received else "stop"


def run(server: Server, ready=None) -> str:
    return asyncio.run(server.serve(ready))

