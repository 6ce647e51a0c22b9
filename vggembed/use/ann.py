"""Approximate search for collections too large for exact passes: a faiss PCA + IVF index.

Exact search (`similarity.top_k`) reads every vector for every batch of
queries; at tens of millions of 4096-d vectors that is hundreds of GB per
pass. This index reduces the unit-length vectors to `dims` dimensions by
PCA (trained on a sample), files them in `lists` inverted lists (IVF, by
k-means on the sample), and compares a query with the `nprobe` nearest
lists only. It holds `rows x dims` float32 in memory (300k x 256: 300 MB)
and is saved as one file beside the index. Recall against exact search is
printed by `benchmarks/similarity.py`.

Needs faiss: `pip install "vggembed[ann]"`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import VGGEmbedError
from . import similarity

if TYPE_CHECKING:  # a type only: the vectors come from the caller
    from ..store.vectors import Vectors

TRAIN_ROWS = 50_000


def _faiss():
    try:
        import faiss
    except ImportError:
        raise VGGEmbedError('approximate search needs faiss: pip install "vggembed[ann]"') from None
    return faiss


def default_lists(rows: int) -> int:
    """About 4 sqrt(N) lists (faiss' guideline), at most one per 39 training rows."""
    return max(1, min(int(4 * math.sqrt(rows)), min(rows, TRAIN_ROWS) // 39))


def build(vectors: Vectors, *, dims: int = 256, lists: int | None = None, seed: int = 0,
          block_rows: int = similarity.BLOCK_ROWS):
    """A faiss index of the normalised vectors: PCA to `dims`, IVF with `lists` lists, inner product."""
    faiss = _faiss()
    dims = min(dims, vectors.dim)
    lists = lists or default_lists(vectors.rows)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(vectors.rows, min(vectors.rows, TRAIN_ROWS), replace=False))
    train = similarity.normalize(vectors.take(sample))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dims), dims, lists, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    index = faiss.IndexPreTransform(faiss.PCAMatrix(vectors.dim, dims), ivf)
    index.train(train)
    del train
    for a in range(0, vectors.rows, block_rows):
        index.add(similarity.normalize(vectors.read(a, min(a + block_rows, vectors.rows))))
    return index


def search(index, vectors: Vectors, queries: np.ndarray, k: int, *, nprobe: int = 32,
           exclude: list[int | None] | None = None) -> list[list[tuple[int, float]]]:
    """Approximate top-k per query as (row, exact cosine), best first.

    The index proposes 2k candidates per query; each is scored again exactly
    from the stored vector, so scores are true cosines and only recall is approximate.
    """
    faiss = _faiss()
    faiss.extract_index_ivf(index).nprobe = nprobe
    q = similarity.normalize(np.array(queries, dtype=np.float32))
    _, rows = index.search(q, 2 * k + 1)
    exclude = exclude or [None] * len(q)
    out = []
    for qv, cand, skip in zip(q, rows, exclude):
        cand = np.array([r for r in cand if r >= 0 and r != skip], dtype=np.int64)
        exact = similarity.normalize(vectors.take(cand)) @ qv if len(cand) else np.empty(0, np.float32)
        order = np.lexsort((cand, -exact))[:k]
        out.append([(int(cand[i]), similarity._score(exact[i])) for i in order])
    return out


def load_or_build(vectors: Vectors, path: Path, **kw):
    """The index saved at `path` when it is newer than the vectors and holds as many rows; else build and save it."""
    faiss = _faiss()
    path = Path(path)
    source = Path(vectors.source)
    if path.exists() and path.stat().st_mtime >= source.stat().st_mtime:
        index = faiss.read_index(str(path))
        if index.ntotal == vectors.rows:
            return index
    index = build(vectors, **kw)
    tmp = path.with_name(path.name + ".partial")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
    return index
