"""Answers from embeddings: similar images, near-duplicate groups and clusters, as plain data.

`search`, `dedup` and `cluster` (exported as `vggembed.search`, ...) take
any embedding output (see `vectors.open_vectors`). Query images are embedded
on the fly with exactly the index's recipe: the weights are found by the
recorded MD5 ($VGGEMBED_WEIGHTS, ./weights/, the cache) or given, and given
weights whose MD5 differs from the recorded one are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import VGGEmbedError
from ..images.sources import is_url
from ..store.recipe import Recipe
from ..store.vectors import Vectors, open_vectors
from . import DEFAULT_THRESHOLD, similarity

# The embed command's default batch size. An index does not record the batch size it was made with, so
# queries are padded to min(16, number of queries) (`local.pad_to`), not to the index's own batch shape:
# a query of an indexed image can differ from its row in the last bits where kernels differ per shape.
QUERY_BATCH = 16


class RecipeError(VGGEmbedError):
    """Query images cannot be embedded as the index was (other weights, no recipe)."""


@dataclass(frozen=True)
class Hit:
    query: str
    rank: int
    path: str
    score: float
    row: int


@dataclass
class SearchResult:
    """Hits in query order, then rank; queries whose image failed, with the reason."""

    hits: list[Hit]
    failed: list[tuple[str, str]]


@dataclass(frozen=True)
class Member:
    group: int
    path: str
    score: float  # cosine to the group's first member (1 for the first)
    row: int


@dataclass(frozen=True)
class Assignment:
    path: str
    cluster: int
    distance: float  # Euclidean, between the unit-length vector and its cluster's centre
    row: int


def _opened(index, layer=None) -> tuple[Vectors, bool]:
    if isinstance(index, Vectors):
        return index, False
    return open_vectors(index, layer=layer), True


# ------------------------------------------------------------------ search
def search(index, queries: Iterable = (), *, rows: Iterable[int] = (), k: int = 10, min_score: float | None = None,
           weights=None, approximate: bool = False, nprobe: int = 32, block_rows: int = similarity.BLOCK_ROWS,
           layer: str | None = None) -> SearchResult:
    """The k most similar indexed images to each query.

    Args:
        index: an embedding output path, or an open `Vectors`.
        queries: image files or folders (embedded with the index's recipe), or a (Q, D) array of vectors.
        rows: rows of the index to use as queries (their own row is left out of their hits).
        k: hits per query.
        min_score: leave out hits with a lower cosine.
        weights: the weight file to embed query images with (default: found by the recorded MD5).
        approximate: use a faiss PCA + IVF index (built once and saved as INDEX.faiss; for an INDEX at a URL,
            built for this search alone) instead of an exact pass; hits are re-scored exactly, only recall is
            approximate.
        nprobe: lists an approximate search visits (more: slower, better recall).

    Returns:
        A `SearchResult`: hits ordered by query, then rank (ties: earlier row first).
    """
    vectors, mine = _opened(index, layer)
    try:
        names, matrix, exclude, failed = [], [], [], []
        rows = [int(r) for r in rows]
        if rows:
            matrix.append(vectors.take(rows))
            names += [vectors.paths[r] for r in rows]
            exclude += rows
        if isinstance(queries, np.ndarray):
            matrix.append(np.atleast_2d(queries).astype(np.float32))
            names += [f"vector {i}" for i in range(len(matrix[-1]))]
            exclude += [None] * len(matrix[-1])
        else:
            queries = [os.fsdecode(q) for q in queries]
            if queries:
                ok, vecs, failed = embed_queries(vectors, queries, weights=weights)
                matrix.append(vecs)
                names += ok
                exclude += [None] * len(ok)
        if not matrix:
            raise VGGEmbedError("no query: give query images or rows of the index")
        q = np.concatenate(matrix)
        if approximate:
            from . import ann

            source = str(vectors.source)
            # saved as INDEX.faiss (INDEX.NAME.faiss for one of several outputs) beside a local INDEX; built for
            # this search alone from a URL
            if is_url(source):
                built = ann.build(vectors)
            else:
                which = f".{vectors.name}" if len(vectors.names) > 1 else ""
                built = ann.load_or_build(vectors, Path(source.rstrip("/\\") + which + ".faiss"))
            found = ann.search(built, vectors, q, k, nprobe=nprobe, exclude=exclude)
            if min_score is not None:
                found = [[(r, s) for r, s in hits if s >= min_score] for hits in found]
        else:
            found = similarity.top_k(vectors, q, k, min_score=min_score, exclude=exclude, block_rows=block_rows)
        hits = [Hit(name, rank, vectors.paths[row], score, row)
                for name, result in zip(names, found) for rank, (row, score) in enumerate(result, start=1)]
        return SearchResult(hits, failed)
    finally:
        if mine:
            vectors.close()


# ------------------------------------------------------------------- dedup
def dedup(index, threshold: float = DEFAULT_THRESHOLD, *, layer: str | None = None, precision: str = "float32",
          block_rows: int = similarity.BLOCK_ROWS) -> list[list[Member]]:
    """Groups of near-duplicates: connected components of the pairs with cosine >= threshold.

    Returns:
        Groups ordered by their first member (input order); within a group,
        members in input order, each with its cosine to the first member.
    """
    vectors, mine = _opened(index, layer)
    try:
        found = similarity.pairs(vectors, threshold, block_rows=block_rows, precision=precision)
        out = []
        for g, rows in enumerate(similarity.groups(vectors.rows, found), start=1):
            scores = similarity.scores_to_first(vectors, rows)
            out.append([Member(g, vectors.paths[r], similarity._score(s), int(r)) for r, s in zip(rows, scores)])
        return out
    finally:
        if mine:
            vectors.close()


# ----------------------------------------------------------------- cluster
def cluster(index, k: int, *, seed: int = 0, block_rows: int = similarity.BLOCK_ROWS, layer: str | None = None
            ) -> list[Assignment]:
    """k-means over the unit-length vectors (deterministic for a seed); one assignment per row, in row order."""
    vectors, mine = _opened(index, layer)
    try:
        labels, dist = similarity.kmeans(vectors, k, seed=seed, block_rows=block_rows)
        return [Assignment(p, int(c), float(d), r) for r, (p, c, d) in enumerate(zip(vectors.paths, labels, dist))]
    finally:
        if mine:
            vectors.close()


# --------------------------------------------------- queries, as the index
def query_recipe(recipe: Recipe | None, weights, where: str) -> Recipe:
    """The index's recipe with `weights` set to a file on this machine that has the recorded MD5.

    Given weights whose MD5 differs from the recorded one are refused. An
    index without a recipe needs `weights`, and is assumed made with the
    embed command's defaults (fc2, squash, float32).
    """
    from ..net.cache import cached_md5
    from ..net.download import find_by_md5

    if weights is None:
        if recipe is None:
            raise RecipeError(f"{where}: records no recipe (written before vggembed recorded one), so query images "
                              "need --weights: the file it was made with")
        return recipe.replace(weights=str(find_by_md5(recipe, where)))
    weights = Path(weights)
    if not weights.is_file():
        raise VGGEmbedError(f"{weights}: no such weight file")
    if recipe is None:
        return Recipe(weights=str(weights))
    md5 = cached_md5(weights)
    if recipe.weights_md5 and md5 != recipe.weights_md5:
        raise RecipeError(f"{weights}: MD5 {md5} differs from the {recipe.weights_md5} of {recipe.weights}, which "
                          f"{where} was made with; its queries would not be comparable: pass that file")
    return recipe.replace(weights=str(weights))


def embed_queries(vectors: Vectors, sources: list[str], *, weights=None
                  ) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Embed query images (files or folders) as the index's rows were made.

    Returns:
        (sources that worked, their vectors, [(source, error)] for those that failed).
    """
    from ..engines.local import Options, Summary, batches, check_outputs, compute
    from ..images.inputs import expand
    from ..net.load import load_recipe

    recipe = query_recipe(vectors.recipe, weights, str(vectors.source))
    model = load_recipe(recipe)
    recipe = check_outputs(model, recipe)  # as embed binds it: the loaded file's MD5 and arch
    if vectors.recipe is not None:
        recipe.check_same(vectors.recipe, f"{vectors.source}: its queries would not be comparable: it",
                          f"{recipe.weights} is not the file it records")
    name = recipe.outputs[0].name
    opts = Options(batch_size=QUERY_BATCH, workers=2)
    ok, out, failed = [], [], []
    for chunk, batch, pad in batches(model, expand(sources), recipe, opts, Summary()):
        failed += [(item.source, item.error) for item in chunk if item.error is not None]
        if batch is not None:
            out.append(compute(model, batch, recipe, pad)[name])
            ok += [item.source for item in chunk if item.error is None]
    matrix = np.concatenate(out) if out else np.zeros((0, vectors.dim), np.float32)
    if matrix.shape[1] != vectors.dim:
        raise RecipeError(f"{vectors.source}: holds {vectors.dim}-d vectors but {recipe.weights} gives "
                          f"{matrix.shape[1]}-d {name} vectors; pass the weights and options it was made with")
    # rows stored as float16 were rounded; round the queries alike
    return ok, matrix.astype(recipe.dtype).astype(np.float32), failed
