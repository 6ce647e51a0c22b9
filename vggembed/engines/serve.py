"""`vggembed serve`: one warm network, one batching queue, fed by two protocols.

This module is the part both protocols share: the network (`Server.run_batch`), decoding and checking the
inputs, bounded admission, the `Batcher` (dynamic batching on one model thread), the model's description
(signatures, outputs), which model, version and label a request may name, the metrics, and the lifecycle
(listen, drain on SIGTERM, stop). Each protocol is a module beside it that turns its requests into
`Server.predict` calls and `Refused` into its own status codes:

- `serve_rest.py`: TensorFlow Serving's REST API over aiohttp (always on, `--port`);
- `serve_grpc.py`: TensorFlow Serving's gRPC API over grpcio (`--grpc-port`, off by default), on the messages
  of `serve_protos.py`.

Requests that arrive together, from either protocol, run as one batch (up to `batch_size`, waiting at most
`max_wait` for the batch to fill) on one model thread off the event loop; decoding (`images.decode.prepare`,
with the same structure and bomb checks as `embed`) runs on a pool of threads. A batch of n images runs as n
(one image alone costs one image), so a served row equals `embed`'s row for the same image bytes at the same
batch shape; with `fixed_batch` every batch is padded to `batch_size` (as `embed` pads, `engines.local.pad_to`),
so a row never depends on what shared its batch.

At most `queue_size` images are admitted and not yet running; past that a request is refused at once
(`Refused("busy")`: 503 with Retry-After, RESOURCE_EXHAUSTED), so load never builds an unbounded backlog. A
request whose client goes away (a gRPC deadline, a closed connection) before its images run takes them out of
the queue: they never run. SIGTERM (and SIGINT, SIGHUP) stops both listeners, runs what is waiting at once,
answers every request in flight and returns.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import resource
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import ImageError, VGGEmbedError
from ..images.decode import DEFAULT_MAX_PIXELS, prepare
from ..net.export import input_shape
from .local import compute

SIGNATURES = ("serving_default", "pixels")
INPUT_NAMES = {"serving_default": "images", "pixels": "pixels"}
PREDICT_METHOD = "tensorflow/serving/predict"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# TensorFlow's names for the dtypes a served array has (object: strings).
TF_DTYPES = {"float32": "DT_FLOAT", "float16": "DT_HALF", "int32": "DT_INT32", "object": "DT_STRING"}
GRPC_MAX_MESSAGE = 2**31 - 1  # TensorFlow Serving's receive limit (INT_MAX); --max-body sets ours


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8501
    name: str = "vggembed"
    batch_size: int = 16
    fixed_batch: bool = False  # pad every batch to batch_size: rows independent of what shared the batch
    max_wait: float = 0.005  # seconds a batch waits to fill
    queue_size: int = 64  # images admitted and not yet running
    max_body: int = 64 << 20  # REST body and gRPC message, bytes
    read_timeout: float = 30.0
    workers: int = 2  # decoding threads
    max_pixels: int = DEFAULT_MAX_PIXELS
    token: str | None = None
    grpc_port: int | None = None  # None: no gRPC listener
    max_connections: int = 1024  # per protocol: open connections beyond it are refused at once
    max_connection_age: float | None = None  # gRPC: seconds before a connection is asked to go away
    version: int = 1  # the one version served
    version_labels: tuple[str, ...] = ()  # labels naming it (TF Serving's version_labels)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Front:
    """A protocol listening, as `Server.serve` sees it: its name, where it listens, and `stop()` (a coroutine
    function: stop listening, answer every request in flight)."""

    protocol: str
    address: tuple
    stop: object


class Refused(Exception):
    """A request the server will not run, in words; `kind` says why, and each protocol maps it to its code:

    invalid (400, INVALID_ARGUMENT), not_found (404, NOT_FOUND), too_large (413, INVALID_ARGUMENT), busy (503 with
    Retry-After, RESOURCE_EXHAUSTED), unavailable (503, UNAVAILABLE), internal (500, INTERNAL)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


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
        self.requests = collections.Counter()  # (route, HTTP status)
        self.grpc_requests = collections.Counter()  # (method, gRPC code name)
        self.images = 0
        self.waiting = 0
        self.cancelled = 0  # images taken out of the queue because their client went away
        self.connections = {}  # protocol -> callable giving the open connections now
        self.refused_connections = collections.Counter()  # protocol -> connections refused over the cap
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.request_seconds = Histogram(SECONDS_BUCKETS)
        self.model_seconds = Histogram(SECONDS_BUCKETS)

    def render(self) -> str:
        lines = ["# HELP vggembed_requests_total HTTP requests by route and status code.",
                 "# TYPE vggembed_requests_total counter"]
        lines += [f'vggembed_requests_total{{route="{r}",code="{c}"}} {n}'
                  for (r, c), n in sorted(self.requests.items())]
        lines += ["# HELP vggembed_grpc_requests_total gRPC calls by method and status code.",
                  "# TYPE vggembed_grpc_requests_total counter"]
        lines += [f'vggembed_grpc_requests_total{{method="{m}",code="{c}"}} {n}'
                  for (m, c), n in sorted(self.grpc_requests.items())]
        errors = sum(n for (_, c), n in self.requests.items() if c >= 400)
        errors += sum(n for (_, c), n in self.grpc_requests.items() if c != "OK")
        lines += ["# HELP vggembed_errors_total Requests answered with an HTTP status of 400 or more (499: the "
                  "client closed its connection before its answer), or a gRPC code other than OK.",
                  "# TYPE vggembed_errors_total counter", f"vggembed_errors_total {errors}",
                  "# HELP vggembed_images_total Images run through the network.",
                  "# TYPE vggembed_images_total counter", f"vggembed_images_total {self.images}",
                  "# HELP vggembed_cancelled_images_total Images taken out of the queue unrun: their client went "
                  "away or its deadline passed.",
                  "# TYPE vggembed_cancelled_images_total counter",
                  f"vggembed_cancelled_images_total {self.cancelled}",
                  "# HELP vggembed_queue_images Images admitted and not yet running.",
                  "# TYPE vggembed_queue_images gauge", f"vggembed_queue_images {self.waiting}",
                  "# HELP vggembed_open_connections Connections open now, by protocol.",
                  "# TYPE vggembed_open_connections gauge"]
        lines += [f'vggembed_open_connections{{protocol="{p}"}} {count()}'
                  for p, count in sorted(self.connections.items())]
        lines += ["# HELP vggembed_refused_connections_total Connections refused over --max-connections.",
                  "# TYPE vggembed_refused_connections_total counter"]
        lines += [f'vggembed_refused_connections_total{{protocol="{p}"}} {n}'
                  for p, n in sorted(self.refused_connections.items())]
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

    def withdraw(self, futures) -> None:
        """Take the images of a request that went away out of the queue, unrun (those already running finish)."""
        gone = set(map(id, futures))
        kept = [t for t in self.pending if id(t[2]) not in gone]
        removed = len(self.pending) - len(kept)
        if removed:
            self.pending = collections.deque(kept)
            self.metrics.waiting -= removed
            self.metrics.cancelled += removed
            self.changed.set()
        for f in futures:
            f.cancel()

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
                while self.pending and len(self.pending) < self.batch_size and not self.draining:
                    left = deadline - loop.time()
                    if left <= 0 or not await self._changed(left):
                        break
                    if self.pending:
                        deadline = self.pending[0][0] + self.max_wait  # the first may have been withdrawn
                if not self.pending:
                    continue
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
    """The network, the queue and the lifecycle; `serve_rest` and `serve_grpc` speak to clients."""

    def __init__(self, vgg, recipe, config: Config, log=None):
        self.vgg, self.recipe, self.config = vgg, recipe, config
        self.shape = input_shape(vgg, recipe.resize)
        self.names = recipe.names  # embed's: each output's name, then top_index, top_prob, top_label
        self.outputs: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, shape of one row); warm_up
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
        """Build the graph (or the int8 model) before the first request; learn each output's dtype and shape."""
        out = self.run_batch(np.zeros((1, *self.shape), np.float32))
        self.outputs = {name: (out[name].dtype.name, tuple(out[name].shape[1:])) for name in self.names}

    # ------------------------------------------------------ what it is
    def check_model(self, name: str, version: int | None = None, label: str | None = None) -> None:
        """Refused('not_found') unless NAME (and VERSION or LABEL, when given) is what this server serves, in
        TensorFlow Serving's words."""
        if name != self.config.name:
            if version is not None:
                raise Refused("not_found", f"Servable not found for request: Specific({name}, {version})")
            raise Refused("not_found", f"Servable not found for request: Latest({name})")
        if version is not None and version != self.config.version:
            raise Refused("not_found", f"Servable not found for request: Specific({name}, {version}); this server "
                                       f"serves version {self.config.version}")
        if label is not None and label not in self.config.version_labels:
            have = ", ".join(self.config.version_labels) or "none (--version-label)"
            raise Refused("not_found", f"Unrecognized servable version label: {label}; labels here: {have}")

    @staticmethod
    def signature(name: str | None) -> str:
        """The signature a request names ('' or None: serving_default, as TensorFlow Serving)."""
        name = name or "serving_default"
        if name not in SIGNATURES:
            raise Refused("invalid", f"unknown signature_name {name!r}; this model has {', '.join(SIGNATURES)}")
        return name

    def check_outputs(self, wanted) -> list[str]:
        """The output names a request asks (all when none), each one this model has."""
        wanted = list(wanted) if wanted else list(self.names)
        unknown = [w for w in wanted if w not in self.names]
        if unknown:
            raise Refused("invalid", f"unknown output {unknown[0]!r}; this model has {', '.join(self.names)}")
        return wanted

    def signature_defs(self) -> dict:
        """TensorFlow Serving's SignatureDefMap in its JSON form: both signatures, their inputs and outputs."""

        def info(name, dtype, shape):
            return {"name": name, "dtype": dtype,
                    "tensor_shape": {"dim": [{"size": str(d)} for d in (-1, *shape)]}}

        outputs = {n: info(n, TF_DTYPES[dtype], shape) for n, (dtype, shape) in self.outputs.items()}
        return {"signature_def": {
            "serving_default": {"inputs": {"images": info("images", "DT_STRING", ())},
                                "outputs": outputs, "method_name": PREDICT_METHOD},
            "pixels": {"inputs": {"pixels": info("pixels", "DT_FLOAT", self.shape)},
                       "outputs": outputs, "method_name": PREDICT_METHOD}}}

    # ---------------------------------------------------------- inputs
    def _decode(self, i: int, data: bytes) -> np.ndarray:
        try:
            return prepare(data, resize_mode=self.recipe.resize, size=self.vgg.spec.input_size,
                           max_pixels=self.config.max_pixels, fast_decode=self.recipe.fast_decode)
        except ImageError as e:
            raise Refused("invalid", f"instance {i}: {e.problem}") from None

    def _pixels(self, i: int, value) -> np.ndarray:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # 1e39 becomes inf, refused below without a warning
                arr = np.asarray(value, np.float32)
        except (ValueError, TypeError, RecursionError):
            raise Refused("invalid", f"instance {i}: pixels must be nested lists of numbers") from None
        if arr.shape != self.shape:
            raise Refused("invalid", f"instance {i}: pixels have shape {list(arr.shape)}; expected "
                                     f"{list(self.shape)}")
        if not isinstance(value, np.ndarray):
            # numpy reads JSON's true/false as 1/0, a string such as "7" as 7 and null as NaN: only numbers are
            # pixels. (The shape is right, so every element is a scalar; one pass in C over them, ~10 ms.)
            kinds = set(map(type, np.asarray(value, object).ravel())) - {int, float}
            if kinds:
                names = sorted({bool: "true/false", str: "strings", type(None): "null"}.get(k, k.__name__)
                               for k in kinds)
                raise Refused("invalid", f"instance {i}: pixels must be numbers, not {', '.join(names)}")
        if not np.isfinite(arr).all():
            raise Refused("invalid", f"instance {i}: pixels contain NaN, infinity or values beyond float32's range")
        return arr

    def _prepare_all(self, signature: str, items: list) -> np.ndarray:
        """Decode or check every instance (on a decoding thread); the first bad one is the error."""
        if signature == "pixels":
            return np.stack([self._pixels(i, v) for i, v in enumerate(items)])
        return np.stack([self._decode(i, v) for i, v in enumerate(items)]).astype(np.float32, copy=False)

    # -------------------------------------------------------- the queue
    def check_count(self, n: int) -> None:
        """Refused('too_large') when one request holds more instances than can ever be admitted. A protocol that
        learns N from a declared shape (gRPC's tensor_shape) calls it before building anything of that size."""
        if n > self.config.queue_size:
            raise Refused("too_large", f"{n} instances in one request; this server takes at most "
                                       f"{self.config.queue_size} (--queue-size)")

    async def predict(self, signature: str, items: list) -> list[dict]:
        """Admit, prepare and batch `items` (encoded images for serving_default, pixel arrays for pixels); one
        {output: array} per instance. A cancelled caller takes its images out of the queue."""
        n = len(items)
        self.check_count(n)
        if self.batcher is None or self.batcher.closing:
            raise Refused("unavailable", "shutting down")  # not reached while requests are in flight
        if self.metrics.waiting + n > self.config.queue_size:
            raise Refused("busy", f"busy: {self.metrics.waiting} images waiting, --queue-size "
                                  f"{self.config.queue_size}; retry shortly")
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
                self.batcher.withdraw(futures)
                raise
        except VGGEmbedError as e:
            raise Refused("internal", str(e)) from None
        except asyncio.CancelledError:
            if not submitted:  # the client went away while its images were decoded: they never run either
                self.metrics.cancelled += n
            raise
        finally:
            if not submitted:
                self.metrics.waiting -= n

    # ---------------------------------------------------------- running
    def _room_for_connections(self, protocols: int) -> None:
        """Raise the open-file limit so --max-connections per protocol fits (the soft limit is often 1024)."""
        need = self.config.max_connections * protocols + 256
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            new = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            if new < need:
                self.log(f"vggembed: open files are limited to {new} (ulimit -Hn): fewer than --max-connections "
                         f"{self.config.max_connections} may be open at once")

    async def serve(self, protocols, ready=None) -> str:
        """Listen with each of `protocols` (each a coroutine function `start(server)` -> `Front`: `serve_rest.start`,
        `serve_grpc.start`) until SIGTERM/SIGINT/SIGHUP (those not ignored); then drain and return the signal's
        name. `ready` gets {protocol: (host, port)} once all listen."""
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
        self._room_for_connections(len(protocols))
        self.batcher = Batcher(self.run_batch, self.config.batch_size, self.config.max_wait, self.metrics)
        batching = asyncio.create_task(self.batcher.run())
        fronts = []
        try:
            try:
                for start in protocols:
                    fronts.append(await start(self))
            except BaseException:
                await asyncio.gather(*(f.stop() for f in fronts))  # one could not listen: neither serves
                raise
            if ready is not None:
                ready({f.protocol: f.address for f in fronts})
            await stop.wait()
            self.batcher.drain()  # what waits runs now, and what requests in flight still submit
            # Both stop listening at once and answer every request in flight.
            await asyncio.gather(*(f.stop() for f in fronts))
        finally:
            self.batcher.close()
            await batching
            self.decoders.shutdown(wait=True)
            for sig in signals:
                loop.remove_signal_handler(sig)
        return signal.Signals(received[0]).name if received else "stop"


def run(server: Server, protocols, ready=None) -> str:
    return asyncio.run(server.serve(protocols, ready))
