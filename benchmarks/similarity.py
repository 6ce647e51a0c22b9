"""Scale of `vggembed search / dedup`: peak memory against N, all-pairs speed against the machine's matmul, ANN recall.

Prints, in one run:

1. the machine's own float32 matrix-multiply rate (numpy, TensorFlow float32
   and bf16; 8192x4096 @ 4096x8192), and numpy's again without
   OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE when the environment sets them;
2. peak RSS and time of an exact top-10 search (100 queries) and of the
   blocked all-pairs pass at each size (fresh subprocess each, ru_maxrss
   from wait4). At the largest size the all-pairs pass is run for its first
   outer block only (every row is read and multiplied once): its memory is
   the full pass's, its time 1/blocks of it;
3. the all-pairs pass at the middle size timed whole, as a fraction of the
   matmul rate (float32 numpy, and bf16 candidates re-checked in float32);
4. scikit-learn's `cosine_similarity` on the whole matrix, under an address
   space limit, until it fails;
5. faiss (`vggembed.ann`: PCA to 256 dims, IVF, inner product) recall@10 against exact
   search at the largest size.

Vectors are written to disk a block at a time (never whole in memory):
4096-d, ReLU'd random projections of a 64-d mixture of 2,000 Gaussian
clusters plus noise, so they have the low intrinsic dimension and the
neighbourhoods of real embeddings and recall means something.

    flock -x /tmp/vggembed-cpu.lock python benchmarks/similarity.py     # 10k, 100k, 300k (4.9 GB in /tmp)
    python benchmarks/similarity.py --sizes 2000,5000 --pairs-size 5000  # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from measure import Launch  # noqa: E402
GIB = 1 << 30


# -------------------------------------------------------------- the data
def generate(path: Path, rows: int, dim: int, block: int = 8192, seed: int = 0) -> None:
    """Structured vectors, written a block at a time with their index (the first rows of every size agree)."""
    from vggembed.store.writer import npy_header

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, 64)).astype(np.float32)
    proj = (rng.standard_normal((64, dim)) / 8).astype(np.float32)
    with open(path, "wb") as f, open(f"{path}.index.csv", "w", newline="", encoding="utf-8") as idx:
        f.write(npy_header(rows, dim, np.float32))
        w = csv.writer(idx)
        w.writerow(["path", "row", "error"])
        for a in range(0, rows, block):
            n = min(block, rows - a)
            brng = np.random.default_rng([seed, a])
            z = centres[brng.integers(0, len(centres), n)] + 0.35 * brng.standard_normal((n, 64), dtype=np.float32)
            x = np.maximum(z @ proj, 0) + 0.05 * brng.standard_normal((n, dim), dtype=np.float32)
            f.write(x.astype(np.float32).tobytes())
            w.writerows([f"img{i:07d}.jpg", i, ""] for i in range(a, a + n))


# ------------------------------------------------------- child processes
def child(kind: str, args: dict) -> dict:
    if kind == "matmul":
        return matmul_rates(args.get("tf", True))
    from vggembed.use import similarity
    from vggembed.store.vectors import open_vectors

    if kind == "search":
        with open_vectors(args["index"]) as v:
            q = v.read(0, 100)
            t = time.perf_counter()
            similarity.top_k(v, q, 10)
            return {"seconds": time.perf_counter() - t}
    if kind == "pairs":
        if args["precision"] == "bf16":
            from vggembed.net.tfimport import tensorflow

            tensorflow()  # its import is start-up, not the pass
        with open_vectors(args["index"]) as v:
            t = time.perf_counter()
            b = similarity.BLOCK_ROWS
            starts = range(0, v.rows, b) if not args.get("first_block") else [0]
            found = sum(len(similarity.block_pairs(v, a, 0.95, precision=args["precision"])[0]) for a in starts)
            seconds = time.perf_counter() - t
            flop = sum(2 * v.dim * min(b, v.rows - a) * (v.rows - a) for a in starts)  # blocks j >= i, as computed
            return {"seconds": seconds, "pairs": found, "gflops": flop / seconds / 1e9,
                    "blocks": len(range(0, v.rows, b))}
    if kind == "sklearn":
        from sklearn.metrics.pairwise import cosine_similarity

        x = np.array(np.load(args["index"], mmap_mode="r")[: args["rows"]])
        t = time.perf_counter()
        s = cosine_similarity(x)
        return {"seconds": time.perf_counter() - t, "shape": list(s.shape), "dtype": str(s.dtype)}
    if kind == "faiss":
        return faiss_recall(args["index"])
    raise ValueError(kind)


def matmul_rates(with_tf: bool) -> dict:
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8192, 4096), dtype=np.float32)
    b = rng.standard_normal((8192, 4096), dtype=np.float32)
    flop = 2 * 8192 * 8192 * 4096

    def best(f, n=3):
        f()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return flop / min(times) / 1e9

    blas = [f"{i['internal_api']} {i.get('architecture')}" for i in threadpool_info() if i["user_api"] == "blas"]
    out = {"numpy": best(lambda: a @ b.T), "blas": ", ".join(blas)}
    if with_tf:
        from vggembed.net.tfimport import tensorflow

        tf = tensorflow()
        ta, tb = tf.constant(a), tf.constant(b)
        out["tf_float32"] = best(lambda: tf.matmul(ta, tb, transpose_b=True).numpy())
        ha, hb = tf.cast(ta, tf.bfloat16), tf.cast(tb, tf.bfloat16)
        out["tf_bf16"] = best(lambda: tf.matmul(ha, hb, transpose_b=True).numpy())
    return out


def faiss_recall(index: str, queries: int = 1000, k: int = 10) -> dict:
    from vggembed.use import ann
    from vggembed.use import similarity
    from vggembed.store.vectors import open_vectors

    with open_vectors(index) as v:
        rng = np.random.default_rng(1)
        q_rows = np.sort(rng.choice(v.rows, queries, replace=False))
        q = v.take(q_rows)
        t = time.perf_counter()
        exact = similarity.top_k(v, q, k, exclude=list(q_rows))
        exact_s = time.perf_counter() - t
        truth = [{r for r, _ in hits} for hits in exact]
        t = time.perf_counter()
        built = ann.build(v)
        out = {"exact_seconds": exact_s, "build_seconds": time.perf_counter() - t,
               "lists": ann.default_lists(v.rows)}
        for nprobe in (8, 32, 128):
            t = time.perf_counter()
            found = ann.search(built, v, q, k, nprobe=nprobe, exclude=list(q_rows))
            seconds = time.perf_counter() - t
            recall = np.mean([len(truth[i] & {r for r, _ in found[i]}) / k for i in range(queries)])
            out[f"nprobe{nprobe}"] = {"recall": float(recall), "seconds": seconds}
        return out


def run_child(kind: str, args: dict, *, address_space: int | None = None, env=None) -> dict:
    """Run one measurement in a fresh interpreter; peak RSS from wait4, its own (`measure.py`)."""
    def limit():
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    launch = Launch([sys.executable, __file__, "--child", kind, json.dumps(args)], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, preexec_fn=limit, env=env)
    out, err = launch.proc.communicate()
    run = launch.wait()
    code = run.returncode
    result = {"peak_rss_mib": run.peak_mib, "ok": code == 0}
    if result["ok"]:
        result.update(json.loads(out.decode().strip().splitlines()[-1]))
    else:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        result["error"] = lines[-1] if lines else (f"killed by {signal.Signals(-code).name}" if code < 0
                                                   else f"exit {code}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,300000")
    ap.add_argument("--pairs-size", type=int, default=100_000, help="the size whose all-pairs pass is timed whole")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--sklearn-sizes", default="10000,30000,100000")
    ap.add_argument("--sklearn-limit-gib", type=float, default=8.0, help="address space cap for scikit-learn")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: matmul,bf16,sklearn,faiss")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    skip = set(args.skip.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="vggembed-bench-", dir="/tmp"))
    try:
        files = {}
        for n in sorted(set(sizes + [args.pairs_size])):
            t = time.perf_counter()
            files[n] = tmp / f"v{n}.npy"
            generate(files[n], n, args.dim)
            print(f"wrote {n} x {args.dim} float32 ({files[n].stat().st_size / GIB:.2f} GiB) in "
                  f"{time.perf_counter() - t:.0f}s", flush=True)

        rates = {}
        if "matmul" not in skip:
            m = run_child("matmul", {})
            rates = {"float32": (m["numpy"], "numpy float32"), "bf16": (m["tf_bf16"], "TensorFlow bf16")}
            print(f"\nmatmul 8192x4096x8192 (best of 3): numpy float32 {m['numpy']:.0f} GFLOP/s ({m['blas']}), "
                  f"TensorFlow float32 {m['tf_float32']:.0f}, TensorFlow bf16 {m['tf_bf16']:.0f}", flush=True)
            if os.environ.get("OPENBLAS_CORETYPE"):
                env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
                m2 = run_child("matmul", {"tf": False}, env=env)
                print(f"  numpy without OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}: {m2['numpy']:.0f} "
                      f"GFLOP/s ({m2['blas']}); the figures below use the environment as set", flush=True)
            else:
                print("  (OPENBLAS_CORETYPE is not set in this environment)", flush=True)

        whole = {}  # the float32 all-pairs runs of the table, reused below
        print(f"\n{'vectors':>8} {'GiB':>5} | {'search 100q top-10':>19} {'peak RSS':>9} | "
              f"{'all pairs >= 0.95':>22} {'peak RSS':>9}", flush=True)
        for n in sizes:
            s = run_child("search", {"index": str(files[n])})
            first = n > args.pairs_size
            p = run_child("pairs", {"index": str(files[n]), "precision": "float32", "first_block": first})
            whole[n] = p
            what = (f"{p['seconds']:7.1f}s (1st of {p['blocks']} blocks)" if first
                    else f"{p['seconds']:7.1f}s {p['pairs']:>8} pairs") if p["ok"] else p["error"][:22]
            print(f"{n:>8} {files[n].stat().st_size / GIB:5.2f} | {s.get('seconds', 0):18.1f}s "
                  f"{s['peak_rss_mib']:6.0f} MiB | {what:>22} {p['peak_rss_mib']:6.0f} MiB", flush=True)

        n = args.pairs_size
        print(f"\nall pairs of {n} x {args.dim} (blocks j >= i: {n * n * args.dim / 1e12:.1f} TFLOP):", flush=True)
        for precision in ("float32", "bf16"):
            if precision == "bf16" and "bf16" in skip:
                continue
            p = whole.get(n) if precision == "float32" else None
            p = p or run_child("pairs", {"index": str(files[n]), "precision": precision})
            if not p["ok"]:
                print(f"  {precision}: failed: {p['error']}")
                continue
            rate, what = rates.get(precision, (None, ""))
            frac = f", {p['gflops'] / rate:.0%} of the {what} matmul rate" if rate else ""
            print(f"  {precision:7s}: {p['seconds']:.1f}s ({p['seconds'] / 60:.1f} min), {p['gflops']:.0f} GFLOP/s"
                  f"{frac}, {p['pairs']} pairs, peak RSS {p['peak_rss_mib']:.0f} MiB", flush=True)

        if "sklearn" not in skip:
            cap = int(args.sklearn_limit_gib * GIB)
            print(f"\nscikit-learn cosine_similarity(X) on the whole matrix (address space capped at "
                  f"{args.sklearn_limit_gib:g} GiB):", flush=True)
            for m in [int(s) for s in args.sklearn_sizes.split(",")]:
                src = min((k for k in files if k >= m), default=None)
                if src is None:
                    continue
                r = run_child("sklearn", {"index": str(files[src]), "rows": m}, address_space=cap)
                if r["ok"]:
                    print(f"  {m:>7}: {r['seconds']:.1f}s, peak RSS {r['peak_rss_mib']:.0f} MiB "
                          f"({r['shape'][0]}x{r['shape'][1]} {r['dtype']} result)", flush=True)
                else:
                    print(f"  {m:>7}: failed ({r['error'][:120]}), peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
                    break

        if "faiss" not in skip:
            n = max(sizes)
            r = run_child("faiss", {"index": str(files[n])})
            if r["ok"]:
                print(f"\nfaiss PCA256 + IVF{r['lists']} (inner product; hits re-scored exactly) on {n}: built in "
                      f"{r['build_seconds']:.0f}s, peak RSS {r['peak_rss_mib']:.0f} MiB; exact top-10 of 1000 queries "
                      f"{r['exact_seconds']:.1f}s", flush=True)
                for key in ("nprobe8", "nprobe32", "nprobe128"):
                    print(f"  {key}: recall@10 {r[key]['recall']:.3f}, 1000 queries in {r[key]['seconds']:.2f}s")
            else:
                print(f"\nfaiss: {r['error']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
