"""The --engine ray driver's cost as the run grows, and Ray throughput beside the local engine, in one run.

Two measurements, each run in a fresh child process per case:

1. Driver scaling: the same job at 2 and at 20 parts (PART images each), with
   an fc2-sized embedding (4096 float32 = 16 KB per image; small conv layers
   so it runs in seconds). For the driver process: its peak RSS
   (VmHWM), the bytes its Python code receives from the cluster
   (counted: the pickled size of every value `ray.get` returns to the engine,
   or, for the Ray Data engine of before, the nbytes of every batch
   `iter_batches` yields), and `rchar` from /proc/self/io (every byte its
   read() calls returned: sockets and files; objects that arrive through
   Ray's shared-memory object store are not reads and do not show there,
   which is why the counted bytes are the measure that matters).
2. Throughput on this machine's single-node runtime: full-size VGG16
   (random weights) over IMAGES photo crops, Ray engine vs the local engine,
   images/s over the whole call (Ray: actor start-up and weight loading
   included).

With `--before DIR` (a checkout of an earlier vggembed, e.g.
`git archive 6b35f1f | tar -x -C /tmp/before`), every Ray case is also run
with that code, side by side.

    python benchmarks/ray_driver.py
    python benchmarks/ray_driver.py --before /tmp/before --images 192
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One case, in this process: print a JSON line of figures."""
    import ray

    from vggembed.engines import ray as ray_engine
    from vggembed.store.recipe import Recipe
    from vggembed.engines.local import Options

    paths = sorted(str(p) for p in Path(args.images_dir).iterdir())[: args.n]
    received = {"bytes": 0}
    if args.engine == "ray":
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        if hasattr(ray_engine, "PartWorker"):  # parts written by the actors: the driver gets statuses
            real_get = ray.get

            def counted_get(refs, *a, **kw):
                value = real_get(refs, *a, **kw)
                received["bytes"] += len(pickle.dumps(value))
                return value

            ray.get = counted_get
        else:  # the Ray Data engine of before: the driver iterates the batches of vectors
            real_iter = ray.data.Dataset.iter_batches

            def counted_iter(self, *a, **kw):
                for batch in real_iter(self, *a, **kw):
                    received["bytes"] += sum(v.nbytes for v in batch.values())
                    yield batch

            ray.data.Dataset.iter_batches = counted_iter
    rchar0 = _rchar()
    start = time.perf_counter()
    if args.engine == "ray":
        counts = ray_engine.embed(paths, args.out, Recipe(weights=args.weights), Options(batch_size=16, workers=1),
                                   part_size=args.part_size, log=lambda line: None)
        images = counts["images"] if isinstance(counts, dict) else counts.images
    else:
        import vggembed
        from vggembed.engines import local as runner
        from vggembed.store.writer import EmbeddingWriter

        recipe = Recipe(weights=args.weights)
        summary = runner.embed(vggembed.load(args.weights), iter(paths), EmbeddingWriter(args.out), recipe,
                               Options(batch_size=16, workers=2))
        images = summary.images
    seconds = time.perf_counter() - start
    print(json.dumps({"images": images, "seconds": seconds, "rss_mib": _peak_mib(), "received": received["bytes"],
                      "rchar": _rchar() - rchar0}))
    if args.engine == "ray":
        ray.shutdown()


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _peak_mib() -> float:
    """This process's peak RSS (VmHWM: since its exec, unlike ru_maxrss, which keeps the forking parent's)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


def case(code: Path, engine: str, weights: Path, images: Path, n: int, part_size: int, work: Path) -> dict:
    out = work / f"out-{time.time_ns()}{'' if engine == 'ray' else '.npy'}"
    env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, __file__, "--child", "--engine", engine, "--weights", str(weights),
                           "--images-dir", str(images), "--n", str(n), "--part-size", str(part_size),
                           "--out", str(out)], capture_output=True, text=True, env=env, check=False, cwd=code)
    if proc.returncode != 0:
        raise SystemExit(f"case failed ({code}, {engine}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="ray", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--images-dir", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--part-size", type=int, default=50, help="images per part in the scaling runs")
    p.add_argument("--images", type=int, default=96, help="images in the throughput runs")
    p.add_argument("--before", type=Path, help="an earlier vggembed checkout to compare with")
    p.add_argument("--skip", choices=["scaling", "throughput"], help="leave one measurement out")
    args = p.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(HERE))
    from vggembed.net import synthetic

    photo = next(Path(__import__("matplotlib").get_data_path()).glob("sample_data/grace_hopper.jpg"))
    codes = [("now", HERE)] + ([("before", args.before.resolve())] if args.before else [])
    with tempfile.TemporaryDirectory(prefix="vggembed-raybench-") as tmp:
        work = Path(tmp)
        if args.skip != "scaling":
            small = synthetic.write_npz(synthetic.make_params("vgg16", (4, 8, 8, 16, 16), 4096, 10), work / "w.npz")
            imgs = work / "scaling"
            synthetic.photo_crops(photo, imgs, 20 * args.part_size, size=(64, 48), suffix=".jpg")
            print(f"driver at 2 and 20 parts of {args.part_size} images, fc2 width 4096 (16 KB per image):")
            print(f"{'code':8} {'parts':>5} {'images':>6} {'peak RSS MiB':>12} {'received bytes':>15} "
                  f"{'per image':>10} {'rchar bytes':>12} {'seconds':>8}")
            for name, code in codes:
                for parts in (2, 20):
                    r = case(code, "ray", small, imgs, parts * args.part_size, args.part_size, work)
                    print(f"{name:8} {parts:>5} {r['images']:>6} {r['rss_mib']:>12.0f} {r['received']:>15,} "
                          f"{r['received'] / r['images']:>10.0f} {r['rchar']:>12,} {r['seconds']:>8.1f}")
        if args.skip != "throughput":
            full = synthetic.write_npz(synthetic.make_params("vgg16"), work / "vgg16.npz")
            imgs = work / "throughput"
            synthetic.photo_crops(photo, imgs, args.images, size=(320, 240), suffix=".jpg")
            print(f"\nthroughput, full-size VGG16 fc2, {args.images} 320x240 JPEGs, batch 16, this machine "
                  f"({os.cpu_count()} cores); Ray: 1 model actor, parts of 32, start-up included:")
            rows = [(f"local ({codes[0][0]})", codes[0][1], "local")]
            rows += [(f"ray ({name})", code, "ray") for name, code in codes]
            for label, code, engine in rows:
                r = case(code, engine, full, imgs, args.images, 32, work)
                print(f"{label:14} {r['images'] / r['seconds']:6.2f} images/s ({r['seconds']:.1f}s, driver peak RSS "
                      f"{r['rss_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
