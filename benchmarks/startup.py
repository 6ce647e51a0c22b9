"""What one call costs: whole processes classifying one image, and the int8 model's first use.

Each figure is a fresh process, timed from its start to its exit, median of --runs (the machine may be
busy: user+system CPU seconds are printed beside the wall time). Peak memory is that of the whole process
tree (the process and every child it waited for, from wait4's rusage; started by `measure.py`'s launcher,
so none of this script's own memory is counted).

    python benchmarks/startup.py                          # full-size random VGG16, this checkout
    python benchmarks/startup.py --before ../old-checkout # the same commands run on another checkout too
    python benchmarks/startup.py --weights weights/vgg16_weights.npz --skip keras,bf16

Rows: `python -c "import tensorflow"` (the floor of anything built on TensorFlow) and Keras' VGG16 loading
the same arrays and predicting one image, once; then per checkout `vggembed --help`, `vggembed classify
IMAGE` in float32, bf16 (where the CPU has it) and int8, on first use (a fresh $VGGEMBED_HOME: calibration
and writing the model included) and with its model cached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from measure import measure  # noqa: E402

from vggembed.net.int8 import cpu_has_int8_dot  # noqa: E402
from vggembed.net.tfimport import cpu_has_native_bf16  # noqa: E402

KERAS = """
import sys, numpy as np
sys.path.insert(0, {bench!r})
from throughput import keras_vgg
import vggembed
from vggembed.images.decode import prepare
params, spec = vggembed.load_weights({weights!r})
model = keras_vgg(params)
x = prepare({image!r})[None].astype(np.float32) - np.float32(spec.mean_pixel)
print(int(model.predict(x, verbose=0).argmax()))
"""


def timed(cmd, env, cwd) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MiB of the process tree, stderr tail) of one run."""
    with tempfile.TemporaryFile() as err:
        run = measure(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({run.returncode}): {tail}")
    return run.wall, run.cpu, run.peak_mib, tail[0] if tail else ""


def row(label, runs) -> None:
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    peak = max(r[2] for r in runs)
    print(f"{label:<44} {wall:>8.2f} {cpu:>8.2f} {peak:>9.0f}", flush=True)


def bench(code: Path, name: str, args, weights: Path, image: Path, home: Path | None = None) -> None:
    """The rows for one checkout; with `home`, its int8 model is already cached there (no first-use row)."""
    if home is None:
        with tempfile.TemporaryDirectory(prefix="startup-") as fresh:
            return bench(code, name, args, weights, image, Path(fresh))
    env = {**os.environ, "PYTHONPATH": str(code), "VGGEMBED_HOME": str(home)}
    # Run from the home folder: `python -m vggembed` looks in the current folder first.
    vggembed = [sys.executable, "-m", "vggembed"]
    classify = vggembed + ["classify", str(image), "--weights", str(weights)]
    print(f"\n## {name} ({code}), median of {args.runs} runs")
    print(f"{'':<44} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9}")
    row("vggembed --help", [timed(vggembed + ["--help"], env, home) for _ in range(args.runs)])
    row("classify, float32", [timed(classify, env, home) for _ in range(args.runs)])
    if "bf16" not in args.skip and cpu_has_native_bf16():
        row("classify, bf16", [timed(classify + ["--precision", "bf16"], env, home) for _ in range(args.runs)])
    if "int8" not in args.skip and cpu_has_int8_dot():
        if not any(home.glob("int8/*.tflite")):
            row("classify, int8, first use (converts)", [timed(classify + ["--precision", "int8"], env, home)])
        row("classify, int8, model cached", [timed(classify + ["--precision", "int8"], env, home)
                                             for _ in range(args.runs)])


def common(args, weights: Path, image: Path) -> None:
    """Rows that do not depend on the checkout: TensorFlow's import, and Keras."""
    env, cwd = {**os.environ, "PYTHONPATH": str(HERE.parent)}, tempfile.gettempdir()
    print(f"\n## TensorFlow and Keras, median of {args.runs} runs")
    print(f"{'':<44} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9}")
    row("python -c 'import tensorflow'",
        [timed([sys.executable, "-c", "import tensorflow"], env, cwd) for _ in range(args.runs)])
    if "keras" not in args.skip:
        script = KERAS.format(bench=str(HERE), weights=str(weights), image=str(image))
        row("Keras VGG16, same arrays, predict", [timed([sys.executable, "-c", script], env, cwd)
                                                   for _ in range(args.runs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a VGG16 .npz/.mat (default: full-size random weights)")
    parser.add_argument("--image", help="the image to classify (default: scikit-image's chelsea.png)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", type=Path, help="another checkout of vggembed to run the same commands on")
    parser.add_argument("--before-home", type=Path,
                        help="a $VGGEMBED_HOME where --before's int8 model is cached: skips its first use (the "
                             "TensorFlow converter's took 2 minutes and 12 GB for VGG16)")
    parser.add_argument("--skip", default="", help="comma-separated: bf16, int8, keras")
    args = parser.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    if args.weights:
        weights = Path(args.weights)
    else:
        from throughput import random_weights

        weights = random_weights()
    if args.image:
        image = Path(args.image)
    else:
        import skimage

        image = Path(skimage.__file__).parent / "data" / "chelsea.png"
    print(f"weights {weights}, image {image}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    common(args, weights, image)
    if args.before:
        bench(args.before.resolve(), "before", args, weights, image, args.before_home)
    bench(HERE.parent, "this checkout", args, weights, image)


if __name__ == "__main__":
    main()
