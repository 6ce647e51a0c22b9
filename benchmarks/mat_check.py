"""What the crash check of `.mat` files costs: a first load (a child process parses the file, then this
process reads it) against a later load of the same file version (the verdict comes from the cache).

Writes a synthetic MatConvNet file in the published layout (full-size VGG16 by default, about 528 MB), then
times `vggembed.load_weights` on it with an empty cache and with the verdict cached, and the check alone
(`check_survivable`) both ways. The cache is a fresh temporary $VGGEMBED_HOME; the file is in the page cache for every row.

    python benchmarks/mat_check.py            # full-size VGG16
    python benchmarks/mat_check.py --tiny     # a tiny file, to see it run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from vggembed.net import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vgg16", choices=("vgg16", "vgg19"))
    parser.add_argument("--tiny", action="store_true", help="tiny widths instead of the published sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row; the fastest is printed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["VGGEMBED_HOME"] = str(tmp / "home")
        params = (synthetic.make_params(args.arch, (4, 8, 8, 16, 16), 32, 10) if args.tiny
                  else synthetic.make_params(args.arch))
        path = synthetic.write_mat(params, tmp / f"{args.arch}.mat")
        del params

        from vggembed.images.safeio import open_regular
        from vggembed.net.readers import mat
        from vggembed.net.weights import load_weights

        load_weights(path)  # warm: imports, page cache (and it writes the verdict: cleared below)

        def clear():
            for entry in (tmp / "home" / mat.VERDICT).iterdir():
                entry.unlink()

        def check():
            with open_regular(path, "weight file") as f:
                mat.check_survivable(f, path)

        def best(fn, fresh: bool) -> float:  # the fastest of --repeat: the least disturbed by other load
            times = []
            for _ in range(args.repeat):
                if fresh:
                    clear()
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        rows = [("first load (child check, then read)", best(lambda: load_weights(path), True)),
                ("later load (verdict cached)", best(lambda: load_weights(path), False)),
                ("the check, first time (the child)", best(check, True)),
                ("the check, verdict cached", best(check, False))]
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB; fastest of {args.repeat}")
        print(f"{'':<40}{'seconds':>10}")
        for name, seconds in rows:
            print(f"{name:<40}{seconds:>10.4f}")

if __name__ == "__main__":
    main()
