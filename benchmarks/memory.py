"""Peak memory of `vggembed embed` against the number of images.

Makes N small real-photo crops and tiny VGG-shaped weights, runs the real
CLI in a subprocess for each N, and prints its peak RSS: flat in N means
nothing accumulates per image.

    python benchmarks/memory.py --counts 2000,20000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vggembed.net import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="2000,20000", help="comma-separated image counts")
    parser.add_argument("--weights", help="weight file (default: tiny synthetic VGG16)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights
        if weights is None:
            weights = synthetic.write_npz(synthetic.make_params("vgg16", (4, 8, 8, 16, 16), 32, 10), tmp / "w.npz")
        counts = [int(c) for c in args.counts.split(",")]
        import skimage

        astronaut = Path(skimage.__file__).parent / "data" / "astronaut.png"
        synthetic.photo_crops(astronaut, tmp / "images", max(counts), suffix=".jpg")
        all_images = sorted((tmp / "images").iterdir())
        print(f"{'images':>8} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13}")
        for n in counts:
            listing = tmp / f"list{n}.txt"
            listing.write_text("\n".join(str(p) for p in all_images[:n]) + "\n")
            out = tmp / f"out{n}.npy"
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "vggembed", "embed", "--files-from", str(listing),
                                     "-o", str(out), "--weights", str(weights), "--batch-size", str(args.batch_size),
                                     "-q"])
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
            seconds = time.perf_counter() - start
            if status != 0:
                sys.exit(f"vggembed embed failed with status {status}")
            print(f"{n:>8} {seconds:>8.1f} {n / seconds:>9.1f} {usage.ru_maxrss / 1024:>13.0f}")
            os.remove(out)


if __name__ == "__main__":
    main()
