"""`vggembed audit`: the blocked k-NN pass against brute force, the label-issue ranking on synthetic data, label
files and class folders, and the command on real photos with a planted mislabel and a planted leak, its report
opened in a real browser."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vggembed.cli import main
from vggembed.errors import VGGEmbedError
from vggembed.use import audit, similarity

from .browser import Page, browser  # noqa: F401 (a fixture)

LAYER = ["--layer", "pool4", "--pool", "flatten"]  # tells near-duplicates from other photos with tiny weights


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


class Matrix:
    """An in-memory matrix shaped like `Vectors` (rows, dim, read, take)."""

    def __init__(self, x):
        self.x, self.rows, self.dim, self.source, self.paths = x, len(x), x.shape[1], "m", [f"{i}" for i in
                                                                                            range(len(x))]

    def read(self, a, b):
        return np.array(self.x[a:b], np.float32)

    def take(self, rows):
        return np.array(self.x[rows], np.float32)


def test_knn_and_pairs_equal_brute_force_across_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(301, 24)).astype(np.float32)
    x[50] = x[7] * 2  # an exact duplicate (cosine 1) and a near one
    x[120] = x[7] + 0.01 * rng.normal(size=24)
    nb, found = audit.knn(Matrix(x), 5, threshold=0.8, block_rows=64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    for i in range(len(x)):
        expected = sorted(range(len(x)), key=lambda j: (-s[i, j], j))[:5]
        assert sorted(nb.idx[i]) == sorted(expected)
        np.testing.assert_allclose(nb.sim[i], s[i, nb.idx[i]], atol=1e-5)
        assert list(nb.sim[i]) == sorted(nb.sim[i], reverse=True)
    reference = similarity.pairs(Matrix(x), 0.8, block_rows=64)
    assert list(zip(found.i, found.j)) == list(zip(reference.i, reference.j))
    assert (7, 50) in list(zip(found.i, found.j))
    scores = audit.outlier_scores(nb)
    assert scores.argmin() in (7, 50, 120) and scores[7] < np.median(scores)


def test_rank_label_issues_finds_planted_mislabels_and_suggests_the_true_class():
    rng = np.random.default_rng(1)
    n, k_classes = 400, 4
    truth = rng.integers(0, k_classes, n)
    # out-of-fold probabilities of a decent classifier: the true class mostly most likely
    logits = rng.normal(size=(n, k_classes)) + 3.0 * np.eye(k_classes)[truth]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    given = truth.copy()
    planted = rng.choice(n, 20, replace=False)
    given[planted] = (truth[planted] + 1 + rng.integers(0, k_classes - 1, 20)) % k_classes
    # neighbours: images of the same true class
    neighbours = np.array([rng.choice(np.flatnonzero(truth == truth[i]), 10) for i in range(n)])
    ranked = audit.rank_label_issues(proba, given, neighbours)
    assert len(ranked) == n and [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    top = {r.row for r in ranked[:20]}
    assert len(top & set(planted)) >= 18
    by_row = {r.row: r for r in ranked}
    assert sum(by_row[i].suggested == truth[i] for i in planted) >= 18
    first = ranked[0]
    assert first.self_confidence == pytest.approx(proba[first.row, given[first.row]])
    assert 0 <= first.other_share <= 1 and first.given == given[first.row]
    with pytest.raises(VGGEmbedError, match="given labels must lie in 0..3"):
        audit.rank_label_issues(proba, given + 4, neighbours)
    with pytest.raises(VGGEmbedError, match=r"expected proba \(N, K\)"):
        audit.rank_label_issues(proba[:10], given, neighbours)


def test_knn_proba_is_a_distribution_that_ignores_unlabelled_neighbours():
    given = np.array([0, 0, 1, -1])
    idx = np.array([[1, 3, -1], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    p = audit.knn_proba(given, idx, 2)
    np.testing.assert_allclose(p.sum(axis=1), 1)
    assert p[0, 0] > p[0, 1] and p[2, 0] > p[2, 1]  # row 2's labelled neighbours are both class 0


def test_label_files_in_any_csv_quoting_and_parquet(tmp_path):
    from vggembed.use.train import read_label_table

    rows = [["path", "label", "split"], ['a "quoted", name.jpg', "cat", "train"], ["line\nbreak.jpg", "dog", "val"],
            ["plain.jpg", "cat", ""]]
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL).writerows(rows)
    (tmp_path / "l.csv").write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())  # with a BOM
    table = read_label_table(tmp_path / "l.csv", "split")
    assert table == {'a "quoted", name.jpg': "cat", "line\nbreak.jpg": "dog", "plain.jpg": "cat"}
    assert table.splits == {'a "quoted", name.jpg': "train", "line\nbreak.jpg": "val"}
    (tmp_path / "bare.csv").write_text("x.jpg,cat\ny.jpg,dog\n")
    assert read_label_table(tmp_path / "bare.csv") == {"x.jpg": "cat", "y.jpg": "dog"}
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["x.jpg"], "label": ["cat"]}), tmp_path / "l.parquet")
    assert read_label_table(tmp_path / "l.parquet") == {"x.jpg": "cat"}
    (tmp_path / "latin1.csv").write_bytes(b"path,label\ncaf\xe9.jpg,cat\n")
    with pytest.raises(VGGEmbedError, match=r"latin1.csv: is not UTF-8 text \(byte 14\)"):
        read_label_table(tmp_path / "latin1.csv")
    with pytest.raises(VGGEmbedError, match="l.csv: has no column fold"):
        read_label_table(tmp_path / "l.csv", "fold")
    labels, splits = audit.given_labels(["./x.jpg", "file://x.jpg", str(tmp_path / "nowhere.jpg")],
                                        read_label_table(tmp_path / "bare.csv"))
    assert labels == ["cat", "cat", None] and splits == [None, None, None]


def test_the_one_label_reader_keeps_train_and_audit_behaviours(tmp_path):
    """train's and audit's label files are read by one reader: a name whose bytes are not UTF-8 is those bytes
    when it names a file (as vggembed writes names), Parquet's path_bytes are exact, a split column beside;
    an empty label is an unlabelled image, two labels for one path are refused."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vggembed.use.train import read_label_table

    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    odd.write_bytes(b"")
    (tmp_path / "raw.csv").write_bytes(b"path,label\n" + os.fsencode(odd) + b",cat\nempty.jpg,\n")
    assert read_label_table(tmp_path / "raw.csv") == {str(odd): "cat"}  # and empty.jpg has no label
    pq.write_table(pa.table({"path": ["shown"], "path_bytes": [os.fsencode(odd)], "label": ["cat"],
                             "split": ["val"]}), tmp_path / "b.parquet")
    table = read_label_table(tmp_path / "b.parquet", "split")
    assert table == {str(odd): "cat"} and table.splits == {str(odd): "val"}
    assert audit.given_labels([str(odd)], table) == (["cat"], ["val"])
    (tmp_path / "twice.csv").write_text("a.jpg,cat\nb.jpg,dog\na.jpg,dog\n")
    with pytest.raises(VGGEmbedError, match=r"twice.csv: a.jpg is labelled both 'cat' and 'dog' \(line 3\)"):
        read_label_table(tmp_path / "twice.csv")
    (tmp_path / "short.csv").write_text("path,label\na.jpg\n")
    with pytest.raises(VGGEmbedError, match=r"short.csv: line 2 has 1 field; expected path,label"):
        read_label_table(tmp_path / "short.csv")


def test_class_folders_are_recovered_from_the_recorded_paths():
    paths = ["data/train/cat/1.jpg", "data/train/cat/2.jpg", "data/train/dog/a/3.jpg", "data/train/loose.jpg"]
    assert audit.folder_labels(paths) == ["cat", "cat", "dog", None]
    assert audit.folder_labels(paths[:2]) == ["cat", "cat"]  # one class: its folder's parent is the root
    assert audit.folder_labels(paths, root="data") == ["train"] * 4
    with pytest.raises(VGGEmbedError, match="no image lies in a class folder under data/train/cat"):
        audit.folder_labels(paths[:2], root="data/train/cat")


def variants(img: Image.Image, folder, stem):
    """Four near-duplicates of a photo: the original, JPEG 85, half size, a 3% crop."""
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{stem}-0.png")
    img.save(folder / f"{stem}-1.jpg", quality=85)
    img.resize((img.width // 2, img.height // 2)).save(folder / f"{stem}-2.png")
    dx, dy = img.width * 3 // 100, img.height * 3 // 100
    img.crop((dx, dy, img.width - dx, img.height - dy)).save(folder / f"{stem}-3.png")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, photos, tiny16):
    """train/{cat,coffee,people}/ and val/{cat,people}/ from real photos; one coffee photo filed under cat (the
    planted mislabel), and one of the cat's copies in val (the planted leak)."""
    root = tmp_path_factory.mktemp("audit")
    img = {p.stem: Image.open(p).convert("RGB") for p in photos}
    variants(img["chelsea"], root / "train" / "cat", "chelsea")
    variants(img["coffee"], root / "train" / "coffee", "coffee")
    variants(img["astronaut"], root / "train" / "people", "astronaut")
    variants(img["grace_hopper"], root / "train" / "people", "grace")
    shutil.move(root / "train" / "coffee" / "coffee-1.jpg", root / "train" / "cat" / "coffee-1.jpg")
    (root / "val" / "cat").mkdir(parents=True)
    img["chelsea"].save(root / "val" / "cat" / "leaked.jpg", quality=90)
    (root / "val" / "people").mkdir(parents=True)
    img["grace_hopper"].rotate(180).save(root / "val" / "people" / "grace-upside-down.png")
    for split in ("train", "val"):
        made = run("embed", root / split, "-o", root / f"{split}.npy", "--weights", tiny16, *LAYER)
        assert made.exit_code == 0, made.output
    return root


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_audit_finds_the_planted_mislabel_and_leak_and_its_report_shows_them(labelled, browser, tmp_path):
    out = tmp_path / "audit"
    # k = 3: each photo has three near copies, so an image whose 3 nearest are not copies stands out
    result = run("audit", labelled / "train.npy", "--val", labelled / "val.npy", "--folders", "--threshold", 0.8,
                 "-k", 3, "-o", out)
    assert result.exit_code == 0, result.output
    assert "audited 18 images" in result.stderr and "4 leaked pairs across the split" in result.stderr
    moved = str(labelled / "train" / "cat" / "coffee-1.jpg")
    issues = read_csv(out / "label_issues.csv")
    assert issues[0]["path"] == moved and issues[0]["label"] == "cat" and issues[0]["suggested"] == "coffee"
    assert sorted(p.rsplit("/", 2)[-2] for p in json.loads(issues[0]["neighbours"])) == ["coffee"] * 3
    leaks = read_csv(out / "leaks.csv")
    # the copy in val is a near-duplicate of each of the cat's four variants in train
    assert [(r["path_a"].rsplit("/", 2)[-2:], r["path_b"].rsplit("/", 3)[-3:], r["split_a"], r["split_b"])
            for r in leaks] == [(["cat", f"chelsea-{i}{e}"], ["val", "cat", "leaked.jpg"], "train", "val")
                                for i, e in ((0, ".png"), (1, ".jpg"), (2, ".png"), (3, ".png"))]
    cross = read_csv(out / "cross_class_duplicates.csv")
    assert {moved} == {r["path_a"] for r in cross} | {r["path_b"] for r in cross} - {
        str(labelled / "train" / "coffee" / f"coffee-{i}{e}") for i, e in ((0, ".png"), (2, ".png"), (3, ".png"))}
    counts = {r["label"]: (int(r["images"]), int(r["images (train)"]), int(r["images (val)"]))
              for r in read_csv(out / "classes.csv")}
    assert counts == {"cat": (6, 5, 1), "coffee": (3, 3, 0), "people": (9, 8, 1)}
    outliers = read_csv(out / "outliers.csv")
    assert len(outliers) == 18 and float(outliers[0]["score"]) >= float(outliers[-1]["score"])
    assert outliers[0]["path"].endswith("grace-upside-down.png")  # the one photo with no near-duplicate

    page = Page(browser, out / "report")
    first = page.sections()[0]
    assert first["title"] == f"{moved}: labelled cat, looks like coffee" and first["labels"][0] == "cat"
    assert "predictions of the softmax head vggembed train fits" in page.page.text_content("#note")
    assert all(w > 0 for _, w in page.thumbnails())
    page.screenshot("report-audit")
    page.filter(label="people")
    assert all("people" in s["labels"] for s in page.sections())
    page.filter(label="")
    page.page.click("#tabs button:text('Near-duplicates')")
    titles = [s["title"] for s in page.sections()]
    assert any(t.endswith("(across the split)") for t in titles)
    assert any("(across classes)" in t for t in titles)
    page.page.click("#tabs button:text('Classes')")
    assert page.page.text_content("main table").startswith("labelimagesimages (train)images (val)cat6")
    assert page.errors == []

    again = run("audit", labelled / "train.npy", "-o", out)
    assert again.exit_code == 1 and "holds an earlier audit; pass --overwrite" in again.output
    unlabelled = run("audit", labelled / "train.npy", "-o", out, "--overwrite", "--threshold", 0.8)
    assert unlabelled.exit_code == 0, unlabelled.output
    assert sorted(p.name for p in out.iterdir()) == ["duplicates.csv", "outliers.csv", "report"]


def test_audit_with_a_label_file_and_a_split_column(labelled, tmp_path):
    with open(labelled / "train.npy.index.csv", newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    lines = [["path", "label", "split"]] + [[p, p.split("/")[-2], "val" if p.endswith("-3.png") else "train"]
                                            for p in paths]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(lines)
    result = run("audit", labelled / "train.npy", "--labels", tmp_path / "labels.csv", "--split", "split",
                 "--threshold", 0.8, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    leaks = read_csv(tmp_path / "a" / "leaks.csv")
    assert leaks and all({r["split_a"], r["split_b"]} == {"train", "val"} for r in leaks)
    assert read_csv(tmp_path / "a" / "label_issues.csv")[0]["path"].endswith("cat/coffee-1.jpg")
    assert "training on 16 images of 3 classes" in result.stderr  # the head vggembed train fits
    knn = run("audit", labelled / "train.npy", "--labels", tmp_path / "labels.csv", "--probabilities", "knn",
              "-k", 3, "-o", tmp_path / "k")
    assert knn.exit_code == 0 and "training on" not in knn.stderr
    assert read_csv(tmp_path / "k" / "label_issues.csv")[0]["path"].endswith("cat/coffee-1.jpg")
    missing = run("audit", labelled / "train.npy", "--labels", tmp_path / "labels.csv", "--split", "fold",
                  "-o", tmp_path / "b")
    assert missing.exit_code == 1 and "labels.csv: has no column fold" in missing.output
    both = run("audit", labelled / "train.npy", "--labels", tmp_path / "labels.csv", "--folders", "-o", tmp_path / "c")
    assert both.exit_code == 2 and "not both" in both.output


# ------------------------------------------------------------ images in, embedded first
TINY = ["--layer", "pool4", "--pool", "flatten"]


def test_audit_of_image_folders_embeds_them_first_and_finds_the_mislabel_and_the_leak(labelled, tiny16, tmp_path):
    """`audit photos/train --val photos/val --folders`: the folders are embedded as `embed` would (the same
    vectors), classes are their subfolders, and the planted mislabel and leak are found; a second audit reads
    the vectors again instead of embedding them."""
    out = tmp_path / "audit"
    args = ["audit", labelled / "train", "--val", labelled / "val", "--folders", "--weights", tiny16, *TINY,
            "--threshold", 0.8, "-k", 3, "-o", out]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "embedded 16 of 16 images" in result.stderr and "embedded 2 of 2 images" in result.stderr
    assert "audited 18 images" in result.stderr and "4 leaked pairs across the split" in result.stderr
    for split in ("train", "val"):
        made = "features.npy" if split == "train" else "val-features.npy"
        np.testing.assert_array_equal(np.load(out / made), np.load(labelled / f"{split}.npy"))
    moved = str(labelled / "train" / "cat" / "coffee-1.jpg")
    issues = read_csv(out / "label_issues.csv")
    assert (issues[0]["path"], issues[0]["label"], issues[0]["suggested"]) == (moved, "cat", "coffee")
    leaks = read_csv(out / "leaks.csv")
    assert {r["path_b"] for r in leaks} == {str(labelled / "val" / "cat" / "leaked.jpg")}
    assert {(r["split_a"], r["split_b"], r["label_a"], r["label_b"]) for r in leaks} == {("train", "val", "cat", "cat")}
    counts = {r["label"]: (int(r["images (train)"]), int(r["images (val)"])) for r in read_csv(out / "classes.csv")}
    assert counts == {"cat": (5, 1), "coffee": (3, 0), "people": (8, 1)}
    # what the label issues were ranked from, for any other ranking (cleanlab's, in benchmarks/audit.py)
    with np.load(out / "probabilities.npz") as z:
        assert z["classes"].tolist() == ["cat", "coffee", "people"] and z["proba"].shape == (18, 3)
        np.testing.assert_allclose(z["proba"].sum(axis=1), 1, rtol=1e-5)
        row = z["paths"].tolist().index(moved)
        assert z["given"][row] == 0 and float(issues[0]["self_confidence"]) == pytest.approx(z["proba"][row, 0],
                                                                                            abs=1e-6)

    again = run(*args)
    assert again.exit_code == 1 and "holds an earlier audit; pass --overwrite" in again.stderr
    reused = run(*args, "--resume", "--overwrite")
    assert reused.exit_code == 0, reused.output
    assert "features.npy is already complete; nothing left to do" in reused.stderr and "embedded" not in reused.stderr
    assert read_csv(out / "label_issues.csv") == issues


def test_image_files_with_a_label_file_and_a_broken_image_counted_and_left_out(labelled, tiny16, tmp_path):
    images = sorted((labelled / "train").rglob("*.*"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"]] + [[p, p.parent.name] for p in images] + [[broken, "cat"]])
    out = tmp_path / "audit"
    result = run("audit", *images, broken, "--labels", table, "--weights", tiny16, *TINY, "-k", 3, "-o", out)
    assert result.exit_code == 3, result.output  # as embed and train: done, but some images failed
    note = f"note: 1 image failed when embedded and is not audited (listed in {out}/features.npy.errors.csv)"
    assert note in result.stderr and "audited 16 images" in result.stderr
    assert [r["path"] for r in read_csv(out / "outliers.csv")].count(str(broken)) == 0
    assert read_csv(out / "label_issues.csv")[0]["path"] == str(labelled / "train" / "cat" / "coffee-1.jpg")
    # the features are an embedding output like any other: audited again, the failure counted the same way
    again = run("audit", out / "features.npy", "-o", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert note in again.stderr and "audited 16 images" in again.stderr


def test_embedding_options_with_embedding_outputs_are_refused_naming_them(labelled, tiny16, tmp_path):
    out = tmp_path / "a"
    refused = run("audit", labelled / "train.npy", "--weights", tiny16, "--batch-size", 4, "-o", out)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert refused.stderr.splitlines()[-1] == (
        f"Error: --weights, --batch-size: say how images are embedded, but {labelled / 'train.npy'} is an "
        "embedding output, read as it was made (its recipe records how); leave them out")
    assert not out.exists()
    # the weights from the environment are a default, not a request: the output is audited
    env = CliRunner().invoke(main, ["audit", str(labelled / "train.npy"), "-o", str(out), "--threshold", "0.8"],
                             env={"VGGEMBED_WEIGHTS": str(tiny16)}, catch_exceptions=False)
    assert env.exit_code == 0, env.output
    # --layer picks the output, by its name as files record it or as NAME:POOL
    for layer in ("pool4_flatten", "pool4:flatten"):
        picked = run("audit", labelled / "train.npy", "--layer", layer, "-o", tmp_path / layer.replace(":", "-"))
        assert picked.exit_code == 0, picked.output
    other = run("audit", labelled / "train.npy", "--layer", "fc2", "-o", tmp_path / "b")
    assert other.exit_code == 1 and "has no vectors named 'fc2'; it holds pool4_flatten" in other.stderr
    mixed = run("audit", labelled / "train", labelled / "train.npy", "-o", tmp_path / "c")
    assert mixed.exit_code == 2 and "give either images (folders, files, shards) or embedding outputs" in mixed.stderr
    missing = run("audit", tmp_path / "nothere.npy", "--weights", tiny16, "-o", tmp_path / "d")
    assert missing.exit_code == 1 and missing.stderr == f"Error: {tmp_path / 'nothere.npy'}: no such file or folder\n"


def test_a_ray_folder_by_url_is_read_as_vectors_and_its_failed_rows_counted(labelled, tmp_path):
    """A Ray run folder named by a URL is an embedding output (as search reads it), not a folder of images; its
    rows recorded as failed are left out and counted in the note."""
    from vggembed.store.vectors import open_vectors

    from .conftest import write_ray_folder

    with open_vectors(labelled / "train.npy") as v:
        names, recipe = np.array(v.paths + ["gone.jpg"]), v.recipe
        vectors = np.vstack([v.read(0, v.rows), v.read(0, 1)])
    errors = np.array([None] * (len(names) - 1) + ["not an image Pillow can identify"], dtype=object)
    write_ray_folder(tmp_path / "run", names, errors, vectors, recipe, part_size=5)
    result = run("audit", f"file://{tmp_path / 'run'}", "--folders", "--probabilities", "knn", "-k", 3,
                 "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert f"note: 1 image failed when embedded and is not audited (listed in {tmp_path / 'run'})" in result.stderr
    assert "audited 16 images" in result.stderr and "embedded" not in result.stderr.replace("when embedded", "")
