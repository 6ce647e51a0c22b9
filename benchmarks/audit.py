"""`vggembed audit`: how well it finds planted mislabels in real images, and its wall time and peak memory at scale.

--part digits: scikit-learn's digits (1,797 8x8 images of 10 classes), upscaled to 64x64 RGB PNGs in class
folders (as benchmarks/train.py writes them), with 5% of them (seeded) moved to a wrong class's folder. Then
`vggembed audit digits/ --folders -o OUT` run as a user runs it (a subprocess: the images embedded with a
full-size VGG16, --weights, default a synthetic one with random weights, as the published ones cannot be
downloaded everywhere; then the audit with its default head). Printed: the share of planted mislabels among
the top-ranked label issues, as many as were planted (recall@planted), from `label_issues.csv`; beside it,
cleanlab's `find_label_issues` (ranked by self-confidence) on the same out-of-fold probabilities, read from
the audit's `probabilities.npz` (cleanlab is AGPL: installed for the benchmark only, never a dependency; its
row says so when it is missing); and the run's wall time and peak memory.

--part scale (the default): for each size N, in a fresh subprocess (peak RSS from wait4's ru_maxrss):
synthetic 4096-d vectors of C classes (ReLU'd random projections of a 64-d
mixture: one Gaussian per class plus noise, so classes overlap a little, as
real embeddings do), written to an `.npy` + index on disk a block at a time
and opened with `open_vectors` (read in blocks, never whole); 5% of the
labels moved to another class at random; a few exact copies planted so
there are near-duplicate groups. Then `audit.audit` as the command runs it
(k = 10, threshold 0.95) and `audit.write` (the CSVs and the HTML report),
with the label issues' probabilities from the head `vggembed train` fits
(`head`) or from the k-NN vote (`knn`). Printed side by side:

- seconds: the whole audit (with its CSVs and HTML report), its k-NN pass
  (the one all-pairs pass), the within-class passes, and the out-of-fold
  probabilities;
- peak RSS of the process (the vectors stay on disk: all of it is overhead);
- recall@planted: the share of planted mislabels among the top-ranked label
  issues, as many as were planted; the same figure from cleanlab's
  `find_label_issues` on the same out-of-fold probabilities when cleanlab is
  installed (it is AGPL: benchmark only, never a dependency).

    python benchmarks/audit.py                                   # 5,000 and 20,000 x 4096, 100 classes
    python benchmarks/audit.py --sizes 100000 --methods knn      # the 100k target
    python benchmarks/audit.py --part digits                     # planted mislabels in real images
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402

VGGEMBED = [sys.executable, "-m", "vggembed"]


NOISE = 1.5  # per latent dimension, against class centres of unit scale: classes overlap a little


def make(folder: Path, n: int, dim: int, classes: int, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """feats.npy + index of n vectors, written a block at a time with plain writes (no memory map, whose dirty
    pages would count in the peak RSS measured); (path, true class, given class)."""
    rng = np.random.default_rng(seed)
    latent = 64
    centres = rng.normal(size=(classes, latent))
    proj = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
    truth = rng.integers(0, classes, n)
    out = folder / "feats.npy"
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for a in range(0, n, 4096):
            b = min(n, a + 4096)
            z = centres[truth[a:b]] + rng.normal(size=(b - a, latent)) * NOISE
            block = np.maximum(z.astype(np.float32) @ proj, 0)
            for c in rng.choice(b - a, max(1, (b - a) // 200), replace=False):  # exact copies: near-duplicates
                if c > 0:
                    src = rng.integers(0, c)
                    block[c] = block[src]
                    truth[a + c] = truth[a + src]
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
    with open(folder / "feats.npy.index.csv", "w") as f:
        f.write("path,row,error\n")
        f.writelines(f"img/{i:07d}.jpg,{i},\n" for i in range(n))
    given = truth.copy()
    planted = rng.choice(n, n // 20, replace=False)
    given[planted] = (truth[planted] + rng.integers(1, classes, len(planted))) % classes
    return out, truth, given


def child(n: int, dim: int, classes: int, method: str) -> None:
    from vggembed.store.recipe import Recipe
    from vggembed.store.vectors import open_vectors
    from vggembed.use import audit

    with tempfile.TemporaryDirectory(prefix="vggembed-audit-") as tmp:
        tmp = Path(tmp)
        path, truth, given = make(tmp, n, dim, classes)
        planted = np.flatnonzero(given != truth)
        with open_vectors(path) as v:
            v.recipe = Recipe(weights="synthetic.npz")  # the head needs a recipe; the vectors' meaning is moot
            rows = audit.Rows([v])
            t0 = time.perf_counter()
            result = audit.audit(rows, labels=[f"c{g:03d}" for g in given], k=10, threshold=0.95,
                                 probabilities=method)
            audit.write(result, tmp / "out", source="feats.npy")
            total = time.perf_counter() - t0
        top = {x.row for x in result.issues[: len(planted)]}
        recall = len(top & set(planted.tolist())) / max(len(planted), 1)
        cleanlab = None
        try:
            from cleanlab.filter import find_label_issues
        except ImportError:
            find_label_issues = None
        if find_label_issues is not None:  # the same out-of-fold probabilities, ranked by cleanlab
            ranked = find_label_issues(result.given, result.proba, return_indices_ranked_by="self_confidence")
            top = set(ranked[: len(planted)].tolist())
            cleanlab = len(top & set(planted.tolist())) / len(planted)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"total": total, "knn": result.seconds["knn"], "classes": result.seconds["classes"],
                      "proba": result.seconds["probabilities"], "recall": recall, "cleanlab": cleanlab, "rss": rss,
                      "planted": int(len(planted)), "method": result.method}))


def run_child(n, dim, classes, method) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(dim), str(classes), method],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"audit of {n} vectors failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_digits(root: Path, share: float, seed: int, images: int | None) -> tuple[int, set[int]]:
    """root/CLASS/NNNN.png for the digits (the first `images` of them), `share` of them (seeded) filed under a
    class other than their own; (how many images, the numbers NNNN of the planted ones)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    pictures, truth = data.images[:images], data.target[:images]
    rng = np.random.default_rng(seed)
    planted = rng.choice(len(truth), round(share * len(truth)), replace=False)
    given = truth.copy()
    given[planted] = (truth[planted] + rng.integers(1, 10, len(planted))) % 10
    for i, (image, label) in enumerate(zip(pictures, given)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).convert("RGB").save(folder / f"{i:04d}.png")
    return len(truth), set(planted.tolist())


def digits(args) -> None:
    from vggembed.net import synthetic

    with tempfile.TemporaryDirectory(prefix="vggembed-audit-digits-") as tmp:
        tmp = Path(tmp)
        weights = args.weights
        if weights is None:
            weights = str(synthetic.write_npz(synthetic.make_params("vgg16", seed=0), tmp / "vgg16_full.npz"))
        root, out = tmp / "digits", tmp / "audit"
        n, planted = write_digits(root, args.share, args.seed, args.images)
        log = tmp / "audit.log"
        # this checkout's vggembed, wherever the benchmark is started from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(log, "w") as err:
            m = measure(VGGEMBED + ["audit", str(root), "--folders", "-o", str(out), "--weights", weights],
                        stdout=subprocess.DEVNULL, stderr=err, env=env)
        text = log.read_text()
        if m.returncode:
            raise SystemExit(f"vggembed audit failed (exit {m.returncode}):\n{text}")
        number = lambda path: int(Path(path).stem)  # noqa: E731 - NNNN.png is digit NNNN
        with open(out / "label_issues.csv", newline="") as f:
            ranked = [number(r["path"]) for r in csv.DictReader(f)]
        ours = len(set(ranked[: len(planted)]) & planted) / len(planted)
        with np.load(out / "probabilities.npz") as z:
            paths, given, proba, method = z["paths"].tolist(), z["given"], z["proba"], str(z["method"])
        try:
            from cleanlab.filter import find_label_issues
        except ImportError:
            theirs, flagged = None, None
        else:
            found = find_label_issues(given, proba, return_indices_ranked_by="self_confidence")
            flagged = len(found)
            theirs = len({number(paths[i]) for i in found[: len(planted)]} & planted) / len(planted)
        embedded = re.search(r"embedded \d+ of \d+ images in ([\d.]+)s", text)
        embedding = float(embedded.group(1)) if embedded else float("nan")
    top1 = float(np.mean(np.argmax(proba, axis=1) == given))
    print(f"digits: {n} images of 10 classes, {len(planted)} ({args.share:.0%}) moved to a wrong class's folder "
          f"(seed {args.seed}); weights {Path(args.weights).name if args.weights else 'synthetic full-size VGG16'}")
    print(f"label issues' probabilities: {method}; out-of-fold top-1 against the given labels {top1:.4f}")
    print(f"    {'':<48}{'recall@planted':>15}")
    print(f"    {'vggembed audit (self-confidence + neighbours)':<48}{ours:>15.3f}")
    if theirs is None:
        print(f"    {'cleanlab find_label_issues':<48}{'-':>15}   (not installed: pip install cleanlab, "
              "for the benchmark only)")
    else:
        print(f"    {'cleanlab find_label_issues (self_confidence)':<48}{theirs:>15.3f}   ({flagged} flagged)")
    print(f"vggembed audit's whole run: {m.wall:.1f} s (embedding {embedding:.1f} s), CPU {m.cpu:.1f} s, "
          f"peak {m.peak_mib:.0f} MiB")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["scale", "digits"], default="scale")
    ap.add_argument("--sizes", default="5000,20000", help="scale: the numbers of vectors")
    ap.add_argument("--dim", type=int, default=4096, help="scale: their width")
    ap.add_argument("--classes", type=int, default=100, help="scale: their classes")
    ap.add_argument("--methods", default="knn,head", help="scale: where label issues' probabilities come from")
    ap.add_argument("--weights", help="digits: the VGG16 weight file (default: a synthetic full-size one)")
    ap.add_argument("--share", type=float, default=0.05, help="digits: the share of labels moved")
    ap.add_argument("--seed", type=int, default=0, help="digits: which labels are moved, and where")
    ap.add_argument("--images", type=int, help="digits: only the first N images (default all 1,797)")
    args = ap.parse_args()
    if args.part == "digits":
        digits(args)
        return
    print(f"{'vectors':>8} {'probabilities':>13} {'seconds':>8} {'k-NN pass':>10} {'in class':>9} {'proba':>7} "
          f"{'peak RSS':>9} {'recall@planted':>15} {'cleanlab':>9}", flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        for method in args.methods.split(","):
            r = run_child(n, args.dim, args.classes, method)
            cl = "-" if r["cleanlab"] is None else f"{r['cleanlab']:.3f}"
            print(f"{n:>8} {method:>13} {r['total']:>8.1f} {r['knn']:>9.1f}s {r['classes']:>8.1f}s "
                  f"{r['proba']:>6.1f}s {r['rss'] / 2**20:>7.0f}MB "
                  f"{r['recall']:>15.3f} {cl:>9}", flush=True)
    print(f"{args.dim}-d float32 vectors, {args.classes} classes, 5% of labels moved; peak RSS of the whole process "
          f"(Python, numpy, pyarrow), the vectors read from disk in blocks")


if __name__ == "__main__":
    main()
