"""`vggembed serve` under load, beside `vggembed embed` in the same run.

For each precision: `vggembed embed` on a folder of JPEGs (its images/s, as
its summary line prints it), then `vggembed serve` with the same recipe and
batch size, N concurrent HTTP clients (threads, one keep-alive connection
each, one image per request in TensorFlow Serving's row format) for a given
time: requests/s, p50/p99 latency, the server's resident memory at start and
end, 503s (documented: the queue was full) and any other failure. Then the
latency of single requests on the idle server beside its model time per
batch (from /metrics).

    python benchmarks/serve_load.py                          # full-size random VGG16, float32 and int8, 64 clients, 60 s
    python benchmarks/serve_load.py --seconds 10 --precisions float32
    python benchmarks/serve_load.py --tiny --seconds 5       # tiny synthetic weights: checks the harness only

Without --weights, full-size random VGG16 weights are made once into the cache
(as benchmarks/throughput.py does); the int8 model is converted on first use
(about 40 CPU-seconds and 1.5 GB for VGG16, then cached).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
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


def start_server(weights, precision, batch_size, extra=()):
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vggembed", "serve", "--weights", str(weights), "--port", str(port),
                             "--precision", precision, "--batch-size", str(batch_size), *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)


def metrics(url) -> dict:
    import requests

    text = requests.get(f"{url}/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def load(url, bodies, clients: int, seconds: float):
    """(latencies of 200s, counts by status, failures other than HTTP answers) of `clients` threads."""
    import requests

    latencies, statuses, errors = [], {}, []
    lock = threading.Lock()
    go = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i):
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
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append(dt)
                elif r.status_code == 503:
                    time.sleep(float(r.headers.get("Retry-After", "1")) / 10)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    start = time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    return latencies, statuses, errors, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="Weight file (default: full-size random VGG16 weights, made once).")
    p.add_argument("--tiny", action="store_true", help="Tiny synthetic weights (checks the harness only).")
    p.add_argument("--precisions", default="float32,int8")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=64, help="JPEGs for embed and for the clients to send.")
    p.add_argument("--image-size", default="640x480")
    args = p.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))

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
        print(f"weights {weights.name}; {args.images} JPEGs {size[0]}x{size[1]} "
              f"(~{np.mean([p.stat().st_size for p in paths]) / 1024:.0f} kB); batch {args.batch_size}; "
              f"{args.clients} clients for {args.seconds:g} s; clients and server share this machine's CPUs")
        print(f"{'precision':>9} {'embed img/s':>11} {'serve req/s':>11} {'ratio':>5} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'mean batch':>10} {'RSS start':>9} {'RSS end':>8} {'503s':>5} {'failed':>6} "
              f"{'idle 1-image ms':>15} {'model ms/batch':>14}")
        for precision in args.precisions.split(","):
            # The server first (an int8 conversion happens once, before embed reuses the cached model).
            proc, url = start_server(weights, precision, args.batch_size)
            try:
                rate = embed_rate(weights, tmp / "images", precision, args.batch_size, tmp)
                start_rss = rss_mib(proc.pid)
                lat, statuses, errors, elapsed = load(url, bodies, args.clients, args.seconds)
                end_rss = rss_mib(proc.pid)
                m = metrics(url)
                mean_batch = m["vggembed_batch_size_sum"] / max(1, m["vggembed_batch_size_count"])
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
            finally:
                proc.terminate()
                proc.wait(120)
            ok = statuses.get(200, 0)
            failed = sum(n for s, n in statuses.items() if s not in (200, 503)) + len(errors)
            rps = ok / elapsed
            p50, p99 = (np.percentile(lat, [50, 99]) * 1000) if lat else (float("nan"),) * 2
            print(f"{precision:>9} {rate:>11.2f} {rps:>11.2f} {rps / rate:>5.2f} {p50:>7.0f} {p99:>7.0f} "
                  f"{mean_batch:>10.1f} {start_rss:>8.0f}M {end_rss:>7.0f}M {statuses.get(503, 0):>5} {failed:>6} "
                  f"{np.median(single) * 1000:>15.0f} {model_ms:>14.0f}")
            if errors:
                print(f"  client errors: {sorted(set(errors))}")


if __name__ == "__main__":
    main()
