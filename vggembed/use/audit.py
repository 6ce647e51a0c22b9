"""A data audit from embeddings: outliers, near-duplicates, and with labels, likely mislabels, leaks, class counts.

`audit` takes one or more embedding outputs (any format `open_vectors`
reads; several are stacked in order) and optional labels, and computes, in
blocks (never an N x N matrix; memory stays a few blocks of rows):

- the k nearest neighbours of every image (k = 10, cosine; one pass over
  the block pairs i <= j, which also collects every pair at or above the
  near-duplicate threshold);
- **outliers**: an image's score is its mean cosine distance (1 - cosine)
  to its k nearest neighbours, ranked highest first; with labels, also
  within its class (neighbours searched among its class only, class by
  class, so that pass costs the sum of the squared class sizes);
- **near-duplicate groups** (connected components of the pairs, as dedup);
- with labels: **label issues** (`rank_label_issues`), **near-duplicates
  across classes**, **leaks** (near-duplicates across the split: a
  `split` column in the label file, or `--val` outputs), **class counts**
  and the **most confused class pairs** (links in the k-NN graph between
  two classes, as a share of the links their images have).

Label issues are ranked from out-of-fold class probabilities: those of
the softmax head `vggembed train` fits (`train.fit_head`: the same
stratified folds and C sweep, each image predicted by the fold that did not
see it), or, with `probabilities="knn"`, from the k-NN graph itself (an
image's probability of class c is the closeness-weighted share of its
neighbours, never itself, labelled c, smoothed toward the class's prior).
The default, "auto", fits the head up to `HEAD_LIMIT` labelled values and
takes the k-NN vote beyond, where the head's sweep and folds would take far
longer than the audit's one pass. `rank_label_issues` is pure and takes any
probabilities.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VGGEmbedError, display
from . import DEFAULT_THRESHOLD, similarity

K = 10
BLOCK_ROWS = 2048
# Rows of each ranking shown in the HTML report (the CSVs hold them all). Each row shows an image and its k
# neighbours, and every image shown is a thumbnail to make: 200 rows of 11 in three rankings is up to 6,600.
TOP = 200


# ------------------------------------------------------------------ rows
class Rows:
    """Several opened outputs (or some rows of one) as one matrix: `rows`, `dim`, `read(a, b)`, `take`, `paths`."""

    def __init__(self, parts, rows: np.ndarray | None = None):
        self.parts = list(parts)
        dims = {p.dim for p in self.parts}
        if len(dims) > 1:
            raise VGGEmbedError("the inputs hold vectors of different sizes ("
                                + ", ".join(f"{display(str(p.source))}: {p.dim}" for p in self.parts)
                                + "); audit vectors made the same way")
        self.dim = dims.pop()
        self.starts = np.cumsum([0] + [p.rows for p in self.parts])
        self.source = ", ".join(display(str(p.source)) for p in self.parts)
        self.recipe = getattr(self.parts[0], "recipe", None)
        self.subset = rows
        self.rows = int(self.starts[-1]) if rows is None else len(rows)

    @property
    def paths(self) -> list[str]:
        every = [p for part in self.parts for p in part.paths]
        return every if self.subset is None else [every[r] for r in self.subset]

    def of(self, rows: np.ndarray) -> "Rows":
        """These rows (indices into this whole) as a `Rows` of their own."""
        return Rows(self.parts, np.asarray(rows, np.int64))

    def read(self, a: int, b: int) -> np.ndarray:
        if self.subset is not None:
            return self._take_whole(self.subset[a:b])
        out = []
        for i, part in enumerate(self.parts):
            lo, hi = max(a, self.starts[i]), min(b, self.starts[i + 1])
            if lo < hi:
                out.append(part.read(int(lo - self.starts[i]), int(hi - self.starts[i])))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def take(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        return self._take_whole(rows if self.subset is None else self.subset[rows])

    def _take_whole(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), np.float32)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(part):
            sel = part == i
            order = np.argsort(rows[sel], kind="stable")  # sorted reads touch the file in order
            got = self.parts[i].take(rows[sel][order] - self.starts[i])
            block = np.empty_like(got)
            block[order] = got
            out[sel] = block
        return out


# ------------------------------------------------------------- neighbours
@dataclass
class Neighbours:
    """The k nearest rows of each row (itself left out), best first; -1 and -inf where there are fewer."""

    idx: np.ndarray  # (N, k) int64
    sim: np.ndarray  # (N, k) float32 cosine


def _merge(best_s, best_i, s, offset, k):
    """Merge candidate scores `s` (rows x cols, columns starting at row `offset`) into the running top k.

    Once a row's top k is filled, only the scores above its current k-th can enter; when those are few (most
    blocks, after the first), they are merged alone instead of partitioning the whole block."""
    rows = len(s)
    kth = best_s.min(axis=1)
    mask = s > kth[:, None]
    count = int(np.count_nonzero(mask))
    if count == 0:
        return
    if count * 8 > s.size:  # the first blocks: most scores enter
        if s.shape[1] > k:
            cand = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
            cs = np.take_along_axis(s, cand, 1)
        else:
            cand = np.broadcast_to(np.arange(s.shape[1]), s.shape)
            cs = s
        all_s = np.concatenate([best_s, cs], axis=1)
        all_i = np.concatenate([best_i, cand + offset], axis=1)
        top = np.argpartition(all_s, all_s.shape[1] - k, axis=1)[:, -k:]
        best_s[...] = np.take_along_axis(all_s, top, 1)
        best_i[...] = np.take_along_axis(all_i, top, 1)
        return
    r, c = np.nonzero(mask)
    owner = np.concatenate([np.repeat(np.arange(rows), k), r])
    scores = np.concatenate([best_s.ravel(), s[r, c]])
    ids = np.concatenate([best_i.ravel(), c + offset])
    order = np.lexsort((-scores, owner))  # by row, then best first
    start = np.searchsorted(owner[order], np.arange(rows))
    pick = order[start[:, None] + np.arange(k)]  # every row has its k old entries, so k at least
    best_s[...] = scores[pick]
    best_i[...] = ids[pick]


def _norms(vectors, block_rows: int) -> np.ndarray:
    """Each row's length (as `similarity.normalize` computes it), zero rows as 1 (they stay zero)."""
    out = np.empty(vectors.rows, np.float32)
    for a in range(0, vectors.rows, block_rows):
        x = vectors.read(a, min(a + block_rows, vectors.rows))
        out[a: a + len(x)] = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    out[out == 0] = 1
    return out


def knn(vectors, k: int = K, *, threshold: float | None = None, block_rows: int = BLOCK_ROWS
        ) -> tuple[Neighbours, similarity.Pairs | None]:
    """Every row's k nearest rows by cosine, and (with `threshold`) every pair at or above it, in one pass.

    Blocks i <= j only: each product block serves the rows of both blocks. Exact float32 (rows normalised as
    `similarity` does); memory is a few blocks of rows and (N, k) results. Ties: the lower row first.
    """
    n = vectors.rows
    k = max(0, min(k, n - 1))
    best_s = np.full((n, k), -np.inf, np.float32)
    best_i = np.full((n, k), -1, np.int64)
    found_i, found_j, found_s = [], [], []
    t = None if threshold is None else np.float32(threshold)
    norms = _norms(vectors, block_rows)

    def block(a):
        x = vectors.read(a, min(a + block_rows, n))
        if not x.flags.writeable:
            x = np.array(x)
        x /= norms[a: a + len(x), None]
        return x

    for a in range(0, n, block_rows):
        left = block(a)
        for c in range(a, n, block_rows):
            right = left if c == a else block(c)
            s = left @ right.T
            if c == a:
                np.fill_diagonal(s, -np.inf)
            if t is not None:
                near = np.flatnonzero(s.max(axis=1) >= t)  # near-duplicates are rare: look at their rows only
                if len(near):
                    hit = s[near] >= t
                    if c == a:
                        hit &= np.arange(len(right))[None, :] > near[:, None]  # j > i within a block
                    i, j = np.nonzero(hit)
                    found_i.append(near[i] + a)
                    found_j.append(j + c)
                    found_s.append(s[near[i], j])
            if k:
                _merge(best_s[a: a + len(left)], best_i[a: a + len(left)], s, c, k)
                if c != a:
                    _merge(best_s[c: c + len(right)], best_i[c: c + len(right)], np.ascontiguousarray(s.T), a, k)
    # best first; ties by row (unfilled slots, -inf, last)
    order = np.lexsort((np.where(best_i < 0, n, best_i), -best_s), axis=1)
    nb = Neighbours(np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1))
    nb.sim = np.where(np.isfinite(nb.sim), np.clip(nb.sim, -1, 1), nb.sim).astype(np.float32)
    if t is None:
        return nb, None
    i = np.concatenate(found_i) if found_i else np.empty(0, np.int64)
    j = np.concatenate(found_j) if found_j else np.empty(0, np.int64)
    sc = np.concatenate(found_s).astype(np.float32) if found_s else np.empty(0, np.float32)
    order = np.lexsort((j, i))
    return nb, similarity.Pairs(i[order], j[order], sc[order])


def outlier_scores(nb: Neighbours) -> np.ndarray:
    """Mean cosine distance (1 - cosine) to the neighbours found; NaN for a row without any."""
    valid = nb.idx >= 0
    total = np.where(valid, 1.0 - nb.sim.astype(np.float64), 0.0).sum(axis=1)
    count = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ------------------------------------------------------------ label issues
@dataclass(frozen=True)
class LabelIssue:
    row: int
    score: float  # (1 - self_confidence + other_share) / 2: higher is more likely mislabelled
    self_confidence: float  # out-of-fold probability of the given label
    other_share: float  # share of the nearest neighbours labelled otherwise
    given: int
    suggested: int  # argmax of the probabilities (ties: the lower class)


def rank_label_issues(proba: np.ndarray, given: np.ndarray, neighbours_idx: np.ndarray) -> list[LabelIssue]:
    """Every row ranked by how likely its given label is wrong, most likely first (ties: lower row first).

    Args:
        proba: (N, K) out-of-fold class probabilities (each row's own label never seen while predicting it).
        given: (N,) the given class of each row, 0..K-1.
        neighbours_idx: (N, k) the rows nearest each row (indices into the same N; -1 for none); a neighbour
            whose given class is negative (unlabelled) is not counted.

    Returns:
        One `LabelIssue` per row. The score is the mean of (1 - self-confidence) and the share of labelled
        neighbours that carry another label; the suggested label is the most probable class.
    """
    proba = np.asarray(proba, np.float64)
    given = np.asarray(given, np.int64)
    nbr = np.asarray(neighbours_idx, np.int64)
    n = len(given)
    if proba.ndim != 2 or proba.shape[0] != n or nbr.ndim != 2 or nbr.shape[0] != n:
        raise VGGEmbedError(f"rank_label_issues: expected proba (N, K), given (N,) and neighbours (N, k); "
                            f"received {proba.shape}, {given.shape}, {nbr.shape}")
    if n and (given.min() < 0 or given.max() >= proba.shape[1]):
        raise VGGEmbedError(f"rank_label_issues: given labels must lie in 0..{proba.shape[1] - 1}")
    self_conf = proba[np.arange(n), given] if n else np.empty(0)
    labels = np.where(nbr >= 0, np.concatenate([given, [-1]])[nbr], -1)  # -1: no neighbour
    counted = labels >= 0
    other = (counted & (labels != given[:, None])).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(counted.sum(axis=1) > 0, other / np.maximum(counted.sum(axis=1), 1), 0.0)
    score = (1.0 - self_conf + share) / 2
    suggested = np.argmax(proba, axis=1) if n else np.empty(0, np.int64)
    order = np.lexsort((np.arange(n), -score))
    return [LabelIssue(int(r), float(score[r]), float(self_conf[r]), float(share[r]), int(given[r]),
                       int(suggested[r])) for r in order]


def knn_proba(given: np.ndarray, neighbours_idx: np.ndarray, classes: int, sim: np.ndarray | None = None,
              smoothing: float = 1.0) -> np.ndarray:
    """Class probabilities from the neighbours' labels (a row is never its own neighbour, so they are out of
    sample): (votes for c + smoothing * prior(c)) / (all votes + smoothing), with each neighbour's vote
    weighted by 1 / (cosine distance + 0.01) when `sim` (its cosine) is given, so that a few near copies
    outvote many loose neighbours from a large class."""
    given = np.asarray(given, np.int64)
    n = len(given)
    labels = np.where(neighbours_idx >= 0, np.concatenate([given, [-1]])[neighbours_idx], -1)
    weights = np.ones(labels.shape) if sim is None else 1.0 / (1.0 - np.clip(sim, -1, 1) + 0.01)
    prior = np.bincount(given[given >= 0], minlength=classes).astype(np.float64)
    prior /= max(prior.sum(), 1)
    votes = np.zeros((n, classes))
    for col, w in zip(labels.T, weights.T):
        ok = col >= 0
        votes[np.flatnonzero(ok), col[ok]] += w[ok]
    total = votes.sum(axis=1, keepdims=True)
    # the smoothing is worth one average vote of the row
    count = np.maximum((labels >= 0).sum(axis=1, keepdims=True), 1)
    weight = smoothing * total / count + (total == 0)
    return (votes + weight * prior) / (total + weight)


PROBABILITIES = ("auto", "head", "knn")
# "auto" fits the head up to this many labelled values (rows x dimensions: 50M, 200 MB of float32 in memory);
# beyond it the head's sweep and folds take far longer than the k-NN pass (benchmarks/audit.py), so k-NN votes.
HEAD_LIMIT = 50_000_000


def out_of_fold_proba(rows: Rows, given: np.ndarray, classes: list[str], nb: Neighbours, *, method: str = "head",
                      seed: int = 0, log=None) -> tuple[np.ndarray, str]:
    """Out-of-fold probabilities of the labelled `rows` (`given` indexes `classes`).

    method "head": the softmax head `vggembed train` fits, with its stratified folds and C sweep
    (`train.fit_head`), each row predicted by the fold that did not see it; where that cannot run (vectors
    without a recorded recipe, a class of one image) the k-NN vote instead, and the method says so.
    method "knn": the k-NN vote (`knn_proba`), one pass, no matrix in memory.
    method "auto": the head up to `HEAD_LIMIT` labelled values (rows x dimensions), else the k-NN vote.

    Returns (proba (N, K), how they were made, in words).
    """
    knn = (knn_proba(given, nb.idx, len(classes), nb.sim),
           f"the labels of the {nb.idx.shape[1]} nearest neighbours, weighted by closeness")
    if method == "auto":
        if rows.rows * rows.dim > HEAD_LIMIT:
            return knn[0], f"{knn[1]} (more than {HEAD_LIMIT // 10**6}M labelled values: --probabilities head fits " \
                           "the head instead)"
        method = "head"
    if method == "knn":
        return knn
    if method != "head":
        raise VGGEmbedError(f"probabilities come from one of {', '.join(PROBABILITIES)}; received {method!r}")
    from . import train

    paths = rows.paths
    source = train.Rows(paths, rows.recipe, rows.source, rows.read, rows.dim)
    try:
        head = train.fit_head([source], {p: classes[c] for p, c in zip(paths, given)}, seed=seed,
                              log=log or (lambda line: None))
    except VGGEmbedError as e:
        return knn[0], f"{knn[1]} (the head could not be fitted: {e})"
    ev = head.evaluation
    position = {c: i for i, c in enumerate(ev.classes)}
    proba = knn[0].copy()  # rows the head left out (NaN vectors) keep their k-NN vote
    where: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        where.setdefault(p, []).append(i)
    columns = [position[c] for c in classes]
    for j, p in enumerate(ev.paths):
        proba[where[p].pop(0)] = ev.proba[j][columns]
    return proba, f"the {ev.kind} predictions of the softmax head vggembed train fits (C = {head.C:.3g})"


# ------------------------------------------------------------------ labels
def given_labels(paths: list[str], table) -> tuple[list[str | None], list[str | None]]:
    """Each recorded path's label and split from a label file read by `train.read_label_table` (matched as
    `train` matches them)."""
    from .train import match_table

    matched, _ = match_table(paths, table)
    return ([None if m is None else table[m] for m in matched],
            [None if m is None else table.splits.get(m) for m in matched])


def folder_labels(paths: list[str], root: str | None = None, where: str = "the input") -> list[str | None]:
    """Each path's class as `train` reads class folders (the first folder under `root`, default the folder the
    paths share); an error when no path lies in a class folder."""
    from .train import folder_labels as classes_of

    labels, found = classes_of(paths, root)
    if paths and not any(labels):
        raise VGGEmbedError(f"{where}: no image lies in a class folder under {display(found)}; pass --root, the "
                            "folder whose subfolders are the classes")
    return labels


# ------------------------------------------------------------------ audit
@dataclass
class Audit:
    """What `audit` found; rows index `paths`."""

    paths: list[str]
    k: int
    threshold: float
    neighbours: Neighbours
    outlier: np.ndarray  # (N,) mean cosine distance to the k nearest
    groups: list[np.ndarray]  # near-duplicate groups (rows), ordered by first row
    pairs: similarity.Pairs
    classes: list[str] = field(default_factory=list)  # class names, sorted; given indexes them
    given: np.ndarray | None = None  # (N,) class index, -1 unlabelled
    split: list[str | None] | None = None
    class_neighbours: Neighbours | None = None  # within the row's class (indices into the whole)
    class_outlier: np.ndarray | None = None
    issues: list[LabelIssue] = field(default_factory=list)  # rows are indices into the whole
    method: str = ""
    confused: list[tuple[str, str, int, float]] = field(default_factory=list)
    proba: np.ndarray | None = None  # (labelled rows, classes): the out-of-fold probabilities ranked
    seconds: dict = field(default_factory=dict)  # wall time by phase: knn, classes, probabilities


def audit(rows: Rows, *, labels: list[str | None] | None = None, split: list[str | None] | None = None,
          k: int = K, threshold: float = DEFAULT_THRESHOLD, probabilities: str = "auto", seed: int = 0,
          block_rows: int = BLOCK_ROWS, log=None) -> Audit:
    """Audit the stacked outputs `rows`; `labels` (and `split`) per row, None where unknown.

    `probabilities` chooses where the label issues' out-of-fold probabilities come from
    (`out_of_fold_proba`: "head", the head `vggembed train` fits, "knn", or "auto", the head up to
    `HEAD_LIMIT` labelled values); `log` gets progress lines."""
    if rows.rows < 2:
        raise VGGEmbedError(f"{rows.source}: holds {rows.rows} vectors; an audit needs at least 2")
    paths = rows.paths
    start = time.perf_counter()
    nb, found = knn(rows, k, threshold=threshold, block_rows=block_rows)
    knn_seconds = time.perf_counter() - start
    result = Audit(paths, nb.idx.shape[1], threshold, nb, outlier_scores(nb),
                   similarity.groups(rows.rows, found), found, split=split)
    if labels is None or not any(lab is not None for lab in labels):
        result.seconds["knn"] = knn_seconds
        return result
    classes = sorted({lab for lab in labels if lab is not None})
    code = {c: i for i, c in enumerate(classes)}
    given = np.array([code[lab] if lab is not None else -1 for lab in labels], np.int64)
    result.classes, result.given = classes, given

    # outliers within their class: neighbours among the class's rows only
    cn = Neighbours(np.full_like(nb.idx, -1), np.full_like(nb.sim, -np.inf))
    for c in range(len(classes)):
        members = np.flatnonzero(given == c)
        if len(members) < 2:
            continue
        sub, _ = knn(rows.of(members), k, block_rows=block_rows)
        width = sub.idx.shape[1]
        cn.idx[members, :width] = np.where(sub.idx >= 0, members[np.maximum(sub.idx, 0)], -1)
        cn.sim[members, :width] = sub.sim
    result.class_neighbours = cn
    result.seconds = {"knn": knn_seconds, "classes": time.perf_counter() - start - knn_seconds}
    start = time.perf_counter()
    result.class_outlier = np.where(given >= 0, outlier_scores(cn), np.nan)

    labelled = np.flatnonzero(given >= 0)
    if len(classes) >= 2:
        # neighbours as indices into the labelled rows (others dropped), for the pure ranking
        position = np.full(rows.rows + 1, -1, np.int64)
        position[labelled] = np.arange(len(labelled))
        sub_nb = Neighbours(position[nb.idx[labelled]], nb.sim[labelled])
        proba, result.method = out_of_fold_proba(rows.of(labelled), given[labelled], classes, sub_nb,
                                                 method=probabilities, seed=seed, log=log)
        ranked = rank_label_issues(proba, given[labelled], sub_nb.idx)
        result.issues = [LabelIssue(int(labelled[i.row]), i.score, i.self_confidence, i.other_share, i.given,
                                    i.suggested) for i in ranked]
        result.confused = _confused(given, nb.idx, classes)
        result.proba = proba
    result.seconds["probabilities"] = time.perf_counter() - start
    return result


def _confused(given: np.ndarray, idx: np.ndarray, classes: list[str]) -> list[tuple[str, str, int, float]]:
    """Class pairs by k-NN links between them, most first: (a, b, links, links / all links of a's and b's rows)."""
    lab = np.concatenate([given, [-1]])[idx]
    src = np.broadcast_to(given[:, None], idx.shape)
    ok = (lab >= 0) & (src >= 0) & (lab != src)
    a, b = np.minimum(src[ok], lab[ok]), np.maximum(src[ok], lab[ok])
    kk = len(classes)
    counts = np.bincount(a * kk + b, minlength=kk * kk)
    links_of = np.bincount(given[given >= 0], minlength=kk) * idx.shape[1]
    out = []
    for flat in np.flatnonzero(counts):
        x, y = divmod(int(flat), kk)
        out.append((classes[x], classes[y], int(counts[flat]), float(counts[flat] / max(links_of[x] + links_of[y], 1))))
    return sorted(out, key=lambda t: (-t[2], t[0], t[1]))


# ------------------------------------------------------------------ output
def _label(result: Audit, row: int) -> str | None:
    if result.given is None or row < 0 or result.given[row] < 0:
        return None
    return result.classes[result.given[row]]


def _names(result: Audit, idx_row) -> str:
    return json.dumps([result.paths[j] for j in idx_row if j >= 0], ensure_ascii=False)


def tables(result: Audit) -> dict[str, tuple[list[str], list[list]]]:
    """Every CSV of the audit as {file name: (header, rows)}."""
    out: dict[str, tuple[list[str], list[list]]] = {}
    n = len(result.paths)
    suggested = {x.row: result.classes[x.suggested] for x in result.issues}  # the most probable class
    order = np.lexsort((np.arange(n), -np.nan_to_num(result.outlier, nan=-1)))
    out["outliers.csv"] = (["rank", "path", "score", "label", "suggested", "neighbours"],
                           [[r + 1, result.paths[i], f"{result.outlier[i]:.6f}", _label(result, i) or "",
                             suggested.get(int(i), ""), _names(result, result.neighbours.idx[i])]
                            for r, i in enumerate(order)])
    out["duplicates.csv"] = (["group", "path", "label", "split"],
                             [[g, result.paths[i], _label(result, i) or "", (result.split or [None] * n)[i] or ""]
                              for g, rows in enumerate(result.groups, start=1) for i in rows])
    if result.given is None:
        return out
    co = result.class_outlier
    have = np.flatnonzero(~np.isnan(co))
    have = have[np.lexsort((have, -co[have]))]
    out["class_outliers.csv"] = (["rank", "path", "score", "label", "suggested", "neighbours"],
                                 [[r + 1, result.paths[i], f"{co[i]:.6f}", _label(result, i),
                                   suggested.get(int(i), ""), _names(result, result.class_neighbours.idx[i])]
                                  for r, i in enumerate(have)])
    out["label_issues.csv"] = (["rank", "path", "score", "self_confidence", "other_share", "label", "suggested",
                                "neighbours"],
                               [[r + 1, result.paths[x.row], f"{x.score:.6f}", f"{x.self_confidence:.6f}",
                                 f"{x.other_share:.6f}", result.classes[x.given], result.classes[x.suggested],
                                 _names(result, result.neighbours.idx[x.row])] for r, x in enumerate(result.issues)])
    cross, leaks = [], []
    p = result.pairs
    for i, j, s in zip(p.i, p.j, p.score):
        la, lb = _label(result, int(i)), _label(result, int(j))
        row = [result.paths[i], result.paths[j], f"{float(s):.6f}", la or "", lb or ""]
        if la is not None and lb is not None and la != lb:
            cross.append(row)
        if result.split is not None:
            sa, sb = result.split[i], result.split[j]
            if sa is not None and sb is not None and sa != sb:
                leaks.append(row[:3] + [sa, sb] + row[3:])
    out["cross_class_duplicates.csv"] = (["path_a", "path_b", "score", "label_a", "label_b"], cross)
    if result.split is not None:
        out["leaks.csv"] = (["path_a", "path_b", "score", "split_a", "split_b", "label_a", "label_b"], leaks)
    counts = np.bincount(result.given[result.given >= 0], minlength=len(result.classes))
    header = ["label", "images"]
    splits = sorted({s for s in (result.split or []) if s is not None})
    rows = []
    for c, name in enumerate(result.classes):
        row = [name, int(counts[c])]
        for s in splits:
            row.append(sum(1 for i in np.flatnonzero(result.given == c) if result.split[i] == s))
        rows.append(row)
    out["classes.csv"] = (header + [f"images ({s})" for s in splits], rows)
    out["confused_classes.csv"] = (["label_a", "label_b", "links", "share"],
                                   [[a, b, n_, f"{s:.6f}"] for a, b, n_, s in result.confused])
    return out


def probabilities(result: Audit) -> dict[str, np.ndarray]:
    """What the label issues were ranked from, as `OUT/probabilities.npz` holds it (plain numpy arrays, as
    `train`'s HEAD.oof.npz): `paths`, `given` (class index) and `proba` (out-of-fold, N x K) of each labelled
    image, `classes`, and `method`, how the probabilities were made, in words."""
    labelled = np.flatnonzero(result.given >= 0)
    return {"paths": np.array([result.paths[i] for i in labelled], dtype=str), "given": result.given[labelled],
            "proba": np.asarray(result.proba, np.float32), "classes": np.array(result.classes, dtype=str),
            "method": np.array(result.method)}


def csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def report_of(result: Audit, source: str, top: int = TOP, made: dict | None = None):
    """The audit's HTML report: a tab per finding, rankings cut at `top` rows (the CSVs hold every row)."""
    from .report import Report, Section, Tile, View

    n = len(result.paths)
    lab = lambda i: _label(result, i)  # noqa: E731

    def with_neighbours(i, score, idx, sims, note=None):
        tiles = [Tile(result.paths[i], score, lab(i), note)]
        tiles += [Tile(result.paths[j], float(s), lab(j)) for j, s in zip(idx, sims) if j >= 0]
        return tiles

    views = []
    if result.issues:
        shown = [x for x in result.issues if x.suggested != x.given][:top]
        views.append(View("Label issues", [
            Section(f"{display(result.paths[x.row])}: labelled {result.classes[x.given]}, looks like "
                    f"{result.classes[x.suggested]}",
                    with_neighbours(x.row, x.score, result.neighbours.idx[x.row], result.neighbours.sim[x.row],
                                    note=f"suggested: {result.classes[x.suggested]}"),
                    score=x.score, label=result.classes[x.given],
                    detail=f"issue score {x.score:.3f}: probability of its label {x.self_confidence:.3f}, "
                           f"{x.other_share:.0%} of its neighbours labelled otherwise")
            for x in shown], what="label issues", value="score / cosine", score="issue score",
            note=f"Images whose label the other images disagree with (probabilities from {result.method}), most "
                 f"likely first: the image, then its {result.k} nearest neighbours with their labels. "
                 f"{len(shown)} shown (the images whose most probable class is another); label_issues.csv ranks "
                 "every image."))
    order = np.lexsort((np.arange(n), -np.nan_to_num(result.outlier, nan=-1)))[:top]
    views.append(View("Outliers", [
        Section(f"{display(result.paths[i])}", with_neighbours(i, float(result.outlier[i]), result.neighbours.idx[i],
                                                              result.neighbours.sim[i], note="outlier"),
                score=float(result.outlier[i]), label=lab(i)) for i in order],
        what="outliers", value="distance / cosine", score="distance",
        note=f"Images far from their {result.k} nearest neighbours (mean cosine distance), farthest first: the "
             f"image, then its neighbours. The top {len(order)} of {n}; outliers.csv ranks every image."))
    if result.class_outlier is not None:
        co = result.class_outlier
        have = np.flatnonzero(~np.isnan(co))
        have = have[np.lexsort((have, -co[have]))][:top]
        views.append(View("Outliers in their class", [
            Section(f"{display(result.paths[i])}", with_neighbours(i, float(co[i]), result.class_neighbours.idx[i],
                                                                  result.class_neighbours.sim[i], note="outlier"),
                    score=float(co[i]), label=lab(i)) for i in have],
            what="outliers", value="distance / cosine", score="distance",
            note="Images far from the nearest images of their own class, farthest first."))
    groups = []
    for g, members in enumerate(result.groups, start=1):
        first = result.paths[members[0]]
        group_labels = {lab(i) for i in members} - {None}
        group_splits = {result.split[i] for i in members} - {None} if result.split else set()
        flags = (["across classes"] if len(group_labels) > 1 else []) + (["across the split"]
                                                                          if len(group_splits) > 1 else [])
        groups.append(Section(f"group {g}: {len(members)} images" + (f" ({', '.join(flags)})" if flags else ""),
                              [Tile(result.paths[i], None, lab(i),
                                    result.split[i] if result.split else None) for i in members],
                              score=float(len(flags)), detail=f"first: {display(first)}"))
    views.append(View("Near-duplicates", groups, what="groups", value="", score="problems",
                      sorts=("order", "size-desc", "score-desc"),
                      note=f"Groups of images with cosine >= {result.threshold:g}; a group across classes or "
                           "across the split is flagged in its title (sort by problems to see them first)."))
    if result.given is not None:
        t = made or tables(result)
        views.append(View("Classes", table=t["classes.csv"], note="Images per class."))
        views.append(View("Confused classes", table=(t["confused_classes.csv"][0],
                                                     t["confused_classes.csv"][1][:top]),
                          note=f"Class pairs with the most links between them in the {result.k}-nearest-neighbour "
                               "graph (share: of all links their images have)."))
    labelled = int((result.given >= 0).sum()) if result.given is not None else 0
    summary = (f"{n} images" + (f", {labelled} labelled in {len(result.classes)} classes" if labelled else "")
               + f"; {len(result.groups)} near-duplicate groups")
    if result.issues:
        summary += f"; {sum(1 for x in result.issues if x.suggested != x.given)} likely label issues"
    return Report(f"Audit of {display(source)}", views, summary=summary, kind="audit")


AUDIT_FILES = ("outliers.csv", "duplicates.csv", "class_outliers.csv", "label_issues.csv",
               "cross_class_duplicates.csv", "leaks.csv", "classes.csv", "confused_classes.csv", "probabilities.npz",
               "report")


def check_target(out, overwrite: bool) -> None:
    """Refuse, before any work, an OUT that holds an earlier audit (without overwrite) or is a file."""
    from ..store.destination import OutputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    if out.is_dir() and not overwrite and any((out / f).exists() for f in AUDIT_FILES):
        raise OutputError(out, "holds an earlier audit; pass --overwrite to replace it")
    from .report import check_target as check_report

    if (out / "report").exists():
        check_report(out / "report", True)


def write(result: Audit, out, *, source: str, overwrite: bool = False, top: int = TOP):
    """The CSVs into OUT (each complete or absent) and the HTML report as OUT/report/. Returns (CSV names,
    `report.Written`)."""
    from ..store.destination import Destination, replacing
    from . import report

    out = Path(out)
    check_target(out, overwrite)
    written = []
    with Destination(out / "audit") as dest, dest.writing():
        out.mkdir(parents=True, exist_ok=True)
        made = tables(result)
        for name in AUDIT_FILES[:-1]:  # an older audit's file this one does not make would mislead
            if name not in made:
                (out / name).unlink(missing_ok=True)
        for name, (header, rows) in made.items():
            with replacing(out / name, ".partial") as tmp:
                tmp.write_bytes(csv_bytes(header, rows))
            written.append(name)
        if result.proba is not None:
            with replacing(out / "probabilities.npz", ".partial") as tmp, open(tmp, "wb") as f:
                np.savez(f, **probabilities(result))
    done = report.write(report_of(result, source, top, made), out / "report", overwrite=True)
    return written, done
