"""`vggembed train` against scikit-learn's LogisticRegression, side by side, in one run.

(a) digits: scikit-learn's bundled digits (1,797 images, 10 classes), upscaled to 64x64 PNGs in class
    folders, embedded with a full-size VGG16 (--weights; default: a full-size synthetic VGG16 with random
    weights, as real weights cannot be downloaded everywhere), then `vggembed train` (C sweep, 5 folds). Beside
    it, scikit-learn's StandardScaler + LogisticRegression(lbfgs) at the same C on the same vectors and the same
    folds, and a one-hidden-layer MLP head (the Keras tutorial's) on the same folds: out-of-fold top-1 of each.
(b) large: R x D float32 fc2-like vectors (non-negative, correlated, K classes), written as an embedding
    output. vggembed's whole `train` run (sweep, 5 folds, final fit) against ONE scikit-learn
    LogisticRegression(lbfgs) fit at the C vggembed chose, run until it stops on its tolerance, at its default
    tol (1e-4) and at the tol vggembed fits its head to (1e-5), and scikit-learn doing the same work as vggembed
    (a StandardScaler + LogisticRegression pipeline through 5-fold cross_val_predict, then the final fit, at that
    C): wall time, peak memory of each process (its own, see measure.py), how far each final model's objective
    is from the lowest, and how often they agree.

    python benchmarks/train.py --part digits
    python benchmarks/train.py --part large --rows 100000 --dim 4096 --classes 100
    python benchmarks/train.py --part large --rows 5000 --dim 256 --classes 10      # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Launch, measure  # noqa: E402

VGGEMBED = [sys.executable, "-m", "vggembed"]

SKLEARN_FIT = r"""
import json, sys, time
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
feats, labels, C, tol, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
X = np.load(feats, mmap_mode="r")
y = np.load(labels)
start = time.perf_counter()
scaler = StandardScaler()
Z = scaler.fit_transform(X)  # float32 in, float32 out; lbfgs then works on a float64 copy
model = LogisticRegression(C=C, tol=tol, max_iter=100_000).fit(Z, y)
seconds = time.perf_counter() - start
np.savez(out, predicted=model.predict(Z), coef=model.coef_.T, intercept=model.intercept_, mean=scaler.mean_,
         scale=scaler.scale_)
print(json.dumps({"seconds": seconds, "iterations": int(np.max(model.n_iter_))}))
"""

SKLEARN_WORKLOAD = r"""
import json, sys, time
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
feats, labels, C, folds = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
X = np.load(feats, mmap_mode="r")
y = np.load(labels)
start = time.perf_counter()
model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=100_000))  # each fold scaled by its own rows
proba = cross_val_predict(model, X, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                          method="predict_proba")
model.fit(X, y)
print(json.dumps({"seconds": time.perf_counter() - start, "top1": float(np.mean(proba.argmax(axis=1) == y))}))
"""

SKLEARN_OOF = r"""
import json, sys
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
feats, oof, C = sys.argv[1], sys.argv[2], float(sys.argv[3])
X = np.load(feats)
with np.load(oof) as z:
    paths, given, fold = z["paths"].tolist(), z["given"], z["fold"]
index = {p: i for i, p in enumerate(json.load(open(feats + ".paths.json")))}
X = X[[index[p] for p in paths]]
from sklearn.neural_network import MLPClassifier
out = {}
for name, make in (("logistic", lambda: LogisticRegression(C=C, max_iter=100_000)),
                   # the Keras tutorial's head: one hidden layer of 256 ReLU units (dropout there; L2 here)
                   ("mlp", lambda: MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=500,
                                                 early_stopping=True, random_state=0))):
    predicted = np.empty(len(given), np.int64)
    for f in np.unique(fold):
        model = make_pipeline(StandardScaler(), make())
        model.fit(X[fold != f], given[fold != f])
        predicted[fold == f] = model.predict(X[fold == f])
    out[name] = float(np.mean(predicted == given))
print(json.dumps(out))
"""


def write_output(path: Path, matrix_rows, rows: int, dim: int, paths: list[str]) -> None:
    """An embedding output vggembed reads (`OUT.npy`, `OUT.npy.index.csv`, `OUT.npy.meta.json`), in blocks."""
    from vggembed.store.recipe import Recipe, meta_json

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    start = 0
    for block in matrix_rows:
        out[start:start + len(block)] = block
        start += len(block)
    out.flush()
    del out
    with open(str(path) + ".index.csv", "w") as f:
        f.write("path,row,error\n" + "".join(f"{p},{i},\n" for i, p in enumerate(paths)))
    recipe = Recipe(weights="synthetic.npz", weights_md5="0" * 32, arch="vgg16")
    Path(str(path) + ".meta.json").write_bytes(meta_json(recipe, rows=rows, inputs=rows, failed=0))


def fc2_like(rows: int, dim: int, classes: int, seed: int = 0, block: int = 8192):
    """Blocks of non-negative, correlated, class-structured float32 rows, and the class of each row."""
    rng = np.random.default_rng(seed)
    latent = 256
    mixing = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    centres = rng.normal(0, 0.2, (classes, latent)).astype(np.float32)  # classes that overlap, as real ones
    y = rng.integers(0, classes, rows)

    def blocks():
        for start in range(0, rows, block):
            yb = y[start:start + block]
            z = centres[yb] + rng.standard_normal((len(yb), latent), dtype=np.float32)
            x = z @ mixing + 0.3 * rng.standard_normal((len(yb), dim), dtype=np.float32)
            yield np.maximum(x, 0, out=x)

    return blocks(), y


def run_train(args, tmp: Path, inputs: list[str], extra=()) -> tuple:
    head = tmp / "head.npz"
    cmd = VGGEMBED + ["train", *inputs, "-o", str(head), "--overwrite", *extra]
    m = measure(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if m.returncode not in (0, 3):
        raise SystemExit(f"vggembed train failed ({m.returncode})")
    with np.load(head) as z:
        C = float(z["C"])
        metrics = json.loads(str(z["metrics"]))
    return m, C, metrics, head


def digits(args, tmp: Path) -> None:
    from audit import write_digits  # benchmarks/audit.py: the same PNGs in class folders, none moved here

    from vggembed.net import synthetic

    weights = args.weights
    if weights is None:
        weights = str(synthetic.write_npz(synthetic.make_params("vgg16", seed=0), tmp / "vgg16_full.npz"))
    root = tmp / "digits"
    write_digits(root, share=0.0, seed=0, images=None)
    m, C, metrics, head = run_train(args, tmp, [str(root)], ["--weights", weights])
    feats = Path(str(head.with_suffix("")) + ".features.npy")
    from vggembed.store.vectors import open_vectors

    with open_vectors(feats) as v:
        Path(str(feats) + ".paths.json").write_text(json.dumps(v.paths))
    oof = str(head.with_suffix("")) + ".oof.npz"
    sk = subprocess.run([sys.executable, "-c", SKLEARN_OOF, str(feats), oof, str(C)], capture_output=True,
                        text=True, check=True)
    figures = json.loads(sk.stdout)
    theirs = figures["logistic"]
    print(f"(a) digits, {metrics['rows']} images, {len(metrics['class_counts'])} classes, {metrics['folds']} folds, "
          f"C = {C:.4g} (vggembed's sweep)")
    print(f"    {'':<34}{'out-of-fold top-1':>18}")
    print(f"    {'vggembed train':<34}{metrics['top1']:>18.4f}")
    print(f"    {'scikit-learn, same C and folds':<34}{theirs:>18.4f}")
    print(f"    {'scikit-learn MLP (256 ReLU), folds':<34}{figures['mlp']:>18.4f}")
    print(f"    difference {100 * (metrics['top1'] - theirs):+.2f} points; vggembed's whole run (embedding "
          f"included) {m.wall:.1f} s, peak {m.peak_mib:.0f} MiB")


def large(args, tmp: Path) -> None:
    rows, dim, k = args.rows, args.dim, args.classes
    blocks, y = fc2_like(rows, dim, k, seed=args.seed)
    paths = [f"c{c:03d}/{i:07d}.jpg" for i, c in enumerate(y)]
    feats = tmp / "feats.npy"
    write_output(feats, blocks, rows, dim, paths)
    np.save(tmp / "labels.npy", y)
    matrix_mib = rows * dim * 4 / 2**20
    ours, C, metrics, head = run_train(args, tmp, [str(feats)])
    import vggembed

    h = vggembed.load_head(head)
    x = np.load(feats, mmap_mode="r")
    y = np.load(tmp / "labels.npy")
    models = {"vggembed": (h.coef, h.intercept, h.mean, h.scale)}
    ours_predicted = np.argmax(h.predict_proba(x), axis=1)
    runs = []
    for tol in (1e-4, 1e-5):  # scikit-learn's default tol, and the one vggembed fits its head to
        out = tmp / f"sk_{tol:g}.npz"
        launched = Launch([sys.executable, "-c", SKLEARN_FIT, str(feats), str(tmp / "labels.npy"), str(C), str(tol),
                           str(out)], stdout=subprocess.PIPE)
        report = json.loads(launched.proc.stdout.read())
        measured = launched.wait()
        if measured.returncode != 0:
            raise SystemExit("scikit-learn's fit failed")
        with np.load(out) as z:
            models[tol] = (z["coef"], z["intercept"], z["mean"], z["scale"])
            agree = float(np.mean(ours_predicted == z["predicted"]))
        runs.append((tol, measured, report, agree))
    launched = Launch([sys.executable, "-c", SKLEARN_WORKLOAD, str(feats), str(tmp / "labels.npy"), str(C),
                       str(metrics["folds"])], stdout=subprocess.PIPE)
    workload_report = json.loads(launched.proc.stdout.read())
    workload = launched.wait()
    if workload.returncode != 0:
        raise SystemExit("scikit-learn's k-fold run failed")
    gap = {name: objective(x, y, C, *m) for name, m in models.items()}
    X = np.ascontiguousarray(x, np.float32)
    pass_seconds = one_pass(X, k)
    shared = one_pass(X, k * metrics["folds"])  # one pass serving the head and every fold but one a block
    del X
    best = min(gap.values())
    print(f"(b) {rows:,} x {dim:,} float32 fc2-like vectors ({matrix_mib:,.0f} MiB), {k} classes; "
          f"C = {C:.4g} (vggembed's sweep over {len(metrics['sweep'])} values), {metrics['folds']} folds")
    print(f"    {'':<50}{'wall s':>9}{'CPU s':>9}{'peak MiB':>10}{'peak / matrix':>15}{'objective gap':>15}")
    print(f"    {'vggembed train (sweep + 5 folds + head to 1e-5)':<50}{ours.wall:>9.1f}{ours.cpu:>9.1f}"
          f"{ours.peak_mib:>10.0f}{ours.peak_mib / matrix_mib:>15.2f}{gap['vggembed'] / best - 1:>15.1e}")
    for tol, measured, report, _ in runs:
        what = f"scikit-learn: one lbfgs fit, tol {tol:g} ({report['iterations']} it.)"
        print(f"    {what:<50}{measured.wall:>9.1f}{measured.cpu:>9.1f}{measured.peak_mib:>10.0f}"
              f"{measured.peak_mib / matrix_mib:>15.2f}{gap[tol] / best - 1:>15.1e}")
    what = f"scikit-learn: {metrics['folds']} folds + final, tol 1e-4, no sweep"
    print(f"    {what:<50}{workload.wall:>9.1f}{workload.cpu:>9.1f}{workload.peak_mib:>10.0f}"
          f"{workload.peak_mib / matrix_mib:>15.2f}{'':>15}")
    iterations = sum(r["iterations"] for r in metrics["sweep"])
    print("    (objective gap: the objective 0.5 |W|^2 + C * sum of cross-entropies over the lowest of the three, "
          "minus 1)")
    print(f"    out-of-fold top-1: vggembed {metrics['top1']:.4f}, scikit-learn's {metrics['folds']} folds (tol 1e-4, "
          f"no sweep) {workload_report['top1']:.4f}")
    print("    vggembed's head predicts as scikit-learn's for "
          + " and ".join(f"{100 * a:.2f}% (tol {t:g})" for t, _, _, a in runs)
          + f" of rows; iterations: vggembed's sweep {iterations} (on at most 10,000 rows), its head "
          f"{metrics['final_iterations']}")
    # The work in passes over all rows (one evaluation of the objective and its gradient on a fit's rows is
    # rows / N of a pass). The head and the folds share their passes: a block of rows serves the head and the
    # k - 1 folds that train on it with one product k * classes wide, which costs less than k narrow ones.
    sweep = sum(r["evaluations"] * r["rows"] for r in metrics["sweep"]) / rows
    folds = sum(f["evaluations"] * f["rows"] for f in metrics["fold_fits"]) / rows
    final = metrics["final_evaluations"]
    fewest = min(f["evaluations"] for f in metrics["fold_fits"])
    head_least = runs[0][2]["iterations"]
    print(f"    vggembed's work in passes over all {rows:,} rows: sweep {sweep:.1f}, folds {folds:.1f}, head {final}, "
          f"{metrics['fits_at_once']} fits at a time; one float32 pass (the two matrix products) takes "
          f"{pass_seconds:.2f} s here, one shared by {metrics['folds']} fits {shared:.2f} s "
          f"({shared / (metrics['folds'] * pass_seconds):.2f} of {metrics['folds']} passes)")
    # The least an exact run could do: the head in as many evaluations as scikit-learn's default fit took
    # iterations, each fold in as few as the quickest fold took, all sharing their passes, no sweep.
    k_folds = metrics["folds"]  # past the head's end, a block serves the k - 1 folds that train on it
    floor = (min(fewest, head_least) * shared + max(head_least - fewest, 0) * pass_seconds
             + max(fewest - head_least, 0) * shared * (k_folds - 1) / k_folds)
    print(f"    least work of an exact run: the head in scikit-learn's {head_least} iterations and each fold in "
          f"{fewest} evaluations, sharing passes: {floor:.1f} s of products, against scikit-learn's whole fit in "
          f"{runs[0][1].wall:.1f} s")


def one_pass(x: np.ndarray, classes: int, block: int = 32768) -> float:
    """Seconds of one pass of vggembed's solver over all rows, block by block as it runs: logits X @ W and the
    gradient's G.T @ X in float32, `classes` wide (the quickest of three, after one to warm up)."""
    import time

    W = np.full((x.shape[1], classes), 1e-3, np.float32)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        for first in range(0, len(x), block):
            X = x[first:first + block]
            z = X @ W
            _ = z.T @ X
        best = min(best, time.perf_counter() - start)
    return best


def objective(x, y, C: float, coef, intercept, mean, scale, block: int = 8192) -> float:
    """scikit-learn's objective of a model on standardised features, in float64, a block of rows at a time."""
    coef = np.asarray(coef, np.float64)
    total = 0.5 * float(np.sum(coef * coef))
    for start in range(0, len(x), block):
        z = (np.asarray(x[start:start + block], np.float64) - mean) / scale
        logits = z @ coef + intercept
        logits -= logits.max(axis=1, keepdims=True)
        rows = np.arange(len(logits))
        total += C * float(np.sum(np.log(np.exp(logits).sum(axis=1)) - logits[rows, y[start:start + block]]))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["digits", "large", "both"], default="both")
    parser.add_argument("--weights", help="(a): a full-size VGG16 file (default: synthetic, random)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("digits", "both"):
            digits(args, Path(tmp))
        if args.part in ("large", "both"):
            large(args, Path(tmp))


if __name__ == "__main__":
    main()
