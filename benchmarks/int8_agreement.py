"""How far an int8 model moves when only the arithmetic of its calibration changes.

The same weights and the same 40 calibration views are planned (activation ranges, bias corrections)
under different arithmetic, each in its own process: this checkout's way (LiteRT's and numpy's kernels)
with one thread, with OpenBLAS's AVX2 kernels, and on views resized by Pillow as scheme 3 did; and the way
int8 scheme 2 did it (TensorFlow, fake-quant ops) with oneDNN's AVX-512 kernels, capped at AVX2 (what an
AVX2 CPU gets) and with TensorFlow's Eigen kernels (no oneDNN). Every plan is written by this checkout's
writer (which makes TensorFlow's converter's model to the bit from the same plan) and run by LiteRT on the
same views of real photos; the table compares their fc2 vectors.

    python benchmarks/int8_agreement.py                                       # full-size random VGG16, ~4 min
    python benchmarks/int8_agreement.py --weights weights/vgg16_weights.npz   # real weights
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BODY = (("relu7", None),)
# key: (label, how, environment, one CPU)
VARIANTS = {
    "now": ("now: LiteRT and numpy, all CPUs", "now", {}, False),
    "one-thread": ("now, one thread", "now", {"OPENBLAS_NUM_THREADS": "1"}, True),
    "haswell": ("now, OpenBLAS's AVX2 (Haswell) kernels", "now", {"OPENBLAS_CORETYPE": "Haswell"}, False),
    "pillow": ("now, views resized by Pillow (scheme 3)", "pillow", {}, False),
    "tf": ("scheme 2: TensorFlow, oneDNN (AVX-512 here)", "tf", {}, False),
    "tf-avx2": ("scheme 2, oneDNN capped at AVX2", "tf", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
    "tf-eigen": ("scheme 2, TensorFlow's Eigen kernels", "tf", {"TF_ENABLE_ONEDNN_OPTS": "0"}, False),
}


def plan_now(model, images) -> dict:
    model._calibration_images = list(images)
    plan = model.calibrate(BODY)
    return {"biases": plan["biases"], "ranges": plan["ranges"]}


def plan_scheme2(model, images) -> dict:
    """Scheme 2's calibration (vggembed 0.2 before the int8 writer): both streams of the whole set in float32
    through TensorFlow's ops, the int8 one with fake-quant ops at every int8 tensor, 8 images at a time."""
    import tensorflow as tf

    from vggembed.net import int8

    params, mean = model.weights(), np.asarray(model.spec.mean_pixel, np.float32)
    layers = model.layers[: model._index["relu7"] + 1]
    rounded = {n: int8._rounded(*int8._round_per_channel(np.asarray(params[n][0], np.float32)))
               for n in (layer.name for layer in layers if layer.param)}

    def fake_quant(x, span):
        lo, hi = min(span[0], 0.0), max(span[1], 0.0)
        return tf.quantization.fake_quant_with_min_max_args(x, min=lo, max=hi, num_bits=8)

    def chunked(fn, x):
        return np.concatenate([np.asarray(fn(x[i: i + 8])) for i in range(0, len(x), 8)])

    def layer_op(layer, x, weights, biases):
        if layer.kind == "conv":
            return tf.nn.bias_add(tf.nn.conv2d(x, weights[layer.name], 1, "SAME"), biases[layer.name])
        if layer.kind == "fc":
            x = tf.reshape(x, [tf.shape(x)[0], -1])
            return tf.nn.bias_add(tf.matmul(x, weights[layer.name]), biases[layer.name])
        if layer.kind == "relu":
            return tf.nn.relu(x)
        return tf.nn.max_pool2d(x, 2, 2, "SAME")

    floats = {n: params[n][0] for n in rounded}
    plan = {"biases": {n: np.asarray(params[n][1], np.float32) for n in rounded}, "ranges": {}}
    exact = np.stack(images).astype(np.float32)
    quant = chunked(lambda x: fake_quant(fake_quant(x, int8.INPUT_RANGE) - mean,
                                         int8._centred_range(model.spec.mean_pixel)), exact)
    exact -= mean
    for layer in layers:
        exact = chunked(lambda x: layer_op(layer, x, floats, {n: params[n][1] for n in rounded}), exact)
        if layer.kind == "relu":
            plan["ranges"][layer.name] = (0.0, int8.RANGE_MARGIN * float(exact.max()))
            quant = chunked(lambda x: fake_quant(tf.nn.relu(x), plan["ranges"][layer.name]), quant)
        else:
            quant = chunked(lambda x: layer_op(layer, x, rounded, plan["biases"]), quant)
        if layer.kind in ("conv", "fc"):
            diff = np.zeros(exact.shape[-1], np.float64)
            for i in range(0, len(quant), 8):
                d = quant[i: i + 8] - exact[i: i + 8]
                diff += d.reshape(-1, d.shape[-1]).sum(axis=0, dtype=np.float64)
            shift = (diff / (quant.size // quant.shape[-1])).astype(np.float32)
            plan["biases"][layer.name] = plan["biases"][layer.name] - shift
            quant -= shift
    return plan


def pillow_views(model) -> list:
    """The built-in views as scheme 3 made them: cropped and squashed by Pillow (`prepare`)."""
    from vggembed.images.decode import load_rgb, prepare
    from vggembed.net import int8

    out = []
    for path in sorted(int8.CALIBRATION_DIR.glob("*.jpg")):
        img = load_rgb(str(path))
        for left, top, right, bottom, mirror in int8.VIEWS:
            w, h = img.size
            view = img.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
            out.append(prepare(view.transpose(0) if mirror else view))
    return out


def child(args) -> None:
    if args.one_cpu:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import vggembed
    from vggembed.net.int8 import Int8VGG

    params, spec = vggembed.load_weights(args.weights)
    model = Int8VGG(params, spec)
    start = time.process_time()
    if args.child == "tf":
        plan = plan_scheme2(model, model.calibration_images())
    else:
        plan = plan_now(model, pillow_views(model) if args.child == "pillow" else model.calibration_images())
    plan["cpu_s"] = time.process_time() - start
    Path(args.out).write_bytes(pickle.dumps(plan))


def fc2(spec, plan: dict, weights: dict, views: np.ndarray) -> tuple[np.ndarray, str]:
    """The fc2 vectors of the int8 model written from `plan`, and the model's SHA-256."""
    from vggembed.net import int8
    from vggembed.net.tfimport import _silenced_stderr

    content = bytes(int8.write_model(spec, BODY, {"weights": weights, **plan}))
    out = []
    with _silenced_stderr():  # "Created TensorFlow Lite XNNPACK delegate"
        interpreter = int8._interpreter_class()(model_content=content, num_threads=int8._threads())
        x = interpreter.get_input_details()[0]["index"]
        for i in range(0, len(views), 8):
            batch = views[i: i + 8]
            interpreter.resize_tensor_input(x, batch.shape)
            interpreter.allocate_tensors()
            interpreter.set_tensor(x, batch)
            interpreter.invoke()
            out.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    return np.concatenate(out), hashlib.sha256(content).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a VGG16 .npz/.mat (default: full-size random weights)")
    parser.add_argument("--views", type=int, default=4, help="views per photo (8 photos)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, 'now' and 'tf' always included (default: all of {','.join(VARIANTS)})")
    parser.add_argument("--child", choices=["now", "pillow", "tf"], help=argparse.SUPPRESS)
    parser.add_argument("--one-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from throughput import cosines, photo_views, random_weights, sample_photos

    import vggembed
    from vggembed.net import int8

    weights = Path(args.weights) if args.weights else random_weights()
    params, spec = vggembed.load_weights(weights)
    views = photo_views(list(sample_photos()), per_photo=args.views)
    print(f"weights {weights}; {len(views)} views of 8 photos; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    keys = ["now", "tf"] + [k for k in args.variants.split(",") if k not in ("now", "tf")]
    plans = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, how, env, one_cpu in (VARIANTS[k] for k in sorted(keys, key=list(VARIANTS).index)):
            out = Path(tmp) / f"{len(plans)}.pkl"
            cmd = [sys.executable, __file__, "--child", how, "--weights", str(weights), "--out", str(out)]
            subprocess.run(cmd + ["--one-cpu"] * one_cpu, env={**os.environ, **env}, check=True,
                           stderr=subprocess.DEVNULL)
            plans[label] = pickle.loads(out.read_bytes())
    float32 = vggembed.VGG(params, spec).run(views, ["relu7"])["relu7"]
    rounded = {name: int8._round_per_channel(np.asarray(w, np.float32)) for name, (w, _) in params.items()
               if name != "fc8"}
    del params
    results = {label: fc2(spec, {k: plan[k] for k in ("biases", "ranges")}, rounded, views)
               for label, plan in plans.items()}
    vectors = {label: v for label, (v, _) in results.items()}
    now, old = vectors[VARIANTS["now"][0]], vectors[VARIANTS["tf"][0]]
    model = results[VARIANTS["now"][0]][1]

    def cell(a, b):
        c = cosines(a, b)
        return "identical" if np.array_equal(a, b) else f"{c.min():.6f} / {c.mean():.6f}"

    print(f"\nfc2 cosine, lowest / mean over {len(views)} views")
    print(f"{'plan computed by':<44} {'CPU s':>6} {'vs now':>21} {'vs scheme 2':>21} {'vs float32':>21}")
    for label, v in vectors.items():
        print(f"{label:<44} {plans[label]['cpu_s']:>6.1f} {cell(v, now):>21} {cell(v, old):>21} "
              f"{cell(v, float32):>21}")
    print(f"\nthe model planned now: SHA-256 {model} (LiteRT {version('ai-edge-litert')}, flatbuffers "
          f"{version('flatbuffers')}); the same weights give the same digest on every machine that plans alike")


if __name__ == "__main__":
    main()
