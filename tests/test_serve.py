"""vggembed serve, started for real on loopback: TensorFlow Serving's REST API, dynamic batching, hostile
clients, the token and SIGTERM draining. Readiness and every wait are polled on the server's own answers."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("aiohttp")

from vggembed.images.decode import prepare  # noqa: E402

from .conftest import env_without_tf_noise  # noqa: E402

HANG_GUARD = 120  # seconds: only ever reached when something is broken


class Served:
    """A `vggembed serve` process; its stderr is read as it comes (so a full pipe never blocks the server), and
    the port it bound (it is started with --port 0, so no port is picked here and bound later) is read from the
    line it prints when ready."""

    def __init__(self, proc, name="vggembed", token=None):
        self.proc, self.name = proc, name
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.lines: list[str] = []
        self.bound = threading.Event()
        self.grpc_bound = threading.Event()  # with --grpc-port: the line naming it was read
        self.port = self.grpc_port = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self.bound.set()
            m = re.search(r"gRPC \(.*\) on 127\.0\.0\.1:(\d+)", line)
            if m and self.grpc_port is None:
                self.grpc_port = int(m.group(1))
                self.grpc_bound.set()
        self.bound.set()  # the process ended: whoever waits sees it
        self.grpc_bound.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        """Everything the server wrote on stderr (all of it, once the process has ended)."""
        if self.proc.poll() is not None:
            self.reader.join(HANG_GUARD)
        return "".join(self.lines)

    def predict(self, body, **kw):
        return requests.post(f"{self.url}/v1/models/{self.name}:predict", json=body, timeout=kw.pop("timeout", HANG_GUARD),
                             headers=kw.pop("headers", self.headers), **kw)

    def metrics(self) -> dict:
        text = requests.get(f"{self.url}/metrics", headers=self.headers, timeout=HANG_GUARD).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def wait_for(self, what, predicate):
        deadline = time.monotonic() + HANG_GUARD
        while not predicate(self.metrics()):
            assert time.monotonic() < deadline, f"never saw {what}"
            time.sleep(0.01)


@contextlib.contextmanager
def serve(weights, *args, token=None, preexec_fn=None):
    cmd = [sys.executable, "-m", "vggembed", "serve", "--weights", str(weights), "--port", "0",
           *map(str, args)] + (["--token", token] if token else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env_without_tf_noise(), preexec_fn=preexec_fn)
    served = Served(proc, token=token)
    try:
        assert served.bound.wait(HANG_GUARD), "server never said where it listens"
        assert served.port is not None, served.stderr()[-3000:]
        deadline = time.monotonic() + HANG_GUARD
        while True:  # readiness: the status document answers
            assert proc.poll() is None, served.stderr()[-3000:]
            assert time.monotonic() < deadline, "server never became ready"
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{served.url}/v1/models/vggembed", headers=served.headers, timeout=5).ok:
                    break
            time.sleep(0.05)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(HANG_GUARD)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def b64(path) -> dict:
    return {"b64": base64.b64encode(path.read_bytes()).decode()}


def test_rest_api_answers_as_tensorflow_serving_with_embeds_rows(tiny16, tiny_model, photos):
    with serve(tiny16, "--batch-size", "4", "--fixed-batch", "--layer", "fc2,pool5:avg", "--top", "3",
               "--version-label", "stable") as s:
        status = requests.get(f"{s.url}/v1/models/vggembed", timeout=HANG_GUARD).json()
        assert status == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
        r = s.predict({"instances": [b64(p) for p in photos]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        # One row per instance, named outputs; equal to embed's rows (batch of 4, padded to 4) bit for bit.
        fc2 = tiny_model.embed([str(p) for p in photos], "fc2", batch_size=4)
        pool5 = tiny_model.embed([str(p) for p in photos], "pool5", pool="avg", batch_size=4)
        assert np.array_equal(np.array([p["fc2"] for p in preds], np.float32), fc2)
        assert np.array_equal(np.array([p["pool5_avg"] for p in preds], np.float32), pool5)
        tops = tiny_model.classify([str(p) for p in photos], top=3, batch_size=4)
        assert [p["top_label"] for p in preds] == [[t.label for t in row] for row in tops]
        assert [p["top_index"] for p in preds] == [[t.index for t in row] for row in tops]
        # A single instance pads to the same batch shape, so it gets the same row.
        one = s.predict({"instances": [{"images": b64(photos[1])}]}).json()["predictions"][0]
        assert np.array_equal(np.array(one["fc2"], np.float32), fc2[1])
        # Columnar, one output: {"outputs": [...]} holding the value alone, as TensorFlow Serving answers.
        cols = s.predict({"inputs": {"images": [b64(photos[0])]}, "output_filter": ["pool5_avg"]}).json()
        assert np.array_equal(np.array(cols["outputs"], np.float32), pool5[:1])
        both = requests.post(f"{s.url}/v1/models/vggembed/versions/1:predict", timeout=HANG_GUARD,
                             json={"inputs": [b64(photos[0]), b64(photos[1])], "output_filter": ["fc2", "top_label"]})
        assert set(both.json()["outputs"]) == {"fc2", "top_label"}
        assert np.array_equal(np.array(both.json()["outputs"]["fc2"], np.float32), fc2[:2])
        rows = s.predict({"instances": [b64(photos[0])], "output_filter": ["fc2"]}).json()
        assert np.array_equal(np.array(rows["predictions"], np.float32), fc2[:1])
        # The pixel signature: float RGB in, embed's computation.
        pixels = prepare(str(photos[2])).astype(np.float32)
        px = s.predict({"signature_name": "pixels", "instances": [pixels.tolist()], "output_filter": ["fc2"]})
        assert np.array_equal(np.array(px.json()["predictions"], np.float32), fc2[2:3])
        # POST /embed: the raw file as the body.
        raw = requests.post(f"{s.url}/embed", data=photos[3].read_bytes(), timeout=HANG_GUARD).json()
        assert np.array_equal(np.array(raw["fc2"], np.float32), fc2[3])
        assert raw["top_label"] == [t.label for t in tops[3]]
        # TensorFlow Serving's other paths: /versions/N and /labels/LABEL, the metadata, :classify.
        model = f"{s.url}/v1/models/vggembed"
        for path in ("/versions/1", "/labels/stable"):
            assert requests.get(model + path, timeout=HANG_GUARD).json() == status
            labelled = requests.post(f"{model}{path}:predict", json={"instances": [b64(photos[0])],
                                                                   "output_filter": ["fc2"]}, timeout=HANG_GUARD)
            assert np.array_equal(np.array(labelled.json()["predictions"], np.float32), fc2[:1])
        for path, code, words in (("/versions/2", 404, "Specific(vggembed, 2)"), ("/versions/x", 400, "not a number"),
                                  ("/labels/canary", 404, "Unrecognized servable version label: canary")):
            r = requests.get(model + path, timeout=HANG_GUARD)
            assert r.status_code == code and words in r.json()["error"], r.text
        meta = requests.get(f"{model}/metadata", timeout=HANG_GUARD).json()
        assert meta["model_spec"] == {"name": "vggembed", "signature_name": "", "version": "1"}
        sigs = meta["metadata"]["signature_def"]["signature_def"]
        assert set(sigs) == {"serving_default", "pixels"}
        assert sigs["serving_default"]["inputs"]["images"]["dtype"] == "DT_STRING"
        assert sigs["serving_default"]["outputs"]["fc2"] == {
            "name": "fc2", "dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}, {"size": str(fc2.shape[1])}]}}
        assert sigs["pixels"]["outputs"]["top_label"]["dtype"] == "DT_STRING"
        classified = requests.post(f"{model}:classify", json={"examples": [{"images": b64(p)} for p in photos]},
                                   timeout=HANG_GUARD).json()
        assert [[label for label, _ in row] for row in classified["result"]] == [[t.label for t in r] for r in tops]
        assert np.allclose([[p for _, p in row] for row in classified["result"]],
                           [[t.probability for t in r] for r in tops], atol=1e-6)
        regress = requests.post(f"{model}:regress", json={"examples": [{"images": b64(photos[0])}]}, timeout=HANG_GUARD)
        assert regress.status_code == 400 and "no regression signature" in regress.json()["error"]


def test_one_image_alone_runs_as_a_batch_of_one_and_equals_embed_of_it(tiny16, tiny_model, photos):
    # Without --fixed-batch nothing is padded: one image costs one image, and its row is embed's for that image
    # at the same batch shape (`vggembed embed` pads a run of one image to one; the API pads to batch_size).
    with serve(tiny16, "--batch-size", "4") as s:
        one = s.predict({"instances": [b64(photos[1])]}).json()["predictions"][0]
        m = s.metrics()
    assert m['vggembed_batch_size_bucket{le="1"}'] == 1 and m["vggembed_batch_size_count"] == 1
    assert np.array_equal(np.array(one, np.float32), tiny_model.embed([str(photos[1])], "fc2", batch_size=1)[0])


def test_requests_arriving_together_run_as_one_batch(tiny16, photos):
    # --max-wait far beyond the test: a batch runs only when 4 images are there, so batching is certain.
    with serve(tiny16, "--batch-size", "4", "--max-wait", "600000") as s:
        results, start = [], threading.Barrier(4)

        def client(p):
            start.wait()
            results.append(s.predict({"instances": [b64(p)]}).status_code)

        threads = [threading.Thread(target=client, args=(p,)) for p in photos]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_GUARD)
        assert results == [200] * 4
        m = s.metrics()
        assert m["vggembed_batch_size_count"] == 1 and m['vggembed_batch_size_bucket{le="2"}'] == 0
        assert m['vggembed_batch_size_bucket{le="4"}'] == 1 and m["vggembed_images_total"] == 4
        assert m['vggembed_requests_total{route="predict",code="200"}'] == 4
        assert m["vggembed_request_seconds_count"] == 4


def bomb_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")  # 9 million pixels in a few kB
    return buf.getvalue()


@pytest.mark.parametrize("body, status, message", [
    (b"not json", 400, "body is not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"instances": []}', 400, "non-empty list"),
    (b'{"instances": [{"b64": "aGk="}], "inputs": []}', 400, "exactly one"),
    (b'{"instances": ["raw string"]}', 400, "instance 0: an image must be"),
    (b'{"instances": [{"b64": "%s"}, {"b64": "@@@"}]}', 400, "instance 1: bad base64"),
    (b'{"instances": [{"b64": "%s"}, {"b64": "aGVsbG8="}]}', 400, "instance 1: not an image"),
    (b'{"instances": [{"b64": "%s"}], "output_filter": ["fc9"]}', 400, "unknown output 'fc9'"),
    (b'{"signature_name": "nope", "instances": [1]}', 400, "unknown signature_name"),
    (b'{"signature_name": "pixels", "instances": [[1, 2]]}', 400, "instance 0: pixels have shape [2]"),
    (b'{"instances": [{"b64": "BOMB"}]}', 400, "instance 0: 3000x3000 is 9000000 pixels, over the limit"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    (b'{"signature_name": ["pixels"], "instances": [1]}', 400, "signature_name must be a string"),
])
def test_every_bad_request_is_a_json_error_naming_the_instance(served_small, photos, body, status, message):
    s = served_small
    good = base64.b64encode(photos[0].read_bytes())
    body = body.replace(b"%s", good).replace(b"BOMB", base64.b64encode(bomb_png()))
    r = requests.post(f"{s.url}/v1/models/vggembed:predict", data=body, timeout=HANG_GUARD)
    assert r.status_code == status and r.headers["Content-Type"].startswith("application/json")
    assert message in r.json()["error"], r.json()


@pytest.fixture(scope="module")
def served_small(tiny):
    with serve(tiny["vgg16", "frossard"], "--batch-size", "2", "--max-body", "1000000",
               "--max-pixels", "4000000") as s:
        yield s


def test_size_limits_and_unknown_routes(served_small, photos):
    s = served_small
    huge = requests.post(f"{s.url}/embed", data=b"\0" * 2_000_000, timeout=HANG_GUARD)
    assert huge.status_code == 413 and "--max-body" in huge.json()["error"]
    from PIL import Image

    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, "PNG")
    many = s.predict({"instances": [{"b64": base64.b64encode(small.getvalue()).decode()}] * 9})
    assert many.status_code == 413 and "at most 8" in many.json()["error"]
    missing = requests.post(f"{s.url}/v1/models/other:predict", json={"instances": [b64(photos[0])]},
                            timeout=HANG_GUARD)
    assert missing.status_code == 404 and "Latest(other)" in missing.json()["error"]
    nowhere = requests.get(f"{s.url}/v2/anything", timeout=HANG_GUARD)
    assert nowhere.status_code == 404 and "no such endpoint" in nowhere.json()["error"]
    empty = requests.post(f"{s.url}/embed", data=b"", timeout=HANG_GUARD)
    assert empty.status_code == 400 and "instance 0" in empty.json()["error"]
    unlabelled = requests.post(f"{s.url}/v1/models/vggembed:classify", json={"examples": [b64(photos[0])]},
                               timeout=HANG_GUARD)
    assert unlabelled.status_code == 400 and "--top K" in unlabelled.json()["error"]
    m = s.metrics()
    assert m["vggembed_errors_total"] >= 4


def exchange(port: int, data: bytes) -> tuple[int, dict, dict]:
    """Send raw bytes as one HTTP request; (status, headers, JSON body) of the answer, read to the connection's
    close or the body's end."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as c:
        c.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = c.recv(65536)
            assert chunk, f"the connection closed before an answer: {answer!r}"
            answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            chunk = c.recv(65536)
            assert chunk, "the connection closed inside the body"
            body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_an_undecodable_body_is_400_and_a_client_that_hangs_up_is_no_server_error(served_small, photos):
    s = served_small
    before = s.metrics()
    # Content-Encoding: gzip on bytes that are not gzip: the client's fault, in words.
    status, headers, doc = exchange(s.port, b"POST /v1/models/vggembed:predict HTTP/1.1\r\nHost: x\r\n"
                                            b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello")
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert doc == {"error": "body could not be read: Can not decode content-encoding: gzip"}
    # A client that sends part of its body and hangs up is counted as 499 (client closed request), not as 500.
    with socket.create_connection(("127.0.0.1", s.port), timeout=HANG_GUARD) as c:
        c.sendall(b"POST /v1/models/vggembed:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    s.wait_for("the hang-up counted", lambda m: m.get('vggembed_requests_total{route="predict",code="499"}', 0)
               == before.get('vggembed_requests_total{route="predict",code="499"}', 0) + 1)
    after = s.metrics()
    assert after.get('vggembed_requests_total{route="predict",code="500"}', 0) == \
        before.get('vggembed_requests_total{route="predict",code="500"}', 0)
    assert after['vggembed_requests_total{route="predict",code="400"}'] == \
        before.get('vggembed_requests_total{route="predict",code="400"}', 0) + 1
    assert requests.post(f"{s.url}/embed", data=photos[0].read_bytes(), timeout=HANG_GUARD).status_code == 200


MALFORMED = [
    b"GET /v1/models/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


def test_malformed_http_is_a_json_400_and_leaves_the_log_quiet(tiny16, photos):
    """Requests aiohttp cannot parse are answered before any route; each was a text/plain 400 and a traceback on
    the server's log, so any client could flood the log. Now: a JSON 400 in words, nothing logged, counted."""
    with serve(tiny16, "--batch-size", "1") as s:
        for data in MALFORMED * 3:
            status, headers, doc = exchange(s.port, data)
            assert status == 400 and headers["content-type"].startswith("application/json"), (data[:40], doc)
            assert doc["error"].startswith("malformed HTTP request: ") and "\n" not in doc["error"]
            assert "b'" not in doc["error"]  # the client's bytes are not echoed
        # A Content-Encoding aiohttp cannot decode (br without the Brotli package; with it, the bytes are not br)
        # and one whose bytes are not what it says.
        for encoding in (b"br", b"gzip", b"deflate"):
            status, _, doc = exchange(s.port, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Encoding: " + encoding +
                                      b"\r\nContent-Length: 5\r\n\r\nhello")
            assert status == 400 and "content-encoding" in doc["error"].lower(), doc
        m = s.metrics()
        assert m['vggembed_requests_total{route="malformed",code="400"}'] >= len(MALFORMED) * 3
        # The server answers everyone else throughout.
        assert requests.post(f"{s.url}/embed", data=photos[0].read_bytes(), timeout=HANG_GUARD).status_code == 200
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(HANG_GUARD) == 0
        log = s.stderr()
        assert "Traceback" not in log and "Error handling request" not in log and "Unhandled" not in log, log[-3000:]


def pixels_body(first: bytes) -> bytes:
    """A pixels predict body: one 224x224x3 instance of zeros whose first value is FIRST, as written in JSON."""
    rows = b"[" + b",".join([b"[" + b",".join([b"[0,0,0]"] * 224) + b"]"] * 224) + b"]"
    return b'{"signature_name": "pixels", "instances": [' + rows.replace(b"[[[0", b"[[[" + first, 1) + b"]}"


def test_requests_are_taken_as_documented_and_no_more(tiny16, photos):
    """:classify takes the feature and signature it documents, pixels are JSON numbers only, and a refused request
    leaves nothing on the server's stderr (Python's advice, numpy's warnings)."""
    with serve(tiny16, "--batch-size", "2", "--top", "2") as s:
        classify = f"{s.url}/v1/models/vggembed:classify"
        image = b64(photos[0])
        for body, words in (
                ({"examples": [{"foo": image}]}, 'example 0: must be an object with one feature, {"images": '
                                                 '{"b64": "..."}}; it has feature \'foo\''),
                ({"examples": [{"images": image, "extra": image}]}, "it has feature 'extra'"),
                ({"examples": [{"images": image}], "signature_name": "pixels"},
                 "classify takes encoded images (serving_default); signature_name 'pixels' takes pixels"),
                ({"examples": [{"images": image}], "signature_name": 5}, "signature_name must be a string"),
                ({"examples": [{"images": image}], "signature_name": "nope"}, "unknown signature_name 'nope'")):
            r = requests.post(classify, json=body, timeout=HANG_GUARD)
            assert r.status_code == 400 and words in r.json()["error"], (body.keys(), r.text)
        for name in ("serving_default", ""):
            r = requests.post(classify, json={"examples": [{"images": [image]}], "signature_name": name},
                              timeout=HANG_GUARD)
            assert r.status_code == 200 and len(r.json()["result"][0]) == 2, r.text

        assert s.predict(None, data=pixels_body(b"7")).status_code == 200
        for first, words in ((b"true", "instance 0: pixels must be numbers, not true/false"),
                             (b'"7"', "instance 0: pixels must be numbers, not strings"),
                             (b"null", "instance 0: pixels must be numbers, not null"),
                             (b"1e39", "instance 0: pixels contain NaN, infinity or values beyond float32's range")):
            r = s.predict(None, data=pixels_body(first))
            assert r.status_code == 400 and r.json()["error"] == words, r.text
        r = s.predict(None, data=b'{"instances": [' + b"7" * 5000 + b"]}")
        assert r.status_code == 400 and r.json() == {"error": "body has a number of more than 4300 digits"}
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(HANG_GUARD) == 0
        log = s.stderr()
        assert "Warning" not in log and "Traceback" not in log, log[-3000:]


def test_a_full_queue_is_503_with_retry_after(tiny16, photos):
    with serve(tiny16, "--batch-size", "4", "--max-wait", "600000", "--queue-size", "4") as s:
        first = []
        t = threading.Thread(target=lambda: first.append(s.predict({"instances": [b64(p) for p in photos[:3]]})))
        t.start()
        s.wait_for("3 images waiting", lambda m: m["vggembed_queue_images"] == 3)
        busy = s.predict({"instances": [b64(photos[0]), b64(photos[1])]})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]
        last = s.predict({"instances": [b64(photos[3])]})  # the 4th image fills the batch
        t.join(HANG_GUARD)
        assert last.status_code == 200 and first[0].status_code == 200
        assert len(first[0].json()["predictions"]) == 3


def test_a_rest_client_that_hangs_up_takes_its_images_out_of_the_queue(tiny16, photos):
    # --max-wait beyond the test: the image waits for a batch of 2 until its client goes away.
    with serve(tiny16, "--batch-size", "2", "--max-wait", "600000") as s:
        body = json.dumps({"instances": [b64(photos[0])]}).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=HANG_GUARD) as c:
            c.sendall(b"POST /v1/models/vggembed:predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
            s.wait_for("the image waiting", lambda m: m["vggembed_queue_images"] == 1)
        s.wait_for("the image taken out", lambda m: m["vggembed_cancelled_images_total"] == 1)
        m = s.metrics()
        assert m["vggembed_queue_images"] == 0 and m['vggembed_requests_total{route="predict",code="499"}'] == 1
        assert 'vggembed_requests_total{route="predict",code="200"}' not in m
        # It never runs: the next two images make the batch.
        two = s.predict({"instances": [b64(photos[1]), b64(photos[2])]})
        assert two.status_code == 200 and s.metrics()["vggembed_images_total"] == 2


def test_a_slow_client_holds_no_worker_and_times_out(tiny16, photos):
    with serve(tiny16, "--batch-size", "1", "--read-timeout", "2") as s:
        slow = socket.create_connection(("127.0.0.1", s.port))
        slow.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\xff" * 10)
        # While that body trickles, others are served.
        assert requests.post(f"{s.url}/embed", data=photos[0].read_bytes(), timeout=HANG_GUARD).status_code == 200
        slow.settimeout(HANG_GUARD)
        answer = slow.recv(4096)
        slow.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"not received within 2s" in answer
        # A client that never finishes its request head (slowloris) is closed too (aiohttp alone waits an hour),
        # and so is one that connects and says nothing.
        for head in (b"POST /embed HTTP/1.1\r\nHost: x\r\n", b""):
            stalled = socket.create_connection(("127.0.0.1", s.port))
            stalled.sendall(head)
            stalled.settimeout(HANG_GUARD)
            assert stalled.recv(4096) == b""
            stalled.close()


def test_token_is_required_when_given_and_other_addresses_need_one(tiny16, photos):
    with serve(tiny16, "--batch-size", "1", token="s3cret") as s:
        no = requests.post(f"{s.url}/embed", data=photos[0].read_bytes(), timeout=HANG_GUARD)
        assert no.status_code == 401 and no.headers["WWW-Authenticate"] == "Bearer"
        wrong = requests.get(f"{s.url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=HANG_GUARD)
        assert wrong.status_code == 401
        ok = requests.post(f"{s.url}/embed", data=photos[0].read_bytes(), headers=s.headers, timeout=HANG_GUARD)
        assert ok.status_code == 200
    r = subprocess.run([sys.executable, "-m", "vggembed", "serve", "--weights", str(tiny16), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env=env_without_tf_noise(), timeout=HANG_GUARD)
    assert r.returncode == 2 and "--token" in r.stderr and "--insecure" in r.stderr


def test_sigterm_answers_requests_in_flight_then_exits_0(tiny16, photos):
    with serve(tiny16, "--batch-size", "2", "--max-wait", "600000") as s:
        answers = []
        t = threading.Thread(target=lambda: answers.append(s.predict({"instances": [b64(photos[0])]})))
        t.start()
        s.wait_for("the request waiting", lambda m: m["vggembed_queue_images"] == 1)
        s.proc.send_signal(signal.SIGTERM)
        t.join(HANG_GUARD)
        assert answers[0].status_code == 200 and len(answers[0].json()["predictions"]) == 1
        assert s.proc.wait(HANG_GUARD) == 0
        assert "stopped by SIGTERM" in s.stderr()


def test_under_nohup_sighup_leaves_the_server_serving(tiny16, photos):
    """`nohup vggembed serve &` outlives its terminal: an ignored SIGHUP stays ignored, and the server goes on
    answering (a handled one drains it and stops listening within moments: it would fail here)."""
    with serve(tiny16, "--batch-size", "1", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) as s:
        s.proc.send_signal(signal.SIGHUP)
        for _ in range(20):
            r = requests.post(f"{s.url}/embed", data=photos[0].read_bytes(), timeout=HANG_GUARD)
            assert r.status_code == 200 and s.proc.poll() is None
            time.sleep(0.1)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(HANG_GUARD) == 0
        assert "stopped by SIGTERM" in s.stderr()


def test_int8_served_rows_equal_embeds_int8_rows(tmp_path, monkeypatch, tiny16, photos):
    from vggembed.net import int8

    try:
        int8._interpreter_class()
    except Exception:  # noqa: BLE001
        pytest.skip("needs ai-edge-litert")
    if not int8.cpu_has_int8_dot():
        pytest.skip("int8 needs a CPU with VNNI/AMX")
    import vggembed as api

    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path / "home"))  # the server (a child) converts into it too
    with serve(tiny16, "--batch-size", "4", "--precision", "int8", "--layer", "pool5:avg") as s:
        got = s.predict({"instances": [b64(p) for p in photos]}).json()["predictions"]
    m8 = api.load(tiny16, precision="int8")
    ref = m8.embed([str(p) for p in photos], "pool5", pool="avg", batch_size=4)
    assert np.array_equal(np.array(got, np.float32), ref)
