"""vggembed beside Keras, in one run: model-only throughput, bf16, int8, end to end, start-up and memory.

Machines are noisy, so every comparison is a ratio taken in the same run,
alternating the two sides. Without --weights, full-size random VGG16 weights
are made (Frossard layout) and fed to both vggembed and
keras.applications.VGG16(weights=None).

    python benchmarks/throughput.py                    # everything, defaults
    python benchmarks/throughput.py --only model --batch-sizes 1,8,32
    python benchmarks/throughput.py --only e2e --images 64
    python benchmarks/throughput.py --only threads    # TF thread / oneDNN settings
    python benchmarks/throughput.py --only int8 --weights weights/vgg16_weights.npz   # int8 fidelity, real weights

The random weights are kept in the cache ($VGGEMBED_HOME/benchmark/) so
their MD5, and so the cached int8 model, stay the same from run to run:
the int8 conversion (about 40 CPU-seconds) is paid by the first run only.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vggembed  # noqa: E402
from vggembed.images import decode  # noqa: E402
from vggembed.net import arch  # noqa: E402
from vggembed.net import synthetic  # noqa: E402
from vggembed.net.int8 import cpu_has_int8_dot  # noqa: E402
from vggembed.net.tfimport import cpu_has_native_bf16  # noqa: E402


def gflop_per_image(spec, h=224, w=224) -> float:
    """Multiply-adds x 2 of the conv and fc layers."""
    flops, c = 0, 3
    widths = iter(spec.conv_widths)
    for layer in arch.layers(spec.arch):
        if layer.kind == "conv":
            out = next(widths)
            flops += 2 * h * w * 9 * c * out
            c = out
        elif layer.kind == "pool":
            h, w = -(-h // 2), -(-w // 2)
    prev = h * w * c
    for size in spec.fc_sizes:
        flops += 2 * prev * size
        prev = size
    return flops / 1e9


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def keras_vgg(params, which="vgg16", policy=None):
    import keras

    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        model = (keras.applications.VGG16 if which == "vgg16" else keras.applications.VGG19)(weights=None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    dense = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}
    for layer in model.layers:
        if layer.name.startswith("block") and "conv" in layer.name:
            layer.set_weights(list(params[f"conv{layer.name[5]}_{layer.name.split('conv')[1]}"]))
        elif layer.name in dense:
            layer.set_weights(list(params[dense[layer.name]]))
    return model


def timed(fn, batch, seconds) -> float:
    """Images per second of fn(batch), after one warm-up call, over about `seconds`."""
    fn(batch)
    n, start = 0, time.perf_counter()
    while True:
        fn(batch)
        n += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def alternate(a, b, batch, seconds, rounds):
    """Median images/s of a and b, measured alternately."""
    rates = alternate_all({"a": a, "b": b}, batch, seconds, rounds)
    return rates["a"], rates["b"]


def alternate_all(fns: dict, batch, seconds, rounds) -> dict:
    """Median images/s of each of `fns`, measured in turn, `rounds` times."""
    rates = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            rates[name].append(timed(fn, batch, seconds))
    return {name: float(np.median(r)) for name, r in rates.items()}


def bench_model(params, m, args, gflop):
    import tensorflow as tf

    km = keras_vgg(params)
    kfn = tf.function(lambda x: km(x, training=False))
    mean = np.float32(m.spec.mean_pixel)
    print(f"\n## Model only, VGG16 float32 ({gflop:.1f} GFLOP/image), median of {args.rounds} alternating rounds")
    print(f"{'batch':>6} {'vggembed img/s':>15} {'GFLOP/s':>8} {'keras img/s':>12} {'GFLOP/s':>8} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for bs in args.batch_sizes:
        x = rng.uniform(0, 255, (bs, 224, 224, 3)).astype(np.float32)
        ours = lambda b: m.run(b, ["relu7"])  # noqa: E731
        theirs = lambda b: kfn(tf.constant(b - mean)).numpy()  # noqa: E731
        a, k = alternate(ours, theirs, x, args.seconds, args.rounds)
        print(f"{bs:>6} {a:>15.2f} {a * gflop:>8.0f} {k:>12.2f} {k * gflop:>8.0f} {a / k:>6.2f}")


def bench_bf16(params, m32, args, gflop, photos):
    import tensorflow as tf

    print("\n## bf16 (CPU with native bf16) against Keras mixed_bfloat16 and vggembed float32")
    if not cpu_has_native_bf16():
        print("skipped: this CPU lacks AVX512_BF16/AMX, where vggembed refuses bf16 (it would be slower)")
        return
    m16 = vggembed.VGG(params, m32.spec, precision="bf16")
    kb = keras_vgg(params, policy="mixed_bfloat16")
    kfn = tf.function(lambda x: kb(x, training=False))
    mean = np.float32(m32.spec.mean_pixel)
    bs = args.batch_sizes[-1]
    x = np.random.default_rng(1).uniform(0, 255, (bs, 224, 224, 3)).astype(np.float32)
    a, k = alternate(lambda b: m16.run(b, ["relu7"]), lambda b: kfn(tf.constant(b - mean)).numpy(), x,
                     args.seconds, args.rounds)
    f32 = timed(lambda b: m32.run(b, ["relu7"]), x, args.seconds)
    print(f"batch {bs}: vggembed bf16 {a:.2f} img/s ({a * gflop:.0f} GFLOP/s), keras mixed_bfloat16 {k:.2f} img/s, "
          f"ratio {a / k:.2f}; vggembed float32 {f32:.2f} img/s, bf16/float32 {a / f32:.2f}")
    batch = photo_views(photos, per_photo=args.int8_views)
    e32 = run_all(m32, batch, bs)
    e16 = run_all(m16, batch, bs)
    cos = cosines(e32["relu7"], e16["relu7"])
    agree = int(np.sum(e32["prob"].argmax(1) == e16["prob"].argmax(1)))
    print(f"on {len(batch)} views of {len(photos)} real photos: mean cosine of fc2 bf16 vs float32 {np.mean(cos):.5f} "
          f"(min {np.min(cos):.5f}), top-1 agreement {agree}/{len(batch)} = {agree / len(batch):.1%}")
    if not args.weights:
        print("(random weights: their class margins are not a trained network's, so top-1 agreement is only "
              "indicative; pass --weights with the real file for the figure that counts)")


def int8_contenders(params, m32, m8) -> dict:
    """int8 and what it is timed against (vggembed float32/bf16, Keras float32/mixed_bfloat16), each a function
    of a batch; the networks live only as long as the dict."""
    import tensorflow as tf

    mean = np.float32(m32.spec.mean_pixel)
    kf = keras_vgg(params)
    kffn = tf.function(lambda x: kf(x, training=False))
    fns = {"int8": lambda b: m8.run(b, ["relu7"]), "vggembed float32": lambda b: m32.run(b, ["relu7"]),
           "keras float32": lambda b: kffn(tf.constant(b - mean)).numpy()}
    if cpu_has_native_bf16():
        m16 = vggembed.VGG(params, m32.spec, precision="bf16")
        kb = keras_vgg(params, policy="mixed_bfloat16")
        kbfn = tf.function(lambda x: kb(x, training=False))
        fns["vggembed bf16"] = lambda b: m16.run(b, ["relu7"])
        fns["keras mixed_bfloat16"] = lambda b: kbfn(tf.constant(b - mean)).numpy()
    return fns


def bench_int8(params, m32, args, gflop, photos, tmp: Path):
    """int8 (LiteRT + XNNPACK) beside vggembed float32/bf16 and Keras float32/mixed_bfloat16, in turn."""
    from vggembed.net.int8 import Int8VGG

    print("\n## int8 (LiteRT, XNNPACK) against vggembed float32/bf16 and Keras float32/mixed_bfloat16, "
          f"median of {args.rounds} rounds in turn; GFLOP/s counts VGG16's {gflop:.1f} float32 GFLOP/image")
    if not cpu_has_int8_dot():
        print("skipped: this CPU lacks AVX512_VNNI/AVX_VNNI/AMX_INT8, where vggembed refuses int8")
        return
    m8 = Int8VGG(params, m32.spec)
    start = time.perf_counter()
    m8.run(np.zeros((1, 224, 224, 3), np.float32), ["relu7", "prob"])  # converts, or reads the cache
    print(f"int8 model ready in {time.perf_counter() - start:.1f}s (converted in this process, or the cached model: "
          "see above; benchmarks/startup.py measures the conversion alone)")
    fns = int8_contenders(params, m32, m8)
    print(f"{'batch':>6} " + " ".join(f"{name:>22}" for name in fns) + "   int8 / each other")
    rng = np.random.default_rng(7)
    for bs in args.int8_batch_sizes:
        x = rng.uniform(0, 255, (bs, 224, 224, 3)).astype(np.float32)
        rates = alternate_all(fns, x, args.seconds, args.rounds)
        cells = [f"{r:>6.2f} ({r * gflop:>4.0f} GFLOP/s)" for r in rates.values()]
        ratios = ", ".join(f"{rates['int8'] / r:.2f}x {name}" for name, r in rates.items() if name != "int8")
        print(f"{bs:>6} " + " ".join(f"{c:>22}" for c in cells) + f"   {ratios}")
    del fns  # the Keras and bf16 networks go with it: only the two compared below stay in memory
    batch = photo_views(photos, per_photo=args.int8_views)
    bs = args.int8_batch_sizes[-1]
    e32, e8 = run_all(m32, batch, bs), run_all(m8, batch, bs)
    cos = cosines(e32["relu7"], e8["relu7"])
    agree = int(np.sum(e32["prob"].argmax(1) == e8["prob"].argmax(1)))
    print(f"on {len(batch)} views of {len(photos)} real photos: mean cosine of fc2 int8 vs float32 {np.mean(cos):.5f} "
          f"(min {np.min(cos):.5f}), top-1 agreement {agree}/{len(batch)} = {agree / len(batch):.1%}")
    if not args.weights:
        print("(random weights: top-1 agreement is only indicative; for the figure that counts run "
              "python benchmarks/throughput.py --only int8 --weights weights/vgg16_weights.npz)")
    bench_e2e(m8, args, tmp, sizes=(("500x375", (500, 375)),), images=args.int8_images, title="int8")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a to the same row of b."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)


def photo_views(photos, per_photo: int) -> np.ndarray:
    """Each photo squashed to 224x224, plus random crops (30-90% a side, half of them mirrored)."""
    from PIL import Image

    rng = np.random.default_rng(6)
    views = []
    for path in photos:
        img = Image.open(path).convert("RGB")
        views.append(decode.prepare(img))
        w, h = img.size
        for _ in range(per_photo - 1):
            s = rng.uniform(0.3, 0.9)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = img.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(decode.prepare(crop))
    return np.stack(views).astype(np.float32)


def run_all(m, batch, bs) -> dict:
    parts = [m.run(batch[i: i + bs], ["relu7", "prob"], pad_to=bs) for i in range(0, len(batch), bs)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("relu7", "prob")}


def bench_xla(params, m, args, gflop):
    print("\n## XLA (jit_compile) against plain TensorFlow + oneDNN, float32, alternating")
    mx = vggembed.VGG(params, m.spec, jit_compile=True)
    rng = np.random.default_rng(3)
    for bs in args.batch_sizes:
        x = rng.uniform(0, 255, (bs, 224, 224, 3)).astype(np.float32)
        plain, xla = alternate(lambda b: m.run(b, ["relu7"]), lambda b: mx.run(b, ["relu7"]), x, args.seconds,
                               args.rounds)
        print(f"batch {bs:>3}: plain {plain:.2f} img/s, XLA {xla:.2f} img/s, XLA/plain {xla / plain:.2f}")


# TensorFlow's thread pools and oneDNN are fixed per process, so each setting
# runs in its own worker process and the driver asks them in turn.
THREAD_SETTINGS = {
    "default (oneDNN, intra=0, inter=0)": {},
    "intra=2 inter=1": {"intra": 2, "inter": 1},
    "intra=1 inter=1": {"intra": 1, "inter": 1},
    "oneDNN off (Eigen kernels)": {"env": {"TF_ENABLE_ONEDNN_OPTS": "0"}},
}


def thread_worker(weights: str, intra: int, inter: int) -> None:
    """Serve `BATCH SECONDS` requests on stdin with images/s on stdout."""
    from vggembed.net.tfimport import tensorflow

    tf = tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    params, spec = vggembed.load_weights(weights)
    m = vggembed.VGG(params, spec)
    rng = np.random.default_rng(4)
    print("ready", flush=True)
    for line in sys.stdin:
        bs, seconds = line.split()
        x = rng.uniform(0, 255, (int(bs), 224, 224, 3)).astype(np.float32)
        print(timed(lambda b: m.run(b, ["relu7"]), x, float(seconds)), flush=True)


def bench_threads(weights, args):
    print(f"\n## TensorFlow threads and oneDNN, VGG16 float32, img/s, median of {args.rounds} rounds "
          "(one process per setting, asked in turn)")
    workers = {}
    for name, setting in THREAD_SETTINGS.items():
        env = dict(os.environ, **setting.get("env", {}))
        cmd = [sys.executable, __file__, "--thread-worker", f"{setting.get('intra', 0)},{setting.get('inter', 0)}",
               "--weights", str(weights)]
        workers[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        for proc in workers.values():
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("a thread-setting worker failed to start")
        print(f"{'setting':>36} " + " ".join(f"{'batch ' + str(bs):>9}" for bs in args.batch_sizes))
        rates = {name: {bs: [] for bs in args.batch_sizes} for name in workers}
        for bs in args.batch_sizes:
            for _ in range(args.rounds):
                for name, proc in workers.items():
                    proc.stdin.write(f"{bs} {args.seconds}\n")
                    proc.stdin.flush()
                    rates[name][bs].append(float(proc.stdout.readline()))
        base = next(iter(rates))
        for name, by_bs in rates.items():
            cells = []
            for bs in args.batch_sizes:
                r = float(np.median(by_bs[bs]))
                ratio = r / float(np.median(rates[base][bs]))
                cells.append(f"{r:>5.2f}" + ("" if name == base else f" ({ratio:.2f}x)"))
            print(f"{name:>36} " + " ".join(f"{c:>9}" for c in cells))
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()


def make_jpegs(folder: Path, n: int, size) -> list[Path]:
    """JPEGs (quality 90) of the sample photos resized to `size`, with mild
    sensor-like noise: an upscaled photo alone is smoother than a camera's and
    compresses to a third of a phone JPEG's bytes, and JPEG decoding time
    follows the bytes (12 MP phone photos are about 2.5-4 MB)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(sample_photos())
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        img = np.asarray(Image.open(photos[i % len(photos)]).convert("RGB").resize(size, Image.BICUBIC), np.float32)
        img = np.clip(img + rng.normal(0, 5, img.shape).astype(np.float32), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def decode_ms(paths, fast: bool) -> float:
    """Milliseconds of one core to decode and resize one of `paths`."""
    from vggembed.images import decode as images

    start = time.process_time()
    for p in paths:
        images.prepare(str(p), fast_decode=fast)
    return (time.process_time() - start) / len(paths) * 1000


E2E_SIZES = (("500x375", (500, 375)), ("4000x3000", (4000, 3000)))


def bench_e2e(m, args, tmp: Path, sizes=E2E_SIZES, images=None, title="float32"):
    from vggembed.engines import local as runner
    from vggembed.store.writer import EmbeddingWriter
    from vggembed.store.recipe import Recipe

    bs = args.batch_sizes[-1]
    cpus = os.cpu_count() or 1
    x = np.random.default_rng(2).uniform(0, 255, (bs, 224, 224, 3)).astype(np.float32)
    print(f"\n## End to end, {title}: vggembed embed over JPEG folders, batch {bs}, {args.workers} decode threads, "
          f"{cpus} CPUs")
    print("bound: the ratio reachable when decoding and the model share the CPUs and the model keeps all of them "
          "busy, model CPU-s/image / (that + decode CPU-s/image)")
    print(f"{'photos':>10} {'MB/file':>7} {'fast-decode':>11} {'decode ms':>9} {'img/s':>7} {'model-only':>10} "
          f"{'ratio':>6} {'bound':>6} {'cos to exact':>12}")
    for label, size in sizes:
        paths = make_jpegs(tmp / label, images or args.images, size)
        mb = np.mean([p.stat().st_size for p in paths]) / 1e6
        exact = None
        for fast in (False, True):
            cost = decode_ms(paths[:8], fast)
            out = tmp / f"{title}-{label}-{fast}.npy"
            opts = runner.Options(batch_size=bs, workers=args.workers)
            start = time.perf_counter()
            runner.embed(m, iter(map(str, paths)), EmbeddingWriter(out, overwrite=True),
                         Recipe(weights=m.spec.path, precision=m.precision, fast_decode=fast), opts)
            rate = len(paths) / (time.perf_counter() - start)
            model_only = timed(lambda b: m.run(b, ["relu7"]), x, args.seconds)
            model_cpu_s = cpus / model_only
            bound = model_cpu_s / (model_cpu_s + cost / 1000)
            vectors = np.load(out)
            if exact is None:
                exact, cos = vectors, 1.0
            else:
                cos = float(np.mean(cosines(vectors, exact)))
            print(f"{label:>10} {mb:>7.2f} {str(fast):>11} {cost:>9.1f} {rate:>7.2f} {model_only:>10.2f} "
                  f"{rate / model_only:>6.2f} {bound:>6.2f} {cos:>12.5f}")


def sample_photos():
    import matplotlib
    import skimage

    data = Path(skimage.__file__).parent / "data"
    yield from (data / n for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
                                   "motorcycle_right.png", "hubble_deep_field.jpg"))
    yield Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def startup(weights):
    """Time start-up by phase; the weight load is compared with reading the
    file's bytes into fresh memory, alternated five times (both vary by 5x
    on a busy machine whose page cache drops the file, hence median and best)."""
    from vggembed.net.tfimport import tensorflow

    t = time.perf_counter()
    tensorflow()
    import_s = time.perf_counter() - t
    reads, loads = [], []
    for _ in range(5):
        t = time.perf_counter()
        with open(weights, "rb") as f:
            data = f.read()  # the floor for any loader
        reads.append(time.perf_counter() - t)
        del data
        params = None  # the previous copy goes first, as in a fresh process
        t = time.perf_counter()
        params, spec = vggembed.load_weights(weights)
        loads.append(time.perf_counter() - t)
    read_s, load_s = float(np.median(reads)), float(np.median(loads))
    t = time.perf_counter()
    m = vggembed.VGG(params, spec)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    m.run(np.zeros((1, 224, 224, 3), np.float32), ["relu7"])
    first_s = time.perf_counter() - t
    print(f"start-up: import TensorFlow {import_s:.2f}s; network built {build_s:.2f}s; first batch incl. graph "
          f"trace {first_s:.2f}s\nweight file, median (best) of 5 alternated: read into memory {read_s:.2f}s "
          f"({min(reads):.2f}s), load_weights {load_s:.2f}s ({min(loads):.2f}s); load/read "
          f"{load_s / read_s:.1f}x ({min(loads) / min(reads):.1f}x)")
    return params, spec, m


SECTIONS = ["model", "bf16", "int8", "e2e", "xla", "threads"]


def random_weights() -> Path:
    """Full-size random VGG16 weights, written once into the cache and reused (a stable MD5)."""
    from vggembed.net.cache import cache_dir

    path = cache_dir() / "benchmark" / "vgg16-random-seed0.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = synthetic.write_npz(synthetic.make_params("vgg16", seed=0), path.with_name("partial.npz"))
        os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a VGG16 .npz/.mat (default: full-size random weights)")
    parser.add_argument("--batch-sizes", default="1,8,32", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    parser.add_argument("--images", type=int, default=64, help="photos per end-to-end folder")
    parser.add_argument("--int8-batch-sizes", default="8,16,32", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--int8-images", type=int, default=320, help="photos in the int8 end-to-end folder")
    parser.add_argument("--int8-views", type=int, default=60, help="views per photo for int8 fidelity (8 photos)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", choices=SECTIONS, action="append")
    parser.add_argument("--thread-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.thread_worker:
        thread_worker(args.weights, *map(int, args.thread_worker.split(",")))
        return
    sections = args.only or SECTIONS

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import platform

        print(f"# vggembed {vggembed.__version__} benchmarks on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, native bf16: {cpu_has_native_bf16()}, int8 dot products: {cpu_has_int8_dot()}")
        weights = args.weights or random_weights()
        params, spec, m = startup(weights)
        gflop = gflop_per_image(spec)
        if "model" in sections:
            bench_model(params, m, args, gflop)
        if "bf16" in sections:
            bench_bf16(params, m, args, gflop, list(sample_photos()))
        if "int8" in sections:
            bench_int8(params, m, args, gflop, list(sample_photos()), tmp)
        if "e2e" in sections:
            bench_e2e(m, args, tmp)
        if "xla" in sections:
            bench_xla(params, m, args, gflop)
        if "threads" in sections:
            bench_threads(weights, args)
        print(f"\npeak RSS {peak_rss_mib():.0f} MiB (weights {sum(w.nbytes + b.nbytes for w, b in params.values()) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
