"""Is the model fed when images come over the network? Local files beside a loopback HTTP server with latency.

A real HTTP server on 127.0.0.1 answers every request after `--latency`
seconds (an object store's round trip). Printed side by side, in one run:

1. reading + decoding alone (what the model is fed with), images/s: local
   files, then URLs with 1, 4, 16, 32, 64 remote reads in flight
   (`runner.Options.fetch_ahead`), then the same images as one tar shard
   streamed over HTTP;
2. requests per image, as the servers count them: the HTTP server, and
   moto's S3 server (its request recorder) for the same images in a bucket;
3. end to end (`runner.embed`, the model included): local files against
   URLs at the default number of reads in flight, as a ratio.

    python benchmarks/remote.py                       # full-size random VGG16
    python benchmarks/remote.py --tiny --images 64    # tiny weights: the pipeline alone
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from tests.servers import FileServer, S3Server  # noqa: E402
from throughput import make_jpegs  # noqa: E402
from vggembed.images import decode as images  # noqa: E402
from vggembed.images import inputs  # noqa: E402
from vggembed.engines import local as runner  # noqa: E402
from vggembed.net import synthetic  # noqa: E402
from vggembed.store.writer import EmbeddingWriter  # noqa: E402
from vggembed.images.pipeline import decode_stream  # noqa: E402
from vggembed.store.recipe import Recipe  # noqa: E402
from vggembed.images.sources import Source, fetch_ahead  # noqa: E402


def feed_rate(names, workers, concurrency) -> float:
    """Images/s through reading and decoding alone (no model)."""
    fn = functools.partial(images.prepare, size=(224, 224))
    start = time.perf_counter()
    n = 0
    for item in decode_stream(fetch_ahead(inputs.open_shards(names), concurrency), fn, workers=workers,
                              window=max(32, 4 * workers)):
        assert item.error is None, item.error
        n += 1
    return n / (time.perf_counter() - start)


def requests_per_image(srv, s3, paths, tmp) -> tuple[collections.Counter, collections.Counter | None]:
    """Requests each server answered for reading every image once (fetch_ahead, as a run reads them)."""
    before = collections.Counter(srv.requests)
    list(fetch_ahead([Source(srv.url(f"/{p.name}")) for p in paths], 32))
    http_counts = collections.Counter({"any method": sum((srv.requests - before).values())})  # counted by path
    if s3 is None:
        return http_counts, None
    with s3.recording(tmp) as recorded:
        list(fetch_ahead([Source(f"s3://bench/{p.name}") for p in paths], 32))
    return http_counts, collections.Counter(method for method, _ in recorded)


def embed_rate(model, names, tmp, opts, label) -> tuple[float, np.ndarray]:
    out = tmp / f"{label}.npy"
    start = time.perf_counter()
    runner.embed(model, iter(names), EmbeddingWriter(out, overwrite=True), Recipe(weights=model.spec.path), opts)
    return len(names) / (time.perf_counter() - start), np.load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--size", default="500x375", help="photo size (JPEG, quality 90, mild noise)")
    ap.add_argument("--latency", type=float, default=0.1, help="seconds before the server answers each request")
    ap.add_argument("--concurrency", default="1,4,16,32,64", help="remote reads in flight to compare")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--weights", help="weight file (default: full-size random VGG16, made here)")
    ap.add_argument("--tiny", action="store_true", help="tiny random weights: measures the pipeline, not the model")
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    import vggembed

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = make_jpegs(tmp / "photos", args.images, (w, h))
        files = {f"/{p.name}": p.read_bytes() for p in paths}
        shard = io.BytesIO()
        with tarfile.open(fileobj=shard, mode="w") as tar:
            for p in paths:
                tar.add(p, arcname=p.name)
        files["/photos.tar"] = shard.getvalue()
        mb = np.mean([len(v) for k, v in files.items() if k.endswith(".jpg")]) / 1e6
        with FileServer(files, latency=args.latency) as srv:
            local = [Source(str(p)) for p in paths]
            urls = [Source(srv.url(f"/{p.name}")) for p in paths]
            print(f"## {args.images} JPEGs {args.size} ({mb:.3f} MB each), {args.workers} decoding threads, "
                  f"HTTP server on 127.0.0.1 answering after {args.latency * 1000:.0f} ms")
            print(f"{'source':>34} {'images/s':>9} {'of local':>9}")
            base = feed_rate(local, args.workers, 16)
            print(f"{'local files':>34} {base:>9.1f} {1.0:>9.2f}")
            for c in [int(c) for c in args.concurrency.split(",")]:
                rate = feed_rate(urls, args.workers, c)
                print(f"{f'URLs, {c} reads in flight':>34} {rate:>9.1f} {rate / base:>9.2f}")
            rate = feed_rate([Source(srv.url("/photos.tar"))], args.workers, 16)
            print(f"{'one tar shard over HTTP':>34} {rate:>9.1f} {rate / base:>9.2f}")

            with contextlib.ExitStack() as stack:
                try:
                    s3 = stack.enter_context(S3Server())
                    client = s3.client()
                    client.create_bucket(Bucket="bench")
                    for p in paths:
                        client.put_object(Bucket="bench", Key=p.name, Body=files[f"/{p.name}"])
                except ImportError:  # moto and s3fs come with the test extra
                    s3 = None
                http_counts, s3_counts = requests_per_image(srv, s3, paths, tmp)
            print(f"\n## Requests per image, as the servers count them ({len(paths)} images)")
            for label, counts in (("HTTP server", http_counts), ("S3 (moto)", s3_counts)):
                if counts is None:
                    print(f"{label:>34} (moto/s3fs not installed)")
                    continue
                per = ", ".join(f"{n / len(paths):.2f} {method}" for method, n in sorted(counts.items()))
                print(f"{label:>34} {sum(counts.values()) / len(paths):>9.2f}  ({per})")

            if args.tiny:
                weights = synthetic.write_npz(synthetic.make_params("vgg16", (4, 8, 8, 16, 16), 32, 10, seed=1),
                                              tmp / "tiny.npz")
            else:
                weights = args.weights or synthetic.write_npz(synthetic.make_params("vgg16", seed=0),
                                                              tmp / "vgg16.npz")
            model = vggembed.load(weights, device="cpu")
            opts = runner.Options(batch_size=args.batch_size, workers=args.workers)
            embed_rate(model, local[: args.batch_size], tmp, opts, "warm-up")
            print(f"\n## End to end (runner.embed, batch {args.batch_size}, "
                  f"{'tiny' if args.tiny else Path(weights).name} weights), alternated")
            print(f"{'source':>34} {'images/s':>9} {'of local':>9} {'same vectors':>12}")
            rows = {"local": [], "url": []}
            for _ in range(2):
                rows["local"].append(embed_rate(model, local, tmp, opts, "local"))
                rows["url"].append(embed_rate(model, urls, tmp, opts, "url"))
            best_local = max(r for r, _ in rows["local"])
            same = all(np.array_equal(v, rows["local"][0][1]) for _, v in rows["url"])
            print(f"{'local files':>34} {best_local:>9.1f} {1.0:>9.2f} {'':>12}")
            best_url = max(r for r, _ in rows["url"])
            print(f"{f'URLs, {opts.fetch_ahead} reads in flight':>34} {best_url:>9.1f} "
                  f"{best_url / best_local:>9.2f} {str(same):>12}")


if __name__ == "__main__":
    main()
