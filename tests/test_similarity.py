"""Blocked exact search, pairs, groups and k-means against brute-force float64 numpy, over every output format."""

from __future__ import annotations

import numpy as np
import pytest

import vggembed
from vggembed.use import similarity
from vggembed.errors import VGGEmbedError
from vggembed.store.writer import EmbeddingWriter
from vggembed.images.pipeline import Item
from vggembed.store.recipe import Recipe
from vggembed.store.vectors import open_vectors

from .conftest import write_ray_folder

N, D = 3000, 24
FAILED_EVERY = 97  # an input that failed every so often: an index line without a row


@pytest.fixture(scope="module")
def matrix():
    """Random vectors with exact ties (scaled copies), zero vectors and planted near-duplicates."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x[[11, 1500, 2999]] = 0  # zero vectors: cosine 0 with everything
    for src, dst in [(3, 2048), (3, 40), (500, 2500), (77, 1024)]:
        x[dst] = 2 * x[src]  # same direction: equal cosines to every query (a tie), 1 to each other
    for src in range(100, 3000, 301):  # near-duplicates: a little noise
        x[src + 1] = x[src] + 0.05 * rng.standard_normal(D).astype(np.float32)
    return x


def write_output(path, x, fmt_paths):
    """Write `x` with the real writer, a failed input every FAILED_EVERY rows."""
    writer = EmbeddingWriter(path)
    writer.begin(Recipe(weights_md5="0" * 32))
    chunk, rows, n = [], [], 0
    for i, vec in enumerate(x):
        if i % FAILED_EVERY == 5:
            chunk.append(Item(n, f"bad{i}.jpg", error="cannot decode"))
            n += 1
        chunk.append(Item(n, fmt_paths(i)))
        rows.append(vec)
        n += 1
        if len(chunk) >= 64:
            writer.write(chunk, np.stack(rows))
            chunk, rows = [], []
    writer.write(chunk, np.stack(rows) if rows else None)
    writer.finish()
    return path


def name(i):
    return f"photos/img{i:05d}.jpg"


@pytest.fixture(scope="module")
def npy(tmp_path_factory, matrix):
    return write_output(tmp_path_factory.mktemp("idx") / "feats.npy", matrix, name)


def brute(x):
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return u @ u.T


def expected_top(s_row, k, exclude=None, min_score=None):
    rows = np.arange(len(s_row))
    keep = np.ones(len(s_row), bool)
    if exclude is not None:
        keep[exclude] = False
    if min_score is not None:
        keep &= s_row >= min_score
    rows = rows[keep]
    order = np.lexsort((rows, -s_row[rows]))[:k]
    return rows[order], s_row[rows][order]


def test_top_k_equals_brute_force_with_ties_and_zero_vectors(npy, matrix):
    s = brute(matrix)
    queries = [3, 11, 500, 0, 2999, 1234, 2048]
    with open_vectors(npy) as v:
        assert v.rows == N and v.paths[:3] == [name(0), name(1), name(2)]
        for block_rows in (4096, 700, 64):  # one block, uneven blocks, many blocks
            got = similarity.top_k(v, matrix[queries], 10, block_rows=block_rows)
            for q, hits in zip(queries, got):
                rows, scores = expected_top(s[q], 10)
                assert [r for r, _ in hits] == list(rows), (q, block_rows)
                np.testing.assert_allclose([sc for _, sc in hits], scores, atol=2e-6)
    # the ties: row 3 and its scaled copies 40 and 2048 have equal cosines, lower row first
    assert [r for r, _ in got[0][:3]] == [3, 40, 2048]
    # a zero query scores 0 against everything, never NaN: the first k rows in order
    assert got[1] == [(r, 0.0) for r in range(10)]


def test_search_api_rows_exclude_themselves_and_min_score(npy, matrix):
    s = brute(matrix)
    result = vggembed.search(npy, rows=[3, 500], k=5, min_score=0.3)
    assert result.failed == []
    by_query = {}
    for h in result.hits:
        by_query.setdefault(h.query, []).append(h)
    for q in (3, 500):
        rows, scores = expected_top(s[q], 5, exclude=q, min_score=0.3)
        hits = by_query[name(q)]
        assert [h.row for h in hits] == list(rows) and [h.rank for h in hits] == list(range(1, len(rows) + 1))
        assert [h.path for h in hits] == [name(r) for r in rows]  # failed inputs shift no path
        np.testing.assert_allclose([h.score for h in hits], scores, atol=2e-6)
    assert [h.row for h in by_query[name(3)]][:2] == [40, 2048]


def connected(n, i, j):
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i, j):
        parent[find(a)] = find(b)
    comps = {}
    for r in sorted(set(i) | set(j)):
        comps.setdefault(find(r), []).append(r)
    return sorted(comps.values())


@pytest.mark.parametrize("threshold", [0.9, 0.7])
def test_pairs_and_groups_equal_brute_force(npy, matrix, threshold):
    s = brute(matrix)
    iu, ju = np.triu_indices(N, 1)
    assert not np.any(np.abs(s[iu, ju] - threshold) < 1e-5), "no pair sits on the threshold"
    hit = s[iu, ju] >= threshold
    with open_vectors(npy) as v:
        for block_rows in (4096, 333):
            found = similarity.pairs(v, threshold, block_rows=block_rows)
            assert list(found.i) == list(iu[hit]) and list(found.j) == list(ju[hit])
            np.testing.assert_allclose(found.score, s[iu[hit], ju[hit]], atol=2e-6)
    groups = vggembed.dedup(npy, threshold)
    assert [[m.row for m in g] for g in groups] == connected(N, iu[hit], ju[hit])
    for g in groups:
        first = g[0].row
        assert g[0].score == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose([m.score for m in g], s[first, [m.row for m in g]], atol=2e-6)
        assert all(m.path == name(m.row) for m in g)
    assert not any(11 in [m.row for m in g] for g in groups), "a zero vector duplicates nothing"


def test_bf16_candidates_give_the_float32_pairs(npy):
    pytest.importorskip("tensorflow")
    from vggembed.net.tfimport import cpu_has_native_bf16

    with open_vectors(npy) as v:
        exact = similarity.pairs(v, 0.8, block_rows=1000)
        if not cpu_has_native_bf16():  # this CPU (CI's machines vary): refused in one line, not emulated slowly
            with pytest.raises(VGGEmbedError, match="bf16 products need a CPU with AVX512_BF16 or AMX"):
                similarity.pairs(v, 0.8, block_rows=1000, precision="bf16")
            return
        fast = similarity.pairs(v, 0.8, block_rows=1000, precision="bf16")
    assert len(exact) > 10
    assert list(fast.i) == list(exact.i) and list(fast.j) == list(exact.j)
    np.testing.assert_array_equal(fast.score >= 0.8, True)
    np.testing.assert_allclose(fast.score, exact.score, atol=1e-6)


def test_every_format_gives_the_same_answers(tmp_path, npy, matrix):
    pytest.importorskip("pyarrow")
    outputs = [npy, write_output(tmp_path / "f.parquet", matrix, name), write_output(tmp_path / "f.csv", matrix, name),
               ray_folder(tmp_path / "parts", matrix)]
    answers = []
    for out in outputs:
        with open_vectors(out, tmp_dir=tmp_path) as v:
            assert v.rows == N and v.dim == D and v.paths == [name(i) for i in range(N)]
            assert v.recipe == Recipe(weights_md5="0" * 32), "the recipe travels with every format"
            found = similarity.pairs(v, 0.9)
            top = similarity.top_k(v, matrix[[3, 100]], 5)
            answers.append((list(found.i), list(found.j), [[r for r, _ in t] for t in top]))
        assert list(tmp_path.glob("vggembed-vectors-*")) == [], "the converted copy is removed on close"
    assert all(a == answers[0] for a in answers[1:])


def ray_folder(folder, x, part_size=700):
    """An --engine ray output written by the real RunDir, failed rows (null embeddings) among them."""
    paths, emb, errors = [], [], []
    for i, vec in enumerate(x):
        if i % FAILED_EVERY == 5:
            paths.append(f"bad{i}.jpg")
            emb.append(np.zeros(D, np.float32))
            errors.append("cannot decode")
        paths.append(name(i))
        emb.append(vec)
        errors.append(None)
    return write_ray_folder(folder, paths, errors, np.stack(emb), Recipe(weights_md5="0" * 32), part_size)


def test_float16_outputs_are_read_as_float32(tmp_path, matrix):
    writer = EmbeddingWriter(tmp_path / "h.npy")
    writer.begin(Recipe(dtype="float16"))
    writer.write([Item(i, name(i)) for i in range(100)], matrix[:100])
    writer.finish()
    with open_vectors(tmp_path / "h.npy") as v:
        assert v.dtype == np.float16
        np.testing.assert_array_equal(v.read(10, 20), matrix[10:20].astype(np.float16).astype(np.float32))
        assert similarity.top_k(v, matrix[[7]], 1)[0][0][0] == 7


def test_bad_indexes_are_one_line_errors(tmp_path, npy):
    with pytest.raises(VGGEmbedError, match="no such file"):
        open_vectors(tmp_path / "nothing.npy")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(VGGEmbedError, match="not an embedding output"):
        open_vectors(tmp_path / "x.txt")
    lonely = tmp_path / "lonely.npy"
    np.save(lonely, np.zeros((3, 4), np.float32))
    with pytest.raises(VGGEmbedError, match="lonely.npy.index.csv beside it"):
        open_vectors(lonely)
    (tmp_path / "folder").mkdir()
    with pytest.raises(VGGEmbedError, match="not an --engine ray output"):
        open_vectors(tmp_path / "folder")
    with pytest.raises(VGGEmbedError, match="k must be between 1 and 3000"):
        vggembed.cluster(npy, 0)


def test_kmeans_is_deterministic_and_assigns_the_nearest_centre(npy, matrix):
    pytest.importorskip("sklearn")
    a = vggembed.cluster(npy, 5, seed=3)
    b = vggembed.cluster(npy, 5, seed=3)
    assert a == b and len(a) == N and {x.cluster for x in a} == set(range(5))
    assert [x.path for x in a] == [name(i) for i in range(N)]
    # the distance is to the row's own centre, and no other centre is nearer
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1, keepdims=True)
    unit = np.divide(matrix, norms, out=np.zeros_like(matrix, dtype=np.float64), where=norms > 0)
    labels = np.array([x.cluster for x in a])
    centres = np.stack([unit[labels == c].mean(axis=0) for c in range(5)])  # Lloyd's fixed point, nearly
    d = np.linalg.norm(unit[:, None, :] - centres[None], axis=2)
    assert (np.argmin(d, axis=1) == labels).mean() > 0.99
    np.testing.assert_allclose([x.distance for x in a], d[np.arange(N), labels], atol=0.02)
    with open_vectors(npy) as v:
        sampled, _ = similarity.kmeans(v, 5, seed=3, fit_rows=1000)
    assert len(sampled) == N


def test_approximate_search_reaches_exact_hits_when_it_visits_every_list(tmp_path, npy, matrix):
    pytest.importorskip("faiss")
    import shutil

    from vggembed.use import ann

    index = shutil.copy(npy, tmp_path / "f.npy")
    shutil.copy(f"{npy}.index.csv", tmp_path / "f.npy.index.csv")
    exact = vggembed.search(index, rows=[3, 100, 2000], k=10)
    lists = ann.default_lists(N)
    approx = vggembed.search(index, rows=[3, 100, 2000], k=10, approximate=True, nprobe=lists)
    # PCA to min(256, D) dims keeps everything here, and every list is visited: the exact answer
    assert [(h.row, h.rank) for h in approx.hits] == [(h.row, h.rank) for h in exact.hits]
    np.testing.assert_allclose([h.score for h in approx.hits], [h.score for h in exact.hits], atol=1e-6)
    saved = tmp_path / "f.npy.faiss"
    assert saved.exists()
    stamp = saved.stat().st_mtime_ns
    vggembed.search(index, rows=[3], k=10, approximate=True, nprobe=2)
    assert saved.stat().st_mtime_ns == stamp, "the saved index is reused"
