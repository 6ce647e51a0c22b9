"""vggembed serve --grpc-port, started for real on loopback and spoken to with the official tensorflow-serving-api
client, unchanged: Predict, GetModelMetadata, GetModelStatus, the error codes, deadlines, the queue shared with
REST, SIGTERM; and the server under 1,000 idle connections and slowloris clients on both APIs."""

from __future__ import annotations

import contextlib
import io
import resource
import signal
import socket
import threading

import numpy as np
import pytest

requests = pytest.importorskip("requests")
grpc = pytest.importorskip("grpc")
pytest.importorskip("tensorflow_serving.apis.predict_pb2")

import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from vggembed.images.decode import prepare  # noqa: E402

from .test_serve import HANG_GUARD, b64, serve  # noqa: E402


@contextlib.contextmanager
def serve_grpc(weights, *args, token=None):
    with serve(weights, "--grpc-port", "0", *args, token=token) as s:
        assert s.grpc_bound.wait(HANG_GUARD) and s.grpc_port, s.stderr()[-3000:]
        channel = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}")
        s.stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        s.models = model_service_pb2_grpc.ModelServiceStub(channel)
        s.auth = [("authorization", f"Bearer {token}")] if token else None
        try:
            yield s
        finally:
            channel.close()


def images_request(datas, name="vggembed", **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for k, v in spec.items():
        if k == "version":
            request.model_spec.version.value = v
        else:
            setattr(request.model_spec, k, v)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(datas, shape=[len(datas)]))
    return request


def code_of(call) -> tuple:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_predict_equals_rest_and_embed_and_metadata_names_everything(tiny16, tiny_model, photos, tmp_path):
    # --max-connection-age 1: every connection is asked to go away after a second; the client reconnects on its
    # own, so every call below (over several seconds, on one channel) is answered.
    with serve_grpc(tiny16, "--batch-size", "4", "--fixed-batch", "--layer", "fc2,pool5:avg", "--top", "3",
                    "--version-label", "stable", "--max-connection-age", "1") as s:
        assert goaway_after_connecting(s.grpc_port) == 0  # NO_ERROR: going away for its age, not for a fault
        datas = [p.read_bytes() for p in photos]
        answer = s.stub.Predict(images_request(datas), HANG_GUARD)
        # An empty signature_name is serving_default, echoed resolved, with the version served.
        assert answer.model_spec.name == "vggembed" and answer.model_spec.signature_name == "serving_default"
        assert answer.model_spec.version.value == 1
        out = {k: tf.make_ndarray(v) for k, v in answer.outputs.items()}
        assert set(out) == {"fc2", "pool5_avg", "top_index", "top_prob", "top_label"}
        fc2 = tiny_model.embed([str(p) for p in photos], "fc2", batch_size=4)
        pool5 = tiny_model.embed([str(p) for p in photos], "pool5", pool="avg", batch_size=4)
        assert out["fc2"].dtype == np.float32 and np.array_equal(out["fc2"], fc2)
        assert np.array_equal(out["pool5_avg"], pool5)
        tops = tiny_model.classify([str(p) for p in photos], top=3, batch_size=4)
        assert out["top_label"].tolist() == [[t.label.encode() for t in row] for row in tops]
        assert out["top_index"].tolist() == [[t.index for t in row] for row in tops]
        rest = s.predict({"instances": [b64(p) for p in photos], "output_filter": ["fc2"]}).json()["predictions"]
        assert np.array_equal(np.array(rest, np.float32), out["fc2"])
        # model_spec: version 1 or the label given; output_filter.
        one = s.stub.Predict(images_request(datas[1:2], version=1, signature_name="serving_default"), HANG_GUARD)
        assert np.array_equal(tf.make_ndarray(one.outputs["fc2"]), fc2[1:2])
        labelled = images_request(datas[2:3], version_label="stable")
        labelled.output_filter.append("pool5_avg")
        only = s.stub.Predict(labelled, HANG_GUARD)
        assert list(only.outputs) == ["pool5_avg"] and np.array_equal(tf.make_ndarray(only.outputs["pool5_avg"]),
                                                                      pool5[2:3])
        # The pixels signature: float RGB in tensor_content (make_tensor_proto) or in float_val.
        pixels = prepare(str(photos[3])).astype(np.float32)[None]
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "vggembed", "pixels"
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
        assert request.inputs["pixels"].tensor_content
        request.output_filter.append("fc2")
        got = s.stub.Predict(request, HANG_GUARD)
        assert got.model_spec.signature_name == "pixels"
        assert np.array_equal(tf.make_ndarray(got.outputs["fc2"]), fc2[3:4])
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels.tolist(), tf.float32, pixels.shape))
        request.inputs["pixels"].ClearField("tensor_content")
        request.inputs["pixels"].float_val[:] = pixels.ravel().tolist()
        assert np.array_equal(tf.make_ndarray(s.stub.Predict(request, HANG_GUARD).outputs["fc2"]), fc2[3:4])
        # A 20 MB image (random pixels do not compress) is received: its row equals REST's /embed of the bytes.
        from PIL import Image

        big = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (2600, 2600, 3), np.uint8)).save(big, "PNG")
        assert big.tell() > 20_000_000
        large = s.stub.Predict(images_request([big.getvalue()]), HANG_GUARD)
        raw = requests.post(f"{s.url}/embed", data=big.getvalue(), timeout=HANG_GUARD).json()
        assert np.array_equal(tf.make_ndarray(large.outputs["fc2"])[0], np.array(raw["fc2"], np.float32))

        # GetModelMetadata names both signatures, their inputs and outputs, with dtypes and shapes.
        meta_request = get_model_metadata_pb2.GetModelMetadataRequest()
        meta_request.model_spec.name = "vggembed"
        meta_request.metadata_field.append("signature_def")
        meta = s.stub.GetModelMetadata(meta_request, HANG_GUARD)
        assert meta.model_spec.name == "vggembed" and meta.model_spec.version.value == 1
        defs = get_model_metadata_pb2.SignatureDefMap()
        assert meta.metadata["signature_def"].Unpack(defs)
        assert set(defs.signature_def) == {"serving_default", "pixels"}
        default = defs.signature_def["serving_default"]
        assert default.method_name == "tensorflow/serving/predict"
        assert default.inputs["images"].dtype == tf.string.as_datatype_enum
        assert [d.size for d in defs.signature_def["pixels"].inputs["pixels"].tensor_shape.dim] == [-1, 224, 224, 3]
        assert set(default.outputs) == set(out)
        assert [d.size for d in default.outputs["fc2"].tensor_shape.dim] == [-1, fc2.shape[1]]
        assert default.outputs["top_label"].dtype == tf.string.as_datatype_enum
        # The REST metadata is the same document in TensorFlow Serving's JSON form.
        rest_meta = requests.get(f"{s.url}/v1/models/vggembed/labels/stable/metadata", timeout=HANG_GUARD).json()
        assert rest_meta["model_spec"] == {"name": "vggembed", "signature_name": "", "version": "1"}
        assert rest_meta["metadata"]["signature_def"]["signature_def"]["pixels"]["inputs"]["pixels"]["dtype"] == \
            "DT_FLOAT"

        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = "vggembed"
        status = s.models.GetModelStatus(status_request, HANG_GUARD).model_version_status
        assert len(status) == 1 and status[0].version == 1
        assert status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE

        # Errors: codes and words.
        good = datas[:1]
        assert code_of(lambda: s.stub.Predict(images_request(good, name="other"), HANG_GUARD)) == (
            grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(other)")
        code, words = code_of(lambda: s.stub.Predict(images_request(good, version=2), HANG_GUARD))
        assert code == grpc.StatusCode.NOT_FOUND and "Specific(vggembed, 2)" in words
        code, words = code_of(lambda: s.stub.Predict(images_request(good, version_label="canary"), HANG_GUARD))
        assert code == grpc.StatusCode.NOT_FOUND and "canary" in words and "stable" in words
        code, words = code_of(lambda: s.stub.Predict(images_request([datas[0], b"hello"]), HANG_GUARD))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words == "instance 1: not an image Pillow can identify"
        code, words = code_of(lambda: s.stub.Predict(images_request(good, signature_name="nope"), HANG_GUARD))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown signature_name 'nope'" in words
        wrong_input = predict_pb2.PredictRequest()
        wrong_input.model_spec.name = "vggembed"
        wrong_input.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(good))
        code, words = code_of(lambda: s.stub.Predict(wrong_input, HANG_GUARD))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'images'" in words and "'image_bytes'" in words
        garbage = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}")
        code, words = code_of(lambda: garbage.unary_unary("/tensorflow.serving.PredictionService/Predict")(
            b"\xff\xff\xff", timeout=HANG_GUARD))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words.startswith("the request is not a PredictRequest")
        garbage.close()
        for method, request in (("Classify", classification_pb2.ClassificationRequest()),
                                ("Regress", regression_pb2.RegressionRequest()),
                                ("MultiInference", inference_pb2.MultiInferenceRequest())):
            code, words = code_of(lambda: getattr(s.stub, method)(request, HANG_GUARD))  # noqa: B023
            assert code == grpc.StatusCode.UNIMPLEMENTED and words.startswith(f"{method} is not served")
        m = s.metrics()
        assert m['vggembed_grpc_requests_total{method="Predict",code="OK"}'] == 6
        assert m['vggembed_grpc_requests_total{method="Predict",code="NOT_FOUND"}'] == 3
        assert m['vggembed_grpc_requests_total{method="Predict",code="INVALID_ARGUMENT"}'] == 4


def test_token_deadline_full_queue_shared_batches_and_sigterm(tiny16, photos):
    with serve_grpc(tiny16, "--batch-size", "4", "--max-wait", "600000", "--queue-size", "4", token="s3cret") as s:
        one = images_request([photos[0].read_bytes()])
        assert code_of(lambda: s.stub.Predict(one, HANG_GUARD))[0] == grpc.StatusCode.UNAUTHENTICATED
        code, words = code_of(lambda: s.stub.Predict(one, HANG_GUARD, metadata=[("authorization", "Bearer no")]))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in words

        # A deadline that passes while the image waits for its batch (--max-wait is beyond the test) takes it out
        # of the queue: it is never run (the batch of 4 below holds none of it, and nothing else ran).
        code, _ = code_of(lambda: s.stub.Predict(one, 3, metadata=s.auth))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        s.wait_for("the queue empty", lambda m: m["vggembed_queue_images"] == 0)
        assert s.metrics()["vggembed_cancelled_images_total"] <= 1  # 0 only if it arrived after its deadline

        # REST and gRPC share one queue: 3 REST images wait, 2 more over gRPC are refused (queue of 4) with
        # RESOURCE_EXHAUSTED in words, 1 more over gRPC fills the batch of 4, which runs once for both.
        first = []
        t = threading.Thread(target=lambda: first.append(s.predict({"instances": [b64(p) for p in photos[:3]]})))
        t.start()
        s.wait_for("3 images waiting", lambda m: m["vggembed_queue_images"] == 3)
        two = images_request([photos[0].read_bytes(), photos[1].read_bytes()])
        code, words = code_of(lambda: s.stub.Predict(two, HANG_GUARD, metadata=s.auth))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and words.startswith("busy: 3 images waiting")
        last = s.stub.Predict(images_request([photos[3].read_bytes()]), HANG_GUARD, metadata=s.auth)
        t.join(HANG_GUARD)
        assert first[0].status_code == 200 and len(first[0].json()["predictions"]) == 3
        assert tf.make_ndarray(last.outputs["fc2"]).shape[0] == 1
        m = s.metrics()
        assert m["vggembed_batch_size_count"] == 1 and m['vggembed_batch_size_bucket{le="2"}'] == 0
        assert m["vggembed_images_total"] == 4

        # SIGTERM drains gRPC too: a call waiting for its batch is answered, then the server exits 0.
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(s.stub.Predict(one, HANG_GUARD, metadata=s.auth)))
        waiting.start()
        s.wait_for("the gRPC image waiting", lambda m: m["vggembed_queue_images"] == 1)
        s.proc.send_signal(signal.SIGTERM)
        waiting.join(HANG_GUARD)
        assert tf.make_ndarray(answers[0].outputs["fc2"]).shape[0] == 1
        assert s.proc.wait(HANG_GUARD) == 0
        assert "stopped by SIGTERM" in s.stderr()


# An HTTP/2 client's connection preface and an empty SETTINGS frame: what a gRPC client sends first.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def goaway_after_connecting(port: int) -> int:
    """Connect as an HTTP/2 client (preface, SETTINGS, acknowledging the server's) and wait, sending nothing more,
    for the server's GOAWAY frame; its error code."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as c:
        c.sendall(HTTP2_PREFACE)
        buffer = b""
        while True:
            while len(buffer) < 9:
                data = c.recv(65536)
                assert data, "the connection closed without GOAWAY"
                buffer += data
            length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
            while len(buffer) < 9 + length:
                data = c.recv(65536)
                assert data, "the connection closed inside a frame"
                buffer += data
            payload, buffer = buffer[9:9 + length], buffer[9 + length:]
            if kind == 4 and not flags & 1:  # SETTINGS, not an ACK: acknowledge it
                c.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
            elif kind == 6 and not flags & 1:  # PING: answer it
                c.sendall(len(payload).to_bytes(3, "big") + b"\x06\x01\x00\x00\x00\x00" + payload)
            elif kind == 7:  # GOAWAY: last stream id, error code
                return int.from_bytes(payload[4:8], "big")


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3000
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs {want} open files; the hard limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_and_slowloris_on_both_apis_leave_requests_answered(tiny16, photos, many_files):
    held = []
    with serve_grpc(tiny16, "--batch-size", "1", "--max-connections", "1020", "--read-timeout", "600") as s:
        try:
            # 1,000 idle connections to each API, and slowloris clients: a request head, or an HTTP/2 preface,
            # sent in part and never finished.
            for port in (s.port, s.grpc_port):
                for _ in range(1000):
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD))
            for _ in range(5):
                c = socket.create_connection(("127.0.0.1", s.port), timeout=HANG_GUARD)
                c.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Le")
                held.append(c)
                c = socket.create_connection(("127.0.0.1", s.grpc_port), timeout=HANG_GUARD)
                c.sendall(b"PRI * HTTP/2.0\r\n")
                held.append(c)
            s.wait_for("1,005 REST connections open",
                       lambda m: m['vggembed_open_connections{protocol="rest"}'] >= 1005)
            # A normal request on each API is still answered.
            r = requests.post(f"{s.url}/embed", data=photos[0].read_bytes(), timeout=HANG_GUARD)
            assert r.status_code == 200
            answer = s.stub.Predict(images_request([photos[0].read_bytes()]), HANG_GUARD)
            assert np.array_equal(tf.make_ndarray(answer.outputs["fc2"])[0], np.array(r.json()["fc2"], np.float32))
            # Beyond --max-connections a new REST connection is answered 503 at once and closed.
            extra = []
            for _ in range(20):
                c = socket.create_connection(("127.0.0.1", s.port), timeout=HANG_GUARD)
                c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                extra.append(c)
            refusals = []
            for c in extra:
                data = c.recv(4096)
                if data.startswith(b"HTTP/1.1 503"):
                    refusals.append(data)
            assert refusals and b"too many connections: 1020 are open (--max-connections)" in refusals[0]
            assert b"Retry-After: 1" in refusals[0]
            # And a new gRPC connection beyond it is closed at once (the client sees UNAVAILABLE and retries).
            grpc_extra, grpc_refused = [], 0
            for _ in range(20):
                c = socket.create_connection(("127.0.0.1", s.grpc_port), timeout=HANG_GUARD)
                c.sendall(HTTP2_PREFACE)
                grpc_extra.append(c)
            for c in grpc_extra:
                try:
                    grpc_refused += c.recv(4096) == b""  # an accepted one answers with its SETTINGS
                except ConnectionResetError:
                    grpc_refused += 1
            assert grpc_refused > 0
            for c in extra + grpc_extra + held[:100] + held[1000:1100]:
                c.close()
            fresh = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}")
            stub = prediction_service_pb2_grpc.PredictionServiceStub(fresh)
            again = stub.Predict(images_request([photos[0].read_bytes()]), HANG_GUARD, wait_for_ready=True)
            assert np.array_equal(again.outputs["fc2"].tensor_content, answer.outputs["fc2"].tensor_content)
            fresh.close()
            s.wait_for("refusals counted", lambda m: m['vggembed_refused_connections_total{protocol="rest"}']
                       == len(refusals))
        finally:
            for c in held:
                c.close()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), bytes: an allocation made and freed between two reads
    still shows."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def pixels_request(dims, **values) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "vggembed", "pixels"
    tensor = request.inputs["pixels"]
    tensor.dtype = tf.float32.as_datatype_enum
    for d in dims:
        tensor.tensor_shape.dim.add(size=d)
    for field, v in values.items():
        getattr(tensor, field).extend(v)
    return request


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads /proc/PID/status")
def test_a_small_message_declaring_a_huge_shape_is_refused_before_anything_is_built(tiny16, photos):
    with serve_grpc(tiny16, "--batch-size", "2", "--queue-size", "8") as s:
        before = peak_rss(s.proc.pid)
        # 2000 images of one repeated value: 60 bytes on the wire, 1.2 GB as float32. Refused from the shape alone,
        # naming the limit; the server's peak memory does not move by anything near the tensor's size.
        for n in (2000, 100_000, 2**62):
            request = pixels_request([n, 224, 224, 3], float_val=[0.5])
            assert request.ByteSize() < 100
            code, words = code_of(lambda: s.stub.Predict(request, HANG_GUARD))  # noqa: B023
            assert code == grpc.StatusCode.INVALID_ARGUMENT, words
            assert words == f"{n} instances in one request; this server takes at most 8 (--queue-size)"
        assert peak_rss(s.proc.pid) - before < 200 << 20
        # Values that do not fill the shape, given or in tensor_content, are named.
        code, words = code_of(lambda: s.stub.Predict(pixels_request([2, 224, 224, 3], float_val=[1, 2]), HANG_GUARD))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words == (
            "input 'pixels': float_val has 2 values; shape [2, 224, 224, 3] needs 301056")
        short = pixels_request([3, 224, 224, 3])
        short.inputs["pixels"].tensor_content = b"\0" * 12
        code, words = code_of(lambda: s.stub.Predict(short, HANG_GUARD))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "tensor_content has 12 bytes" in words
        # Within the limit one value still fills the tensor, as TensorFlow reads a TensorProto: both rows equal
        # the row of that image sent whole.
        filled = s.stub.Predict(pixels_request([2, 224, 224, 3], float_val=[0.5]), HANG_GUARD)
        whole = s.stub.Predict(pixels_request([1, 224, 224, 3], float_val=[0.5] * (224 * 224 * 3)), HANG_GUARD)
        rows = tf.make_ndarray(filled.outputs["fc2"])
        assert rows.shape[0] == 2 and np.array_equal(rows[0], rows[1])
        assert np.allclose(rows[0], tf.make_ndarray(whole.outputs["fc2"])[0], atol=1e-6)
        # Doubles beyond float32's range are refused as such, without a warning on the server's stderr.
        huge = pixels_request([1, 224, 224, 3])
        huge.inputs["pixels"].dtype = tf.float64.as_datatype_enum
        huge.inputs["pixels"].double_val.append(1e39)
        code, words = code_of(lambda: s.stub.Predict(huge, HANG_GUARD))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words.startswith("instance 0: pixels contain")
        m = s.metrics()
        assert m.get('vggembed_grpc_requests_total{method="Predict",code="INTERNAL"}', 0) == 0
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(HANG_GUARD) == 0
        assert "Traceback" not in s.stderr() and "Warning" not in s.stderr(), s.stderr()[-3000:]
