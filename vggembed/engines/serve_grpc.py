"""`vggembed serve --grpc-port`: TensorFlow Serving's gRPC API over grpcio, feeding `serve.Server`'s one queue.

Wire-compatible with the official `tensorflow-serving-api` client (`PredictionServiceStub(channel).Predict`),
on the messages of `serve_protos.py`:

- `tensorflow.serving.PredictionService/Predict`: `model_spec` (name; version or version_label; signature_name,
  '' being serving_default, echoed resolved in the response), one input: `images` (DT_STRING, encoded image
  files) for serving_default, `pixels` (DT_FLOAT [N, 224, 224, 3] in `float_val` or `tensor_content`) for
  pixels; `output_filter`. Outputs are tensors [N, ...] as `embed` computes them (numbers in
  `tensor_content`, labels in `string_val`).
- `PredictionService/GetModelMetadata` (`metadata_field: "signature_def"`): the SignatureDefMap, packed in Any.
- `tensorflow.serving.ModelService/GetModelStatus`: one version, AVAILABLE.
- `Classify`, `Regress`, `MultiInference`, `HandleReloadConfigRequest`: UNIMPLEMENTED, in words.

Codes: INVALID_ARGUMENT (a bad request or image, named), NOT_FOUND (another model name, version or label),
RESOURCE_EXHAUSTED (the queue is full, in words), UNAUTHENTICATED (with --token, a call without
`authorization: Bearer TOKEN` metadata), UNAVAILABLE (shutting down). A call whose deadline passes, or whose
client cancels, before its images run takes them out of the queue: they never run. Messages up to `--max-body`
bytes are received; connections beyond `--max-connections` are refused, ones idle or not finishing their
handshake within `--read-timeout` are closed, and with `--max-connection-age` each is asked to go away after
that many seconds (clients reconnect: a load balancer can then spread them).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio

from ..errors import reason
from . import serve_protos as pb
from .serve import INPUT_NAMES, TF_DTYPES, Front, Refused, Server

CODES = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "not_found": grpc.StatusCode.NOT_FOUND,
         "too_large": grpc.StatusCode.INVALID_ARGUMENT, "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
         "unavailable": grpc.StatusCode.UNAVAILABLE, "internal": grpc.StatusCode.INTERNAL}
DTYPE_NUMBERS = {name: pb.DATA_TYPES[tf] for name, tf in TF_DTYPES.items()}


class _Abort(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> _Abort:
    return _Abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class Grpc:
    def __init__(self, server: Server):
        self.server, self.config, self.metrics = server, server.config, server.metrics

    # ---------------------------------------------------------- plumbing
    def _authorized(self, context) -> bool:
        if self.config.token is None:
            return True
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.config.token}".encode())

    def _method(self, name: str, request_class, handler):
        """A unary handler: the token, the request parsed here (so bad bytes are INVALID_ARGUMENT, not grpcio's
        INTERNAL), Refused mapped to its code in words, every call counted."""

        async def call(raw: bytes, context):
            code = grpc.StatusCode.OK
            start = time.perf_counter()
            try:
                if not self._authorized(context):
                    raise _Abort(grpc.StatusCode.UNAUTHENTICATED,
                                 "missing or wrong bearer token (metadata authorization: Bearer TOKEN)")
                if request_class is None:
                    raise _Abort(grpc.StatusCode.UNIMPLEMENTED, handler)
                try:
                    request = request_class.FromString(raw)
                except (DecodeError, RecursionError) as e:
                    raise _invalid(f"the request is not a {request_class.DESCRIPTOR.name}: {e}") from None
                try:
                    answer = await handler(request, context)
                except Refused as e:
                    raise _Abort(CODES[e.kind], e.message) from None
                if name == "Predict":
                    self.metrics.request_seconds.observe(time.perf_counter() - start)
                return answer
            except _Abort as e:
                code = e.code
                await context.abort(e.code, e.message)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # the deadline passed or the client went away
                raise
            except Exception as e:  # noqa: BLE001 - a failure in the model (TensorFlow's own kinds): one line
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, f"internal error: {reason(e)}")
            finally:
                self.metrics.grpc_requests[name, code.name] += 1

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None,
                                                   response_serializer=lambda m: m.SerializeToString())

    def _spec(self, spec) -> None:
        version = spec.version.value if spec.HasField("version") else None
        label = spec.version_label or None
        if version is not None and label is not None:
            raise _invalid("model_spec has both version and version_label; give one")
        self.server.check_model(spec.name, version, label)

    def _echo(self, response_spec, name: str, signature: str = "") -> None:
        response_spec.name = name
        response_spec.version.value = self.config.version
        response_spec.signature_name = signature

    # ---------------------------------------------------------- inputs
    def _items(self, signature: str, request) -> list:
        key = INPUT_NAMES[signature]
        names = sorted(request.inputs)
        if names != [key]:
            raise _invalid(f"signature {signature} takes one input, {key!r}; the request has "
                           f"{', '.join(map(repr, names)) or 'none'}")
        t = request.inputs[key]
        dims = [d.size for d in t.tensor_shape.dim]
        if signature == "serving_default":
            if t.dtype != pb.DATA_TYPES["DT_STRING"]:
                raise _invalid(f"input {key!r} must be DT_STRING (encoded image files), not dtype {t.dtype}")
            items = list(t.string_val)
            if len(dims) > 1 or (dims and dims[0] != len(items)):
                raise _invalid(f"input {key!r} has shape {dims} but holds {len(items)} strings; expected [N]")
            if not items:
                raise _invalid(f"input {key!r} holds no images")
            return items
        return self._pixels(key, t, dims)

    def _pixels(self, key: str, t, dims: list[int]) -> list:
        """The N arrays of a pixels tensor. The declared shape is checked first, N against --queue-size included,
        so a small message declaring a huge shape is refused before anything of that size is built; the sizes are
        Python integers (numpy's int64 product of a shape such as [2**62, 224, 224, 3] wraps around)."""
        shape = list(self.server.shape)
        if len(dims) != 4 or dims[1:] != shape or dims[0] < 1:
            raise _invalid(f"input {key!r} has shape {dims}; expected [N, {', '.join(map(str, shape))}]")
        self.server.check_count(dims[0])
        dtypes = {pb.DATA_TYPES["DT_FLOAT"]: ("<f4", "float_val"), pb.DATA_TYPES["DT_DOUBLE"]: ("<f8", "double_val")}
        if t.dtype not in dtypes:
            raise _invalid(f"input {key!r} must be DT_FLOAT (or DT_DOUBLE) RGB pixels in 0..255, not dtype {t.dtype}")
        dtype, field = dtypes[t.dtype]
        count = dims[0] * math.prod(shape)  # at most --queue-size images' worth
        if t.tensor_content:
            if len(t.tensor_content) != count * np.dtype(dtype).itemsize:
                raise _invalid(f"input {key!r}: tensor_content has {len(t.tensor_content)} bytes; shape {dims} "
                               f"needs {count * np.dtype(dtype).itemsize}")
            values = np.frombuffer(t.tensor_content, dtype)
        else:
            values = np.asarray(getattr(t, field), dtype)
            if len(values) != 1 and len(values) != count:
                raise _invalid(f"input {key!r}: {field} has {len(values)} values; shape {dims} needs {count}")
        with np.errstate(over="ignore", invalid="ignore"):  # doubles beyond float32: inf, refused as such later
            values = values.astype(np.float32, copy=False)
        if len(values) == 1 and count > 1:
            # One value fills the tensor, as TensorFlow reads a TensorProto (tensor.cc, FromProtoField: values
            # short of the shape repeat the last). A read-only view: nothing of the tensor's size is built here,
            # on the event loop; the decoding thread builds the batch from it (--queue-size images at most).
            arr = np.broadcast_to(values[0], dims)
        else:
            arr = values.reshape(dims)
        return list(arr)

    @staticmethod
    def _tensor(values: list) -> object:
        arr = np.stack(values) if values and isinstance(values[0], np.ndarray) else np.asarray(values)
        t = pb.TensorProto()
        for d in arr.shape:
            t.tensor_shape.dim.add(size=d)
        if arr.dtype == object:
            t.dtype = pb.DATA_TYPES["DT_STRING"]
            t.string_val.extend(str(v).encode() for v in arr.reshape(-1))
        else:
            t.dtype = DTYPE_NUMBERS[arr.dtype.name]
            t.tensor_content = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        return t

    # ---------------------------------------------------------- methods
    async def predict(self, request, context):
        self._spec(request.model_spec)
        signature = self.server.signature(request.model_spec.signature_name)
        wanted = self.server.check_outputs(request.output_filter)
        items = self._items(signature, request)
        if context.time_remaining() is not None and context.time_remaining() <= 0:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the images were run")
        results = await self.server.predict(signature, items)
        response = pb.PredictResponse()
        self._echo(response.model_spec, request.model_spec.name, signature)
        for w in wanted:
            response.outputs[w].CopyFrom(self._tensor([r[w] for r in results]))
        return response

    async def metadata(self, request, context):
        self._spec(request.model_spec)
        fields = list(request.metadata_field)
        if not fields:
            raise _invalid("GetModelMetadataRequest must name a metadata_field: signature_def")
        other = [f for f in fields if f != "signature_def"]
        if other:
            raise _invalid(f"metadata_field {other[0]!r} is not served; this server has signature_def")
        response = pb.GetModelMetadataResponse()
        self._echo(response.model_spec, request.model_spec.name)
        defs = json_format.ParseDict(self.server.signature_defs(), pb.SignatureDefMap())
        packed = response.metadata["signature_def"]
        packed.type_url = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
        packed.value = defs.SerializeToString()
        return response

    async def status(self, request, context):
        self._spec(request.model_spec)
        response = pb.GetModelStatusResponse()
        response.model_version_status.add(version=self.config.version, state=pb.AVAILABLE)
        return response

    def handlers(self):
        unimplemented = ("{} is not served: this model has one predict signature per input kind (serving_default: "
                         "encoded images, pixels: float RGB); use Predict")
        prediction = {
            "Predict": self._method("Predict", pb.PredictRequest, self.predict),
            "GetModelMetadata": self._method("GetModelMetadata", pb.GetModelMetadataRequest, self.metadata),
            **{m: self._method(m, None, unimplemented.format(m)) for m in ("Classify", "Regress", "MultiInference")},
        }
        model = {
            "GetModelStatus": self._method("GetModelStatus", pb.GetModelStatusRequest, self.status),
            "HandleReloadConfigRequest": self._method(
                "HandleReloadConfigRequest", None,
                "HandleReloadConfigRequest is not served: vggembed serve runs the one model it was started with"),
        }
        return (grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", prediction),
                grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", model))


async def start(server: Server) -> Front:
    """Listen on --host/--grpc-port; a `Front` whose `stop()` stops listening and answers every call in flight."""
    config = server.config
    options = [
        ("grpc.max_receive_message_length", config.max_body),
        ("grpc.max_send_message_length", -1),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        # Calls at once on one connection (HTTP/2's usual floor): more wait in the client's transport, so one
        # connection cannot hold an unbounded number of messages in the server.
        ("grpc.max_concurrent_streams", 100),
        ("grpc.max_connection_idle_ms", int(config.read_timeout * 1000)),
        ("grpc.server_handshake_timeout_ms", int(config.read_timeout * 1000)),
        ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent share
    ]
    if config.max_connection_age is not None:
        options += [("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
                    ("grpc.max_connection_age_grace_ms", int((config.read_timeout + 60) * 1000))]
    listening = aio.server(options=options)
    listening.add_generic_rpc_handlers(Grpc(server).handlers())
    host = f"[{config.host}]" if ":" in config.host else config.host
    try:
        port = listening.add_insecure_port(f"{host}:{config.grpc_port}")
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(0, "the gRPC port could not be bound (in use, or not allowed)")
    await listening.start()

    async def stop():
        await listening.stop(config.read_timeout + 60)  # no new calls; those in flight are answered

    return Front("grpc", (config.host, port), stop)
