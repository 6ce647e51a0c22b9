"""Peak memory of `vggembed embed` against the number of images.

Makes N small real-photo crops and tiny VGG-shaped weights, runs the real
CLI in a subprocess for each N, and prints its peak RSS: flat in N means
nothing accumulates per image.

    python benchmarks/memory.py --counts 2000,20000
    python benchmarks/memory.py --counts 300,1500 --wide --layer fc2,pool5:flatten --ext .npz

--wide gives the tiny weights VGG16's own 512 channels in block 5, so
pool5:flatten is VGG16's 25,088-d (100 KB a row).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from vggembed.net import synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="2000,20000", help="comma-separated image counts")
    parser.add_argument("--weights", help="weight file (default: tiny synthetic VGG16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layer", help="--layer value(s) for embed, e.g. fc2,pool5:flatten")
    parser.add_argument("--ext", default=".npy", help="output format (.npy, .npz, .parquet, .csv)")
    parser.add_argument("--wide", action="store_true", help="512 channels in block 5 (pool5 is 25,088-d)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights
        if weights is None:
            widths = (4, 8, 8, 16, 512 if args.wide else 16)
            weights = synthetic.write_npz(synthetic.make_params("vgg16", widths, 32, 10), tmp / "w.npz")
        counts = [int(c) for c in args.counts.split(",")]
        import skimage

        astronaut = Path(skimage.__file__).parent / "data" / "astronaut.png"
        synthetic.photo_crops(astronaut, tmp / "images", max(counts), suffix=".jpg")
        all_images = sorted((tmp / "images").iterdir())
        print(f"{'images':>8} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13}")
        for n in counts:
            listing = tmp / f"list{n}.txt"
            listing.write_text("\n".join(str(p) for p in all_images[:n]) + "\n")
            out = tmp / f"out{n}{args.ext}"
            run = measure([sys.executable, "-m", "vggembed", "embed", "--files-from", str(listing),  # its own peak
                           "-o", str(out), "--weights", str(weights), "--batch-size", str(args.batch_size),
                           "-q"] + (["--layer", args.layer] if args.layer else []))
            if run.returncode != 0:
                sys.exit(f"vggembed embed failed with status {run.returncode}")
            print(f"{n:>8} {run.wall:>8.1f} {n / run.wall:>9.1f} {run.peak_mib:>13.0f}")
            os.remove(out)


if __name__ == "__main__":
    main()
