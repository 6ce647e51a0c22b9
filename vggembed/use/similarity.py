"""Exact cosine similarity over an embedding output, in blocks: top-k search, near-duplicate pairs, groups, k-means.

Nothing here builds an N x N matrix. Rows are read a block at a time
(`Vectors.read`), normalised, and multiplied by float32 BLAS; each block's
products are reduced at once to what is kept (the top k per query, or the
pairs at or above a threshold), so peak memory is a few blocks whatever N
is. All pairs use symmetry: block i is multiplied only by blocks j >= i.

Cosine of a zero vector with anything is 0 (its normalised form stays zero),
never NaN. Ties are broken by row: for equal scores the lower row (earlier
input) ranks first, so results are the same on every run and machine.

With `precision="bf16"` (TensorFlow, CPUs with native bf16 or GPUs) the
all-pairs products run in bfloat16 to find candidates at `threshold -
BF16_MARGIN`, and every candidate is scored again exactly in float32, so the
pairs and scores are the float32 answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import VGGEmbedError

if TYPE_CHECKING:  # a type only: the vectors come from the caller
    from ..store.vectors import Vectors

BLOCK_ROWS = 4096  # 64 MB per block of 4096-d float32 rows; a product block is as large
# bf16 keeps 8 significant bits (unit roundoff 2**-8). For unit vectors the
# rounding of both inputs moves a dot product by at most about 2 * 2**-8 and
# the rounding of a bf16 result by 2**-8 more; 0.02 covers that with room.
BF16_MARGIN = 0.02
PRECISIONS = ("float32", "bf16")


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in place (float32); zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    nz = norms > 0
    x[nz] /= norms[nz, None].astype(np.float32)
    return x


def _blocks(vectors: Vectors, block_rows: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    for a in range(start, vectors.rows, block_rows):
        yield a, normalize(vectors.read(a, min(a + block_rows, vectors.rows)))


# ------------------------------------------------------------------ search
def top_k(vectors: Vectors, queries: np.ndarray, k: int = 10, *, min_score: float | None = None,
          exclude: list[int | None] | None = None, block_rows: int = BLOCK_ROWS
          ) -> list[list[tuple[int, float]]]:
    """The k rows most similar to each query, best first (ties: lower row first).

    Args:
        vectors: the index.
        queries: (Q, D) query vectors (need not be normalised).
        k: hits per query.
        min_score: leave out hits below this cosine.
        exclude: per query, a row to leave out (the query's own row), or None.
        block_rows: rows per block (memory: about 3 blocks of rows x D float32).

    Returns:
        Per query, a list of (row, score).
    """
    if k < 1:
        raise VGGEmbedError(f"k must be at least 1; received {k}")
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != vectors.dim:
        raise VGGEmbedError(f"{vectors.source}: holds {vectors.dim}-d vectors; the queries are {queries.shape[1:]}"
                            " (made with another layer or weights?)")
    exclude = exclude or [None] * len(queries)
    results: list[list[tuple[int, float]]] = []
    for q0 in range(0, len(queries), block_rows):
        q = normalize(np.array(queries[q0: q0 + block_rows]))
        skip = exclude[q0: q0 + block_rows]
        best_rows = [np.empty(0, np.int64) for _ in q]
        best_scores = [np.empty(0, np.float32) for _ in q]
        for a, block in _blocks(vectors, block_rows):
            s = q @ block.T
            for qi, row in enumerate(skip):
                if row is not None and a <= row < a + len(block):
                    s[qi, row - a] = -np.inf
            if min_score is not None:
                s[s < np.float32(min_score)] = -np.inf
            keep = min(k, s.shape[1])
            kth = np.partition(s, s.shape[1] - keep, axis=1)[:, s.shape[1] - keep]
            for qi in range(len(q)):
                cand = np.flatnonzero(s[qi] >= kth[qi])  # every tie with the k-th, in row order
                cand = cand[np.isfinite(s[qi, cand])]
                if not len(cand):
                    continue
                rows = np.concatenate([best_rows[qi], cand + a])
                scores = np.concatenate([best_scores[qi], s[qi, cand]])
                order = np.lexsort((rows, -scores))[:k]
                best_rows[qi], best_scores[qi] = rows[order], scores[order]
        results += [[(int(r), _score(v)) for r, v in zip(rs, ss)] for rs, ss in zip(best_rows, best_scores)]
    return results


def _score(v) -> float:
    """A float32 cosine as a Python float, clipped to [-1, 1] (rounding can step past 1)."""
    return float(min(1.0, max(-1.0, float(v))))


# --------------------------------------------------------------- all pairs
@dataclass
class Pairs:
    """Pairs (i < j) with cosine >= threshold, sorted by (i, j)."""

    i: np.ndarray
    j: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


def pairs(vectors: Vectors, threshold: float, *, block_rows: int = BLOCK_ROWS, precision: str = "float32"
          ) -> Pairs:
    """Every pair of rows whose cosine is >= `threshold` (exact float32 scores)."""
    found = [block_pairs(vectors, a, threshold, block_rows=block_rows, precision=precision)
             for a in range(0, vectors.rows, block_rows)]
    i = np.concatenate([f[0] for f in found]) if found else np.empty(0, np.int64)
    j = np.concatenate([f[1] for f in found]) if found else np.empty(0, np.int64)
    s = np.concatenate([f[2] for f in found]) if found else np.empty(0, np.float32)
    order = np.lexsort((j, i))
    return Pairs(i[order], j[order], s[order])


def block_pairs(vectors: Vectors, a: int, threshold: float, *, block_rows: int = BLOCK_ROWS,
                precision: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of `pairs` whose first row lies in the block starting at row `a`."""
    if precision not in PRECISIONS:
        raise VGGEmbedError(f"precision must be one of {', '.join(PRECISIONS)}; received {precision!r}")
    t = np.float32(threshold)
    left = normalize(vectors.read(a, min(a + block_rows, vectors.rows)))
    product = _Bf16Product(left) if precision == "bf16" else None
    out_i, out_j, out_s = [], [], []
    for c, right in _blocks(vectors, block_rows, start=a):
        if product is None:
            s = left @ right.T
            hit = s >= t
            if c == a:
                hit = np.triu(hit, 1)
            i, j = np.nonzero(hit)
            scores = s[i, j]
        else:
            i, j = product.candidates(right, threshold - BF16_MARGIN, upper=c == a)
            # the exact float32 score of each candidate decides
            scores = np.einsum("ij,ij->i", left[i], right[j])
            keep = scores >= t
            i, j, scores = i[keep], j[keep], scores[keep]
        out_i.append(i + a)
        out_j.append(j + c)
        out_s.append(scores.astype(np.float32))
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


class _Bf16Product:
    """A left block held in bf16 by TensorFlow; candidate pairs against right blocks."""

    def __init__(self, left: np.ndarray):
        from ..net.tfimport import cpu_has_native_bf16, tensorflow

        self.tf = tensorflow()
        if not cpu_has_native_bf16() and not self.tf.config.list_physical_devices("GPU"):
            raise VGGEmbedError("bf16 products need a CPU with AVX512_BF16 or AMX, or a GPU (elsewhere they are "
                                "emulated, slower than float32); use precision float32")
        self.left = self.tf.cast(self.tf.constant(left), self.tf.bfloat16)

    def candidates(self, right: np.ndarray, at_least: float, upper: bool) -> tuple[np.ndarray, np.ndarray]:
        tf = self.tf
        s = tf.matmul(self.left, tf.cast(tf.constant(right), tf.bfloat16), transpose_b=True)
        hit = (tf.cast(s, tf.float32) >= at_least).numpy()
        if upper:
            hit = np.triu(hit, 1)
        return np.nonzero(hit)


def groups(rows: int, found: Pairs) -> list[np.ndarray]:
    """Connected components of the pairs: each a sorted array of rows, groups ordered by first row."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(found):
        return []
    graph = coo_matrix((np.ones(len(found), np.int8), (found.i, found.j)), shape=(rows, rows))
    _, labels = connected_components(graph, directed=False)
    members = np.unique(np.concatenate([found.i, found.j]))
    by_label = members[np.argsort(labels[members], kind="stable")]
    cuts = np.flatnonzero(np.diff(labels[by_label])) + 1
    out = [np.sort(g) for g in np.split(by_label, cuts)]
    return sorted(out, key=lambda g: int(g[0]))


def scores_to_first(vectors: Vectors, group: np.ndarray) -> np.ndarray:
    """Cosine of each member of a group to its first member (float32)."""
    x = normalize(vectors.take(group))
    return np.clip(x @ x[0], -1.0, 1.0)


# ------------------------------------------------------------------ k-means
def kmeans(vectors: Vectors, k: int, *, seed: int = 0, fit_rows: int | None = None, block_rows: int = BLOCK_ROWS
           ) -> tuple[np.ndarray, np.ndarray]:
    """k-means (scikit-learn) on the normalised vectors.

    The centres are fitted on all rows, or, beyond `fit_rows` (default: as
    many as fit in 512 MB), on a sample of that many rows drawn with `seed`;
    then every row is assigned to its nearest centre in blocks.

    Returns:
        (cluster of each row, Euclidean distance of each normalised row to its centre).
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise VGGEmbedError('clustering needs scikit-learn: pip install "vggembed[cluster]"') from None
    n = vectors.rows
    if not 1 <= k <= n:
        raise VGGEmbedError(f"{vectors.source}: has {n} vectors; k must be between 1 and {n}, received {k}")
    fit_rows = fit_rows or max(k, (512 << 20) // (4 * max(vectors.dim, 1)))
    if n <= fit_rows:
        sample = np.arange(n)
    else:
        sample = np.sort(np.random.default_rng(seed).choice(n, fit_rows, replace=False))
    x = normalize(vectors.take(sample))
    model = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(x)
    del x
    centres = model.cluster_centers_.astype(np.float32)
    c2 = np.einsum("ij,ij->i", centres, centres)
    labels = np.empty(n, np.int64)
    dist = np.empty(n, np.float32)
    for a, block in _blocks(vectors, block_rows):
        d2 = np.einsum("ij,ij->i", block, block)[:, None] - 2 * block @ centres.T + c2[None, :]
        lab = np.argmin(d2, axis=1)  # argmin takes the lowest cluster on a tie
        labels[a: a + len(block)] = lab
        dist[a: a + len(block)] = np.sqrt(np.maximum(d2[np.arange(len(block)), lab], 0))
    return labels, dist
