"""`vggembed serve` under load, beside `vggembed embed` in the same run, over REST and gRPC.

For each precision: `vggembed embed` on a folder of JPEGs (its images/s, as
its summary line prints it), then `vggembed serve` with the same recipe and
batch size, N concurrent clients (threads, one keep-alive connection each,
one image per request; with --grpc half of them speak gRPC through the
official tensorflow-serving-api client, the other half REST, into the one
queue) for a given time: requests/s, p50/p99 latency, 503s and
RESOURCE_EXHAUSTED (documented: the queue was full), any other failure, and
the server's resident memory at the start, the middle and the end of the run
(the end against the middle says whether memory levels off). Then the same
load again with 1,000 idle connections held open to each API. Last, the
latency of single requests on the idle server beside its model time per
batch (from /metrics).

    python benchmarks/serve_load.py                          # full-size random VGG16, float32 and int8, 64 clients, 60 s
    python benchmarks/serve_load.py --seconds 600 --clients 64 --grpc --precisions float32   # the long run
    python benchmarks/serve_load.py --tiny --seconds 5 --grpc   # tiny synthetic weights: checks the harness only

Without --weights, full-size random VGG16 weights are made once into the cache
(as benchmarks/throughput.py does); the int8 model is converted on first use
(about 40 CPU-seconds and 1.5 GB for VGG16, then cached). Clients and server
share this machine's CPUs.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import make_jpegs, random_weights  # noqa: E402

from vggembed.net import synthetic  # noqa: E402

IDLE = 1000  # idle connections held open to each API in the second phase


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def embed_rate(weights, folder, precision, batch_size, tmp: Path) -> float:
    out = tmp / f"embed-{precision}.npy"
    r = subprocess.run([sys.executable, "-m", "vggembed", "embed", str(folder), "-o", str(out), "--overwrite",
                        "--weights", str(weights), "--precision", precision, "--batch-size", str(batch_size)],
                       capture_output=True, text=True)
    m = re.search(r"\(([\d.]+) images/s\)", r.stderr)
    if r.returncode != 0 or not m:
        raise SystemExit(f"embed failed: {r.stderr[-2000:]}")
    return float(m.group(1))


def start_server(weights, precision, batch_size, grpc_port, extra=()):
    import requests

    port = free_port()
    cmd = [sys.executable, "-m", "vggembed", "serve", "--weights", str(weights), "--port", str(port),
           "--precision", precision, "--batch-size", str(batch_size), *extra]
    if grpc_port:
        cmd += ["--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # an int8 conversion on first use takes minutes
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("serve never became ready")
        try:
            if requests.get(f"{url}/v1/models/vggembed", timeout=5).ok:
                return proc, url, port
        except requests.ConnectionError:
            pass
        time.sleep(0.2)


def metrics(url) -> dict:
    import requests

    text = requests.get(f"{url}/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def grpc_requests(datas):
    from tensorflow_serving.apis import predict_pb2

    out = []
    for data in datas:
        r = predict_pb2.PredictRequest()
        r.model_spec.name = "vggembed"
        t = r.inputs["images"]
        t.dtype = 7  # DT_STRING
        t.tensor_shape.dim.add(size=1)
        t.string_val.append(data)
        out.append(r)
    return out


def load(url, bodies, grpc_target, grpc_bodies, clients: int, seconds: float, pid: int):
    """Counts of `clients` threads for `seconds` (with a gRPC target, odd clients speak gRPC), and the server's
    RSS at the start, the middle and the end."""
    import requests

    latencies, statuses, errors = [], {}, []
    lock = threading.Lock()
    go = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def rest_client(i):
        session = requests.Session()
        go.wait()
        k = i
        while time.monotonic() < stop_at[0]:
            body = bodies[k % len(bodies)]
            k += clients
            t = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/models/vggembed:predict", data=body, timeout=120,
                                 headers={"Content-Type": "application/json"})
                _ = r.content  # the whole answer, as a client reads it
            except requests.RequestException as e:
                with lock:
                    errors.append(type(e).__name__)
                continue
            dt = time.perf_counter() - t
            with lock:
                statuses[f"REST {r.status_code}"] = statuses.get(f"REST {r.status_code}", 0) + 1
                if r.status_code == 200:
                    latencies.append(dt)
            if r.status_code == 503:
                time.sleep(float(r.headers.get("Retry-After", "1")) / 10)

    def grpc_client(i):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        channel = grpc.insecure_channel(grpc_target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        go.wait()
        k = i
        while time.monotonic() < stop_at[0]:
            request = grpc_bodies[k % len(grpc_bodies)]
            k += clients
            t = time.perf_counter()
            try:
                stub.Predict(request, 120)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            dt = time.perf_counter() - t
            with lock:
                statuses[f"gRPC {code}"] = statuses.get(f"gRPC {code}", 0) + 1
                if code == "OK":
                    latencies.append(dt)
            if code == "RESOURCE_EXHAUSTED":
                time.sleep(0.1)
        channel.close()

    threads = [threading.Thread(target=grpc_client if grpc_target and i % 2 else rest_client, args=(i,),
                                daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    start = time.perf_counter()
    rss = [rss_mib(pid)]
    go.wait()
    time.sleep(seconds / 2)
    rss.append(rss_mib(pid))
    for t in threads:
        t.join()
    rss.append(rss_mib(pid))
    return latencies, statuses, errors, time.perf_counter() - start, rss


def hold_idle(port: int, n: int) -> list:
    return [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="Weight file (default: full-size random VGG16 weights, made once).")
    p.add_argument("--tiny", action="store_true", help="Tiny synthetic weights (checks the harness only).")
    p.add_argument("--precisions", default="float32,int8")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0, help="Length of each load phase.")
    p.add_argument("--grpc", action="store_true",
                   help="Half of the clients speak gRPC (needs grpcio and tensorflow-serving-api).")
    p.add_argument("--no-idle", action="store_true", help=f"Skip the phase with {IDLE} idle connections.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=64, help="JPEGs for embed and for the clients to send.")
    p.add_argument("--image-size", default="640x480")
    args = p.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * IDLE + args.clients + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                    hard))

    with tempfile.TemporaryDirectory(prefix="vggembed-serve-load-") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            weights = synthetic.write_npz(synthetic.make_params("vgg16", (4, 8, 8, 16, 16), 32, 10, seed=1),
                                          tmp / "tiny.npz")
        else:
            weights = Path(args.weights) if args.weights else random_weights()
        paths = make_jpegs(tmp / "images", args.images, size)
        bodies = [json.dumps({"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()}]}).encode()
                  for p in paths]
        grpc_bodies = grpc_requests([p.read_bytes() for p in paths]) if args.grpc else None
        print(f"weights {weights.name}; {args.images} JPEGs {size[0]}x{size[1]} "
              f"(~{np.mean([p.stat().st_size for p in paths]) / 1024:.0f} kB); batch {args.batch_size}; "
              f"{args.clients} clients ({'half REST, half gRPC' if args.grpc else 'REST'}) for {args.seconds:g} s "
              f"per phase; clients and server share this machine's CPUs")
        print(f"{'precision':>9} {'phase':>11} {'embed img/s':>11} {'serve req/s':>11} {'ratio':>5} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'mean batch':>10} {'RSS start':>9} {'RSS mid':>8} {'RSS end':>8} {'end/mid':>7} "
              f"{'busy':>5} {'failed':>6}")
        singles = []
        for precision in args.precisions.split(","):
            # The server first (an int8 conversion happens once, before embed reuses the cached model). Idle
            # connections stay open through the run (--read-timeout beyond it), the worst case for the server.
            grpc_port = free_port() if args.grpc else None
            extra = ["--max-connections", str(IDLE + args.clients + 64),
                     "--read-timeout", str(int(2 * args.seconds + 120))]
            proc, url, port = start_server(weights, precision, args.batch_size, grpc_port, extra)
            target = f"127.0.0.1:{grpc_port}" if grpc_port else None
            held = []
            try:
                rate = embed_rate(weights, tmp / "images", precision, args.batch_size, tmp)
                phases = [("load", 0)] + ([] if args.no_idle else [(f"+{IDLE} idle", IDLE)])
                for phase, idle in phases:
                    if idle:
                        held += hold_idle(port, idle)
                        if grpc_port:
                            held += hold_idle(grpc_port, idle)
                    before = metrics(url)
                    lat, statuses, errors, elapsed, rss = load(url, bodies, target, grpc_bodies, args.clients,
                                                               args.seconds, proc.pid)
                    m = metrics(url)
                    batches = m["vggembed_batch_size_count"] - before["vggembed_batch_size_count"]
                    mean_batch = (m["vggembed_batch_size_sum"] - before["vggembed_batch_size_sum"]) / max(1, batches)
                    ok = statuses.get("REST 200", 0) + statuses.get("gRPC OK", 0)
                    busy = statuses.get("REST 503", 0) + statuses.get("gRPC RESOURCE_EXHAUSTED", 0)
                    failed = sum(statuses.values()) - ok - busy + len(errors)
                    rps = ok / elapsed
                    p50, p99 = (np.percentile(lat, [50, 99]) * 1000) if lat else (float("nan"),) * 2
                    print(f"{precision:>9} {phase:>11} {rate:>11.2f} {rps:>11.2f} {rps / rate:>5.2f} {p50:>7.0f} "
                          f"{p99:>7.0f} {mean_batch:>10.1f} {rss[0]:>8.0f}M {rss[1]:>7.0f}M {rss[2]:>7.0f}M "
                          f"{rss[2] / rss[1]:>7.2f} {busy:>5} {failed:>6}", flush=True)
                    if failed:
                        print(f"  answers: {statuses}; client errors: {sorted(set(errors))}")
                for c in held:
                    c.close()
                held = []
                import requests

                before = metrics(url)
                single = []
                for body in bodies[:10]:
                    t = time.perf_counter()
                    requests.post(f"{url}/v1/models/vggembed:predict", data=body, timeout=120)
                    single.append(time.perf_counter() - t)
                after = metrics(url)
                model_ms = 1000 * (after["vggembed_model_seconds_sum"] - before["vggembed_model_seconds_sum"]) / max(
                    1, after["vggembed_model_seconds_count"] - before["vggembed_model_seconds_count"])
                singles.append((precision, np.median(single) * 1000, model_ms))
            finally:
                for c in held:
                    c.close()
                proc.terminate()
                proc.wait(120)
        print(f"\n{'precision':>9} {'idle 1-image ms':>15} {'model ms/batch':>14}")
        for precision, single_ms, model_ms in singles:
            print(f"{precision:>9} {single_ms:>15.0f} {model_ms:>14.0f}")


if __name__ == "__main__":
    main()
