"""Several outputs from one pass against one run per output, on full-size VGG16, in one run.

Prints, for the same folder of photos (JPEGs of the sample photos at
500x375) and full-size random VGG16 weights (see throughput.py; or
--weights), each as a whole `vggembed` process:

- fc2 alone (`embed -o a.npy`);
- fc2 + pool5:avg + top 5 in one pass (`embed -o b.npz --layer fc2 --layer pool5:avg --top 5`);
- the three as separate runs (`embed --layer fc2`, `embed --layer pool5:avg`, `classify -o preds.npz`).

images/s is the run's own figure (decode + network + write, without
start-up); seconds are the whole processes' (start-up included). The
ratios are to fc2 alone. Machines are noisy: the runs alternate, --rounds
times, and the medians are printed.

    python benchmarks/multi_output.py --images 64
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import make_jpegs, random_weights  # noqa: E402

RATE = re.compile(r"in ([\d.]+)s \(([\d.]+) images/s\)")


def timed(args: list[str]) -> tuple[float, float]:
    """(whole-process seconds, the run's own images/s) of one `vggembed` command."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vggembed", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"vggembed {' '.join(args)} failed:\n{proc.stderr}")
    run_seconds = float(RATE.search(proc.stderr).group(1))
    return seconds, run_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a VGG16 .npz/.mat (default: full-size random weights)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    weights = args.weights or str(random_weights())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        make_jpegs(folder, args.images, (500, 375))
        common = [str(folder), "--weights", weights, "--batch-size", str(args.batch_size), "--overwrite"]
        plans = {
            "fc2 alone": [["embed", *common, "-o", str(tmp / "a.npy")]],
            "fc2 + pool5:avg + top 5, one pass": [["embed", *common, "-o", str(tmp / "b.npz"), "--layer", "fc2",
                                                   "--layer", "pool5:avg", "--top", "5"]],
            "the three as separate runs": [["embed", *common, "-o", str(tmp / "c1.npy"), "--layer", "fc2"],
                                           ["embed", *common, "-o", str(tmp / "c2.npy"), "--layer", "pool5:avg"],
                                           ["classify", *common, "-o", str(tmp / "c3.npz"), "--top", "5"]],
        }
        whole: dict = {name: [] for name in plans}
        runs: dict = {name: [] for name in plans}
        for _ in range(args.rounds):
            for name, commands in plans.items():
                times = [timed(c) for c in commands]
                whole[name].append(sum(t[0] for t in times))
                runs[name].append(sum(t[1] for t in times))
        print(f"{args.images} images (500x375 JPEGs), batch {args.batch_size}, weights {Path(weights).name}, "
              f"median of {args.rounds} round(s)")
        print(f"{'':>36} {'images/s':>9} {'time':>6} {'process s':>10} {'time':>6}   (time: x fc2 alone)")
        base_run, base_whole = statistics.median(runs["fc2 alone"]), statistics.median(whole["fc2 alone"])
        for name in plans:
            r, w = statistics.median(runs[name]), statistics.median(whole[name])
            print(f"{name:>36} {args.images / r:>9.2f} {r / base_run:>5.2f}x {w:>10.1f} {w / base_whole:>5.2f}x")


if __name__ == "__main__":
    main()
