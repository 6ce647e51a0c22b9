"""Your own classes: train a head, evaluate it, and run it wherever classify goes (tiny weights, real photos)."""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from click.testing import CliRunner

import vggembed
from vggembed.cli import main
from vggembed.errors import display
from vggembed.net import synthetic

from .conftest import HANG, interruptible

VGGEMBED = [sys.executable, "-m", "vggembed"]


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, input=input)


def read_csv(path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def classes(tmp_path_factory, photos):
    """photos/CLASS/imgNNNNNN.png: 12 crops of each of three real photos (cat, coffee, astronaut)."""
    root = tmp_path_factory.mktemp("classes") / "photos"
    for name, photo in zip(("cat", "coffee", "person"), photos[:3]):
        synthetic.photo_crops(photo, root / name, 12, size=(64, 48))
    return root


@pytest.fixture(scope="module")
def feats(tmp_path_factory, classes, tiny16):
    """The classes' fc2 vectors, as `embed` writes them."""
    out = tmp_path_factory.mktemp("feats") / "feats.npy"
    assert run("embed", classes, "-o", out, "--weights", tiny16).exit_code == 0
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory, classes, tiny16):
    """A head trained from the folders, as a new user would."""
    out = tmp_path_factory.mktemp("head") / "head.npz"
    result = run("train", classes, "-o", out, "--weights", tiny16)
    assert result.exit_code == 0, result.output
    return out


def separable(n=600, d=40, k=4, seed=0):
    """Synthetic non-negative features, k classes that overlap a little."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(0, 1.2, (k, d))
    x = np.maximum(centres[y] + rng.normal(0, 1.0, (n, d)), 0) * rng.uniform(0.5, 3, d)
    return x.astype(np.float32), y


# ------------------------------------------------------------- the solver
def test_the_head_equals_scikit_learns_logistic_regression_at_the_same_C():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vggembed.store.recipe import Recipe
    from vggembed.use.train import Rows, fit_head

    x, y = separable()
    paths = [f"p/{c}/{i}.jpg" for i, c in enumerate(y)]
    for C in (0.01, 1.0):
        head = fit_head([Rows.arrays(x, paths, Recipe(weights="w.npz", arch="vgg16", weights_md5="0" * 32))], None,
                        C=C, log=lambda line: None)
        z = StandardScaler().fit_transform(x.astype(np.float64))
        sk = LogisticRegression(C=C, tol=1e-8, max_iter=10_000).fit(z, y)

        def objective(w, b):
            logits = z @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            lse = np.log(np.exp(logits).sum(axis=1))
            return 0.5 * np.sum(w * w) + C * np.sum(lse - logits[np.arange(len(y)), y])

        ours = objective(head.coef.astype(np.float64), head.intercept.astype(np.float64))
        theirs = objective(sk.coef_.T, sk.intercept_)
        assert abs(ours - theirs) / theirs < 1e-4, (C, ours, theirs)
        agree = np.mean(np.argmax(head.predict_proba(x), axis=1) == sk.predict(z))
        assert agree >= 0.995, (C, agree)
        # the standardisation it stores is StandardScaler's
        np.testing.assert_allclose(head.mean, x.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(head.scale, x.std(axis=0), rtol=1e-4)


def test_fits_made_together_equal_the_same_fits_made_alone():
    """The head and its folds share each pass over the rows; each fit must still be the one it would be alone
    (a fit reading another's weights or rows would not be)."""
    from vggembed.use.logistic import Problem, Task

    x, y = separable(n=500, d=30, k=3, seed=4)
    problem = Problem(x.copy(), y, 3)
    scale = problem.scale_from(*problem.sums([slice(0, 500)]))
    first = problem.fit([slice(0, 100)], 0.5, scale, tol=1e-6)
    tasks = [Task([slice(0, 500)], 1.0, scale, tol=1e-7),  # every row
             Task([slice(100, 500)], 0.05, scale, tol=1e-6),  # a fold's two slices, one of them empty
             Task([slice(0, 200), slice(300, 500)], 20.0, scale * 2, tol=1e-6, balanced=True),
             Task([slice(0, 100)], 2.0, scale, init=first, tol=1e-6)]  # warm-started, a few rows
    alone = [problem.fit(t.rows, t.C, t.scale, init=t.init, tol=t.tol, balanced=t.balanced) for t in tasks]
    for at_once in (None, 2):  # all at once, or two at a time (the next starting as one ends)
        together = problem.fit_together(tasks, together=at_once)
        for task, fit, single in zip(tasks, together, alone):
            assert fit.C == task.C and fit.iterations > 0
            assert abs(fit.objective - single.objective) <= 1e-6 * single.objective, (task.C, fit.objective,
                                                                                     single.objective)
            np.testing.assert_allclose(fit.coef, single.coef, atol=1e-3 * float(np.abs(single.coef).max()))
            assert np.array_equal(problem.proba(fit, slice(0, 500)).argmax(1),
                                  problem.proba(single, slice(0, 500)).argmax(1))
        # different tolerances and data: the fits did not stop together
        assert len({fit.iterations for fit in together}) > 1


def test_an_error_in_one_of_the_fits_made_together_stops_them_all_and_is_raised():
    import threading

    from vggembed.use.logistic import Fit, Problem, Task

    x, y = separable(n=200, d=10, k=3, seed=5)
    problem = Problem(x.copy(), y, 3)
    scale = np.ones(10, np.float32)
    wrong = Fit(coef=np.zeros((11, 3), np.float32), intercept=np.zeros(3, np.float32), scale=scale, C=1.0,
                iterations=0, evaluations=0, objective=0.0, converged=True)
    def fits_running():
        return [t for t in threading.enumerate() if t.name.startswith("vggembed-fit-")]

    with pytest.raises(ValueError):  # a start of the wrong shape, met in its own thread
        problem.fit_together([Task([slice(0, 200)], 1.0, scale, tol=1e-9),
                              Task([slice(0, 100)], 1.0, scale, init=wrong)])
    with pytest.raises(ValueError):  # an error in the shared pass
        problem.fit_together([Task([slice(0, 200)], 1.0, scale),
                              Task([slice(0, 100)], 1.0, np.ones(9, np.float32))])
    deadline = time.monotonic() + HANG  # they end as soon as they are told; the deadline only bounds a hang
    while fits_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fits_running()  # no fit's thread is left waiting


def uneven(seed=1):
    """Three overlapping classes of 600, 150 and 30 rows: ok, a common defect and a rare one."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], [600, 150, 30])
    centres = rng.normal(0, 0.5, (3, 20))
    x = np.maximum(centres[y] + rng.normal(0, 1.0, (len(y), 20)), 0)
    return x.astype(np.float32), y


def test_balanced_class_weights_equal_scikit_learns_and_lift_the_rare_class():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vggembed.store.recipe import Recipe
    from vggembed.use.train import Rows, fit_head

    x, y = uneven()
    paths = [f"p/{c}/{i}.jpg" for i, c in enumerate(y)]
    rows = [Rows.arrays(x, paths, Recipe(weights="w.npz", arch="vgg16", weights_md5="0" * 32))]
    C = 0.05
    heads = {w: fit_head(rows, None, C=C, class_weight=w, log=lambda line: None) for w in (None, "balanced")}
    z = StandardScaler().fit_transform(x.astype(np.float64))
    sk = LogisticRegression(C=C, class_weight="balanced", tol=1e-8, max_iter=10_000).fit(z, y)
    weight = (len(y) / (3 * np.bincount(y)))[y]

    def objective(w, b):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits).sum(axis=1))
        return 0.5 * np.sum(w * w) + C * np.sum(weight * (lse - logits[np.arange(len(y)), y]))

    ours = objective(heads["balanced"].coef.astype(np.float64), heads["balanced"].intercept.astype(np.float64))
    theirs = objective(sk.coef_.T, sk.intercept_)
    assert abs(ours - theirs) / theirs < 1e-4, (ours, theirs)
    assert np.mean(np.argmax(heads["balanced"].predict_proba(x), axis=1) == sk.predict(z)) >= 0.995
    # Out of fold, the rare class is found far more often, and the metrics say how the head was trained.
    recall = {w: h.metrics["per_class"][2]["recall"] for w, h in heads.items()}
    assert recall["balanced"] > recall[None] + 0.2, recall
    assert heads["balanced"].metrics["balanced_accuracy"] > heads[None].metrics["balanced_accuracy"]
    assert heads["balanced"].metrics["class_weight"] == "balanced" and heads[None].metrics["class_weight"] is None
    with pytest.raises(vggembed.VGGEmbedError, match="class_weight must be one of None, 'balanced'"):
        fit_head(rows, None, C=C, class_weight="equal", log=lambda line: None)


def test_out_of_fold_figures_do_not_leak_the_held_out_rows_with_weak_regularisation():
    """More features than rows: every training set is separable, held-out rows are not. With weak L2 a fold that
    started from the head (which saw its held-out rows) met the tolerance at once and scored 1.0."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from vggembed.store.recipe import Recipe
    from vggembed.use.train import Rows, fit_head

    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = (rng.normal(0, 0.2, (3, 100))[y] + rng.normal(0, 1.0, (60, 100))).astype(np.float32)
    paths = [f"p/{c}/{i}.jpg" for i, c in enumerate(y)]
    head = fit_head([Rows.arrays(x, paths, Recipe(weights="w.npz", arch="vgg16", weights_md5="0" * 32))], None,
                    C=1e4, log=lambda line: None)
    assert all(f["iterations"] > 0 for f in head.metrics["fold_fits"])
    e = head.evaluation
    order = [paths.index(p) for p in e.paths]
    X = x[order]
    predicted = np.empty(len(order), np.int64)
    for f in np.unique(e.fold):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1e4, max_iter=100_000))
        predicted[e.fold == f] = model.fit(X[e.fold != f], e.given[e.fold != f]).predict(X[e.fold == f])
    honest = float(np.mean(predicted == e.given))
    assert honest < 0.8  # the held-out rows are hard
    assert abs(head.metrics["top1"] - honest) <= 0.05, (head.metrics["top1"], honest)


@pytest.mark.parametrize("option, message", [(["--seed", "-5"], "-5 is not in the range x>=0"),
                                             (["--C", "nan"], "nan is not a finite number"),
                                             (["--C", "inf"], "inf is not a finite number")])
def test_a_negative_seed_or_a_c_that_is_not_finite_is_a_usage_error(tmp_path, feats, option, message):
    result = run("train", feats, "-o", tmp_path / "h.npz", *option)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_class_weight_on_the_command_line_is_printed_and_kept_in_the_head(tmp_path, feats):
    out = tmp_path / "balanced.npz"
    result = run("train", feats, "-o", out, "--class-weight", "balanced", "--C", "1")
    assert result.exit_code == 0, result.output
    assert "(C = 1, 3 classes, balanced, fc2)" in result.stdout
    assert json.loads(str(np.load(out)["metrics"]))["class_weight"] == "balanced"
    assert "C = 1, balanced class weights" in run("info", out).stdout
    wrong = run("train", feats, "-o", tmp_path / "x.npz", "--class-weight", "equal")
    assert wrong.exit_code == 2 and "'equal' is not one of 'none', 'balanced'" in wrong.stderr


# ----------------------------------------------------------------- train
def test_train_from_folders_writes_the_head_its_figures_and_the_probabilities(head, tiny16):
    z = np.load(head, allow_pickle=False)  # numpy alone reads it
    assert {"format", "format_version", "kind", "classes", "coef", "intercept", "mean", "scale", "C", "recipe",
            "metrics"} <= set(z.files)
    assert z["classes"].tolist() == ["cat", "coffee", "person"]
    assert z["coef"].shape == (32, 3) and z["coef"].dtype == np.float32
    recipe = json.loads(str(z["recipe"]))
    assert recipe["outputs"] == [{"name": "fc2", "layer": "relu7", "pool": None}]
    assert recipe["weights_md5"] == vggembed.load_weights(tiny16)[1].md5
    metrics = json.loads(str(z["metrics"]))
    assert metrics["evaluation"] == "5-fold out-of-fold" and metrics["rows"] == 36
    assert metrics["class_counts"] == {"cat": 12, "coffee": 12, "person": 12}
    assert metrics["top1"] > 0.5  # crops of three different photos, through tiny random weights (chance: 1/3)
    stem = head.with_suffix("")
    for suffix in (".metrics.json", ".oof.npz", ".oof.csv", ".confusion.csv", ".confusion.png"):
        assert Path(str(stem) + suffix).is_file(), suffix
    confusion = read_csv(str(stem) + ".confusion.csv")
    assert confusion[0] == ["given \\ predicted", "cat", "coffee", "person"]
    assert sum(int(v) for row in confusion[1:] for v in row[1:]) == 36
    from PIL import Image

    with Image.open(str(stem) + ".confusion.png") as picture:
        assert picture.width > 100 and picture.height > 100


def test_out_of_fold_figures_equal_a_recomputation_from_the_stored_probabilities(head):
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, log_loss

    metrics = json.loads(Path(str(head.with_suffix("")) + ".metrics.json").read_text())
    with np.load(str(head.with_suffix("")) + ".oof.npz") as oof:
        proba, given, fold = oof["proba"], oof["given"], oof["fold"]
        assert oof["classes"].tolist() == ["cat", "coffee", "person"]
        assert len(oof["paths"]) == 36
    assert sorted(np.bincount(fold).tolist()) == [7, 7, 7, 7, 8]  # 36 images in 5 stratified folds
    predicted = proba.argmax(axis=1)
    assert metrics["top1"] == pytest.approx(np.mean(predicted == given))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(given, predicted))
    assert metrics["log_loss"] == pytest.approx(log_loss(given, proba, labels=[0, 1, 2]), rel=1e-5)
    assert metrics["confusion"] == confusion_matrix(given, predicted, labels=[0, 1, 2]).tolist()
    f1 = f1_score(given, predicted, average=None, labels=[0, 1, 2], zero_division=0)
    assert [c["f1"] for c in metrics["per_class"]] == pytest.approx(f1.tolist())
    rows = read_csv(str(head.with_suffix("")) + ".oof.csv")
    assert rows[0] == ["path", "fold", "given", "predicted", "p_given", "p_predicted"]
    assert len(rows) == 37 and all(r[2] == Path(r[0]).parent.name for r in rows[1:])


def test_class_folders_spelled_absolute_relative_or_with_dots_are_the_same_classes(tmp_path, monkeypatch):
    from vggembed.use.train import folder_labels

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    paths = [str(tmp_path / "work" / "photos" / "cat" / "a.jpg"), "photos/dog/b.jpg", "./photos/cat/c.jpg",
             "../work/photos/dog/d.jpg"]
    assert folder_labels(paths) == (["cat", "dog", "cat", "dog"], "photos")
    assert folder_labels(["/elsewhere/p/cat/a.jpg", "/elsewhere/p/dog/b.jpg"])[1] == "/elsewhere/p"
    assert folder_labels(["s3://b/p/cat/a.jpg", "s3://b/p/dog/b.jpg"]) == (["cat", "dog"], "s3://b/p")


def test_a_label_file_naming_one_file_two_ways_is_read_as_one_and_refused_when_they_disagree(tmp_path, feats):
    paths = [r[0] for r in read_csv(f"{feats}.index.csv")[1:]]
    first = paths[0]
    rows = [[p, Path(p).parent.name] for p in paths] + [[os.path.relpath(first), Path(first).parent.name]]
    table = tmp_path / "twice.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    agreed = run("train", feats, "--labels", table, "-o", tmp_path / "a.npz", "--C", 1)
    assert agreed.exit_code == 0 and "not among" not in agreed.stderr  # both spellings name an input
    rows[-1][1] = "other"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = run("train", feats, "--labels", table, "-o", tmp_path / "b.npz", "--C", 1)
    assert result.exit_code == 1 and "the labels name one file twice, differently" in result.stderr
    assert f"is 'other'" in result.stderr and not (tmp_path / "b.npz").exists()


def test_an_image_given_twice_is_trained_on_once_and_a_val_set_must_be_unseen(tmp_path, feats):
    twice = run("train", feats, feats, "-o", tmp_path / "a.npz", "--C", 1)
    assert twice.exit_code == 0, twice.output
    assert "note: 36 images of" in twice.stderr and "are inputs more than once" in twice.stderr
    assert json.loads(str(np.load(tmp_path / "a.npz")["metrics"]))["rows"] == 36
    seen = run("train", feats, "--val", feats, "-o", tmp_path / "b.npz", "--C", 1)
    assert seen.exit_code == 1
    assert "--val: 36 of its images are also trained on" in seen.stderr and "training on" not in seen.stderr
    assert not (tmp_path / "b.npz").exists()


def test_folder_labels_and_a_label_file_give_the_same_head(tmp_path, feats):
    by_folder = tmp_path / "a.npz"
    assert run("train", feats, "-o", by_folder, "--C", 0.5).exit_code == 0
    paths = [r[0] for r in read_csv(f"{feats}.index.csv")[1:]]
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([p, Path(p).parent.name] for p in reversed(paths))  # any order
    by_file = tmp_path / "b.npz"
    result = run("train", feats, "--labels", table, "-o", by_file, "--C", 0.5)
    assert result.exit_code == 0, result.output
    with np.load(by_folder) as a, np.load(by_file) as b:
        for key in ("classes", "coef", "intercept", "mean", "scale", "C"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_parquet_label_table_and_names_with_commas_quotes_newlines_and_bad_bytes(tmp_path, photos, tiny16):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs"
    odd = ['a,b "quoted".png', "line\nbreak.png", os.fsdecode(b"bad\xff.png"), "plain.png"]
    names = []
    for i, name in enumerate(odd * 3):
        p = folder / f"{i}-{name}"
        p.parent.mkdir(exist_ok=True)
        synthetic.photo_crops(photos[i % 2], tmp_path / "crop", 1)[0].rename(p)
        names.append(p)
    labels = {str(p): ("label, with \"comma\"\nand a line" if i % 2 else "caf\u00e9") for i, p in enumerate(names)}
    table = tmp_path / "labels.parquet"  # as vggembed writes names: path shown, path_bytes exact
    pq.write_table(pa.table({"path": [display(p) for p in labels], "path_bytes": [os.fsencode(p) for p in labels],
                             "label": list(labels.values())}), table)
    out = tmp_path / "h.npz"
    result = run("train", folder, "--labels", table, "-o", out, "--weights", tiny16, "--folds", 2)
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        assert z["classes"].tolist() == sorted(set(labels.values()))
    # the same labels as CSV, written by the csv module (quotes, newlines, surrogate-escaped bytes)
    csv_table = tmp_path / "labels.csv"
    with open(csv_table, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f).writerows(labels.items())
    again = tmp_path / "h2.npz"
    assert run("train", str(out.with_suffix("")) + ".features.npy", "--labels", csv_table, "-o", again,
               "--folds", 2).exit_code == 0
    with np.load(out) as a, np.load(again) as b:
        np.testing.assert_array_equal(a["coef"], b["coef"])
    rows = read_csv(str(again.with_suffix("")) + ".oof.csv")
    assert {r[0] for r in rows[1:]} == {str(p) for p in names}


# -------------------------------------------------------------- bad input
def test_one_class_is_refused_in_one_line(tmp_path, classes, tiny16):
    result = run("train", classes / "cat", "-o", tmp_path / "h.npz", "--weights", tiny16)
    assert result.exit_code == 1
    assert "only one class ('cat')" in result.stderr and "at least two classes" in result.stderr
    assert not (tmp_path / "h.npz").exists()


@pytest.mark.parametrize("command", ["train", "audit"])
def test_a_mistyped_folder_says_nothing_could_be_read_not_that_classes_are_missing(tmp_path, tiny16, command):
    out = tmp_path / ("h.npz" if command == "train" else "report")
    result = run(command, tmp_path / "photoss", "-o", out, "--weights", tiny16)
    assert result.exit_code == 1
    assert "photoss: no such file" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "no image could be read (1 failed, listed in" in last
    assert last.endswith(f"nothing to {'train on' if command == 'train' else 'audit'}")
    assert "class" not in result.stderr and "holds 0" not in result.stderr
    assert not (tmp_path / "h.npz").exists() and not (out / "index.html").exists()


def test_left_out_rows_are_counted_and_small_classes_get_fewer_folds(tmp_path, feats, photos, tiny16):
    paths = [r[0] for r in read_csv(f"{feats}.index.csv")[1:]]
    table = tmp_path / "labels.csv"
    # the person class keeps 3 images (fewer than 5 folds); 9 person images unlabelled; 2 names not among rows
    person = [p for p in paths if "/person/" in p]
    rows = [(p, Path(p).parent.name) for p in paths if "/person/" not in p] + [(p, "person") for p in person[:3]]
    rows += [("elsewhere/x.jpg", "cat"), ("elsewhere/y.jpg", "coffee")]
    rows[0] = (rows[0][0], f" {rows[0][1]} ")  # spaces around a label are not part of its class
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = run("train", feats, "--labels", table, "-o", tmp_path / "h.npz")
    assert result.exit_code == 0, result.output
    assert "class 'person' has 3 images, fewer than 5 folds: using 3 folds" in result.stderr
    assert "9 images of" in result.stderr and "have no label (not in the label table, or labelled" in result.stderr
    assert "2 labels name paths that are not among" in result.stderr and "elsewhere/x.jpg" in result.stderr
    metrics = json.loads((tmp_path / "h.metrics.json").read_text())
    assert (metrics["folds"], metrics["trained"], metrics["unlabelled"]) == (3, 27, 9)
    assert set(metrics["class_counts"]) == {"cat", "coffee", "person"}
    # a class of one image cannot be evaluated out of fold
    rows.append((person[3], "lonely"))
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = run("train", feats, "--labels", table, "-o", tmp_path / "h2.npz")
    assert result.exit_code == 1 and "class 'lonely' has 1 image" in result.stderr


def test_failed_images_and_non_finite_vectors_are_counted_and_not_trained_on(tmp_path, classes, tiny16):
    folder = tmp_path / "photos"
    shutil.copytree(classes, folder)
    (folder / "cat" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "h.npz"
    result = run("train", folder, "-o", out, "--weights", tiny16)
    assert result.exit_code == 3, result.output  # as embed: the run completed, some images failed
    assert "broken.jpg" in result.stderr
    metrics = json.loads((tmp_path / "h.metrics.json").read_text())
    assert metrics["trained"] == 36
    # a NaN row in an embedding output is left out, and said
    feats = tmp_path / "h.features.npy"
    x = np.load(feats)
    x[0, 3] = np.nan
    np.save(feats, x)
    result = run("train", feats, "-o", tmp_path / "h2.npz")
    assert result.exit_code == 0, result.output
    assert "1 vectors hold NaN or infinite values" in result.stderr
    assert json.loads((tmp_path / "h2.metrics.json").read_text())["trained"] == 35


def test_a_place_the_head_cannot_be_written_or_features_over_the_head_are_refused_before_any_work(
        tmp_path, classes, tiny16):
    (tmp_path / "afile").write_text("a file, not a folder")
    blocked = run("train", classes, "-o", tmp_path / "afile" / "head.npz", "--weights", tiny16)
    assert blocked.exit_code == 1 and "cannot write here" in blocked.stderr
    assert "embedded" not in blocked.stderr and "Traceback" not in blocked.output
    head = tmp_path / "h.npz"
    for features in (head, tmp_path / "h.oof.npz"):
        clash = run("train", classes, "-o", head, "--features", features, "--weights", tiny16)
        assert clash.exit_code == 2 and "the head or a file beside it is written there" in clash.stderr
        assert "embedded" not in clash.stderr and not features.exists()


def test_an_existing_head_needs_overwrite_and_is_left_as_it_was(tmp_path, feats):
    out = tmp_path / "h.npz"
    out.write_bytes(b"mine")
    result = run("train", feats, "-o", out)
    assert result.exit_code == 1 and f"{out}: exists; pass --overwrite" in result.stderr
    assert out.read_bytes() == b"mine"
    assert run("train", feats, "-o", out, "--overwrite").exit_code == 0
    assert np.load(out)["classes"].tolist() == ["cat", "coffee", "person"]


def test_embedding_options_with_an_embedding_output_are_refused_not_ignored(tmp_path, feats, tiny16):
    """feats.npy records how it was embedded: a --weights or --resize beside it would be silently unused."""
    out = tmp_path / "h.npz"
    result = run("train", feats, "-o", out, "--weights", tiny16, "--resize", "center-crop")
    assert result.exit_code == 2 and "--weights, --resize: say how images are embedded, but" in result.stderr
    assert f"{feats} is an embedding output" in result.stderr and not out.exists()


def test_a_file_that_is_not_a_head_is_one_line(tmp_path, image_dir, tiny16):
    fake = tmp_path / "head.npz"
    np.savez(fake, a=np.zeros(3))
    result = run("classify", image_dir, "--head", fake, "--weights", tiny16)
    assert result.exit_code == 1 and f"{fake}: not a vggembed head" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content, what", [
    (b"hello\n", "not a zip archive"), (b"", "an empty file"), ("npy", "a .npy array")])
def test_a_head_that_is_not_an_npz_file_is_one_plain_line(tmp_path, image_dir, tiny16, content, what):
    fake = tmp_path / "head.npz"
    if content == "npy":
        with open(fake, "wb") as f:
            np.save(f, np.arange(3))
    else:
        fake.write_bytes(content)
    result = run("classify", image_dir, "--head", fake, "--weights", tiny16)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"Error: {fake}: not a .npz head file ({what}); make one with "
                                                  "vggembed train"]


def _head_with(head, path, classes):
    """`head` with other classes (coef and intercept cut to fit), written to `path`."""
    with np.load(head) as z:
        arrays = dict(z)
    k = len(classes)
    arrays.update(classes=np.asarray(classes), coef=arrays["coef"][:, :k], intercept=arrays["intercept"][:k])
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("names, problem", [
    (["cat"], "holds 1 class ('cat'); a head ranks at least two"),
    (["cat", "cat", "person"], "classes 0 and 1 are both named 'cat'; each class needs its own name"),
    (["cat", "", "person"], "class 1 has an empty name; every class needs one"),
    (np.array([0, 1, 2]), "class names are int64 values, not text"),
])
def test_a_head_train_would_not_write_is_refused_naming_the_problem(tmp_path, head, image_dir, tiny16, names,
                                                                    problem):
    bad = _head_with(head, tmp_path / "bad.npz", names)
    for command in (["classify", image_dir], ["export", tmp_path / "m", "--format", "saved-model"]):
        result = run(*command, "--head", bad, "--weights", tiny16)
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines() == [f"Error: {bad}: {problem}"]
    assert not (tmp_path / "m").exists()
    with pytest.raises(vggembed.VGGEmbedError, match=f"^{re.escape(f'{bad}: {problem}')}$"):
        vggembed.load_head(bad)


def test_class_names_that_are_not_utf8_are_text_in_every_head(tmp_path, head, classes, tiny16, feats):
    """A name holding bytes that are not UTF-8 (a surrogate escape, as an older head or a {path: label} dict
    carries it) is \\xNN text wherever the head goes: Parquet, JSON, model files, gRPC."""
    from vggembed.net.head import Head

    old = _head_with(head, tmp_path / "old.npz", ["cat", "k\udce4tze", "person"])
    assert np.load(old)["classes"].tolist()[1] == "k\udce4tze"  # as such a file holds it
    assert vggembed.load_head(old).classes == ["cat", "k\\xe4tze", "person"]
    out = tmp_path / "preds.parquet"
    result = run("classify", classes, "--head", old, "--weights", tiny16, "-o", out, "--top", 3)
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    labels = {label for row in pq.read_table(out).column("top_label").to_pylist() for label in row}
    assert labels == {"cat", "k\\xe4tze", "person"}
    # a Head made in Python gets the same text
    made = Head(classes=["a", "k\udce4tze"], coef=np.zeros((2, 2), np.float32), intercept=np.zeros(2, np.float32),
                mean=np.zeros(2, np.float32), scale=np.ones(2, np.float32), C=1.0,
                recipe=vggembed.load_head(old).recipe)
    assert made.classes == ["a", "k\\xe4tze"]
    with pytest.raises(vggembed.VGGEmbedError, match="^head: classes 0 and 1 are both named 'a'"):
        dataclasses.replace(made, classes=["a", "a"])
    # train with such labels in a dict: the classes, the figures and the head alike; two labels shown alike refused
    rows = [r[0] for r in read_csv(f"{feats}.index.csv")[1:]]
    labels = {p: "k\udce4tze" if Path(p).parent.name == "cat" else Path(p).parent.name for p in rows}
    trained = vggembed.train(str(feats), labels=labels, C=1.0, log=lambda line: None)
    assert trained.classes == ["coffee", "k\\xe4tze", "person"]
    assert set(trained.metrics["class_counts"]) == set(trained.classes) == set(trained.evaluation.classes)
    twins = {**labels, rows[0]: "k\\xe4tze"}
    with pytest.raises(vggembed.VGGEmbedError, match=r"would both be the class 'k\\\\xe4tze'"):
        vggembed.train(str(feats), labels=twins, C=1.0, log=lambda line: None)


# --------------------------------------------------- the head where classify goes
def test_a_class_folder_whose_name_is_not_utf8_is_a_class_every_output_can_carry(tmp_path, photos, tiny16):
    utf16 = tmp_path / "labels.txt"  # a spreadsheet's "Unicode text"
    utf16.write_bytes("path,label\na.jpg,cat\n".encode("utf-16"))
    result = subprocess.run(VGGEMBED + ["train", str(feats), "-o", str(tmp_path / "h.npz"), "--labels", str(utf16)],
                            capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: {utf16}: is UTF-16 text; save the label file as UTF-8"]
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "odd"
    for name, photo in ((os.fsdecode(b"k\xe4tze"), photos[0]), ("dog", photos[1])):
        synthetic.photo_crops(photo, root / name, 3, size=(64, 48))
    head = tmp_path / "odd.npz"
    assert run("train", root, "-o", head, "--weights", tiny16, "--C", 1).exit_code == 0
    assert np.load(head)["classes"].tolist() == ["dog", "k\\xe4tze"]
    out = tmp_path / "preds.parquet"
    result = run("classify", root, "--head", head, "--weights", tiny16, "-o", out)
    assert result.exit_code == 0, result.output
    labels = {label for row in pq.read_table(out).column("top_label").to_pylist() for label in row}
    assert labels == {"dog", "k\\xe4tze"}
    shown = json.loads(run("classify", root / "dog", "--head", head, "--weights", tiny16, "--format",
                           "json").stdout)
    assert {p["label"] for p in shown[0]["predictions"]} == {"dog", "k\\xe4tze"}


def test_class_names_with_tabs_commas_and_line_breaks_stay_on_one_line_in_tables(tmp_path, photos, tiny16):
    root = tmp_path / "odd"
    for name, photo in (("a\tb", photos[0]), ("c, d", photos[1]), ("e\nf", photos[2])):
        synthetic.photo_crops(photo, root / name, 3, size=(64, 48))
    head = tmp_path / "odd.npz"
    assert run("train", root, "-o", head, "--weights", tiny16, "--C", 1).exit_code == 0
    info = run("info", head).stdout
    assert "classes       a\\tb, 'c, d', e\\nf\n" in info
    image = next((root / "c, d").iterdir())
    single = run("classify", image, "--head", head, "--weights", tiny16).stdout.splitlines()
    assert len(single) == 3 and {line.split(" (")[0][3:] for line in single} == {"a\\tb", "c, d", "e\\nf"}
    several = run("classify", root / "c, d", "--head", head, "--weights", tiny16).stdout.splitlines()
    assert len(several) == 1 + 3 * 3 and all(line.count("\t") == 4 for line in several)
    labels = run("classify", image, "--head", head, "--weights", tiny16, "--labels", head)
    assert labels.exit_code == 2 and "with --head the head's own classes are ranked" in labels.stderr


def test_a_head_on_l2_normalized_features_classifies_from_the_command_line(tmp_path, classes, tiny16):
    feats = tmp_path / "l2.npy"
    assert run("embed", classes, "-o", feats, "--weights", tiny16, "--l2-normalize").exit_code == 0
    head = tmp_path / "l2.npz"
    assert run("train", feats, "-o", head, "--C", "1").exit_code == 0
    image = classes / "cat" / "img000001.png"
    result = run("classify", image, "--head", head, "--weights", tiny16, "--format", "json")
    assert result.exit_code == 0, result.output
    got = {p["label"]: p["probability"] for p in json.loads(result.stdout)[0]["predictions"]}
    rows = [r[0] for r in read_csv(f"{feats}.index.csv")[1:]]
    loaded = vggembed.load_head(head)
    expected = loaded.predict_proba(np.load(feats))[rows.index(str(image))]
    assert np.allclose([got[c] for c in loaded.classes], expected, atol=1e-5)


def test_classify_head_ranks_the_users_classes_in_every_format(tmp_path, head, classes, tiny16, feats):
    image = classes / "coffee" / "img000003.png"
    table = run("classify", image, "--head", head, "--weights", tiny16)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("1. coffee (")
    # the same probabilities as the head on embed's vectors
    rows = [r[0] for r in read_csv(f"{feats}.index.csv")[1:]]
    loaded = vggembed.load_head(head)
    expected = loaded.predict_proba(np.load(feats))[rows.index(str(image))]
    shown = [float(line.split("(")[1].rstrip(")")) for line in lines]
    assert shown == pytest.approx(sorted(expected, reverse=True), abs=1e-4)

    result = run("classify", classes, "--head", head, "--weights", tiny16, "--format", "json")
    doc = json.loads(result.stdout)
    assert len(doc) == 36 and {p["label"] for p in doc[0]["predictions"]} == {"cat", "coffee", "person"}
    result = run("classify", classes, "--head", head, "--weights", tiny16, "--format", "csv", "--top", 1)
    got = list(csv.reader(result.stdout.splitlines()))
    assert got[0] == ["path", "rank", "index", "label", "probability"] and len(got) == 37
    assert np.mean([r[3] == Path(r[0]).parent.name for r in got[1:]]) > 0.5
    for ext in (".parquet", ".npz", ".csv"):
        out = tmp_path / f"preds{ext}"
        assert run("classify", classes, "--head", head, "--weights", tiny16, "-o", out).exit_code == 0
    with np.load(tmp_path / "preds.npz") as z:
        assert z["top_label"].shape == (36, 3) and set(z["top_label"][:, 0]) <= {"cat", "coffee", "person"}
        np.testing.assert_allclose(z["top_prob"].sum(axis=1), 1, rtol=1e-5)
    meta = json.loads(Path(str(tmp_path / "preds.npz") + ".meta.json").read_text())
    assert meta["recipe"]["head"] == "head.npz" and len(meta["recipe"]["head_md5"]) == 32


def test_features_of_another_recipe_are_refused_naming_both(tmp_path, head, image_dir, tiny16, tiny):
    other = tiny["vgg16", "matconvnet"]  # other weights
    result = run("classify", image_dir, "--head", head, "--weights", other)
    assert result.exit_code == 1
    assert "was trained on features of another recipe" in result.stderr and "weights_md5" in result.stderr
    result = run("classify", image_dir, "--head", head, "--weights", tiny16, "--resize", "center-crop")
    assert result.exit_code == 2
    assert "--resize center-crop" in result.stderr and "resize squash" in result.stderr
    # vectors of another layer through the Python API
    from vggembed.net.head import read_head
    from vggembed.store.recipe import Output

    with pytest.raises(vggembed.VGGEmbedError, match=r"reads fc2 \(relu7\) but pool5s holds pool5_avg"):
        read_head(head).check_output(Output("pool5", "avg"), "pool5s")


def test_a_killed_classify_head_run_resumes_to_the_same_result(tmp_path, classes, head, tiny16):
    paths = sorted(str(p) for p in classes.rglob("*.png"))
    args = ["classify", "--head", str(head), "--weights", str(tiny16), "--batch-size", "2", "--workers", "1"]
    full = tmp_path / "full.npz"
    assert run(*args, *paths, "-o", full).exit_code == 0
    out = tmp_path / "cut.npz"
    proc = subprocess.Popen(VGGEMBED + args + ["-", "-o", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=interruptible)
    proc.stdin.write("".join(p + "\n" for p in paths[:20]).encode())
    proc.stdin.flush()
    index = Path(str(out) + ".index.csv.partial")
    deadline = time.time() + HANG
    while time.time() < deadline and not (index.exists() and index.read_text().count("\n") > 8):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=HANG)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(p + "\n" for p in paths))
    resumed = run(*args, "--files-from", listing, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "already done by the interrupted run" in resumed.stderr
    with np.load(out) as got, np.load(full) as want:
        for name in ("top_index", "top_prob", "top_label"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_export_and_serve_with_the_head_equal_classify_head(tmp_path, head, classes, tiny16):
    images = sorted(classes.rglob("*.png"))[::6]
    preds = tmp_path / "preds.npz"
    assert run("classify", *images, "--head", head, "--weights", tiny16, "-o", preds, "--batch-size", 1).exit_code == 0
    want = np.load(preds)

    saved = tmp_path / "model"
    result = run("export", saved, "--format", "saved-model", "--head", head, "--weights", tiny16)
    assert result.exit_code == 0, result.output
    import tensorflow as tf

    fn = tf.saved_model.load(str(saved / "1")).signatures["pixels"]
    from vggembed.images.decode import prepare

    pixels = np.stack([prepare(str(p), resize_mode="squash", size=(224, 224)) for p in images]).astype(np.float32)
    out = fn(pixels=tf.constant(pixels))
    np.testing.assert_array_equal(out["top_index"].numpy(), want["top_index"])
    np.testing.assert_allclose(out["top_prob"].numpy(), want["top_prob"], atol=1e-5)
    assert out["top_label"].numpy().astype(str).tolist() == want["top_label"].tolist()

    from .test_serve import serve  # a real `vggembed serve` on loopback

    with serve(tiny16, "--head", head, "--fixed-batch", "--batch-size", 1, "--queue-size", 16) as served:
        response = served.predict({"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()}
                                                 for p in images]})
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        # TF Serving's :classify: [label, score] pairs, the head's classes
        examples = {"examples": [{"images": {"b64": base64.b64encode(p.read_bytes()).decode()}} for p in images]}
        classified = requests.post(f"{served.url}/v1/models/vggembed:classify", json=examples, timeout=HANG)
        assert classified.status_code == 200, classified.text
        assert classified.json()["result"] == [[[label, pytest.approx(float(p), abs=1e-6)] for label, p in zip(ls, ps)]
                                               for ls, ps in zip(want["top_label"].tolist(), want["top_prob"])]
    assert [p["top_label"] for p in got] == want["top_label"].tolist()
    np.testing.assert_allclose([p["top_prob"] for p in got], want["top_prob"], atol=1e-6)


# -------------------------------------------------------------- Python API
def test_python_train_returns_a_head_that_predicts_and_classifies(feats, classes, tiny16, tmp_path):
    head = vggembed.train(str(feats))
    assert head.classes == ["cat", "coffee", "person"] and head.metrics["rows"] == 36
    x = np.load(feats)
    assert head.predict(x[:2]) == [head.classes[i] for i in np.argmax(head.predict_proba(x[:2]), axis=1)]
    out = tmp_path / "h.npz"
    with open(out, "wb") as f:
        head.write(f)
    loaded = vggembed.load_head(out, weights=tiny16)
    preds = loaded.classify([str(classes / "cat" / "img000000.png")], top=2)
    assert [p.rank for p in preds[0]] == [1, 2] and preds[0][0].label in head.classes
    # images straight from folders, embedded in memory: the same minimum (to the solver's tolerance)
    direct = vggembed.train(str(classes), weights=str(tiny16), C=head.C)
    assert direct.recipe.weights_md5 == vggembed.load_weights(tiny16)[1].md5
    np.testing.assert_allclose(direct.coef, head.coef, atol=1e-3)
    np.testing.assert_allclose(direct.predict_proba(x), head.predict_proba(x), atol=1e-4)


def test_rows_that_are_not_finite_have_no_class(head, feats):
    loaded = vggembed.load_head(head)
    x = np.load(feats)[:5].copy()
    x[2, 0], x[4, 3] = np.nan, np.inf
    for fn in (loaded.predict, loaded.predict_proba):
        with pytest.raises(vggembed.VGGEmbedError, match=re.escape(
                f"{head}: 2 of 5 rows hold NaN or infinite values (the first is row 2); they have no class")):
            fn(x)
        with pytest.raises(vggembed.VGGEmbedError, match="1 of 1 rows hold NaN"):
            fn(np.full((1, loaded.dim), np.nan))
    assert loaded.predict(x[:2]) == loaded.predict(np.load(feats)[:2])  # finite rows as before


def test_a_fifo_as_head_is_one_line_not_a_hang(tmp_path, image_dir, tiny16):
    fifo = tmp_path / "head.npz"
    os.mkfifo(fifo)
    result = subprocess.run(VGGEMBED + ["classify", str(image_dir), "--head", str(fifo), "--weights", str(tiny16)],
                            capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: {fifo}: is a FIFO (named pipe), not a head file"]


def test_a_binary_file_as_labels_is_named_as_such_and_a_parquet_table_is_read_whatever_its_name(tmp_path, feats,
                                                                                                   head):
    for wrong in (head, Path(str(head).removesuffix(".npz") + ".confusion.png")):  # a zip, an image
        result = subprocess.run(VGGEMBED + ["train", str(feats), "-o", str(tmp_path / "h.npz"), "--labels",
                                            str(wrong)], capture_output=True, text=True, timeout=HANG)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"Error: {wrong}: not a label table (binary data; expected a CSV of path,label or a Parquet table)"]
        assert not (tmp_path / "h.npz").exists()
    utf16 = tmp_path / "labels.txt"  # a spreadsheet's "Unicode text"
    utf16.write_bytes("path,label\na.jpg,cat\n".encode("utf-16"))
    result = subprocess.run(VGGEMBED + ["train", str(feats), "-o", str(tmp_path / "h.npz"), "--labels", str(utf16)],
                            capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: {utf16}: is UTF-16 text; save the label file as UTF-8"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from vggembed.use.train import read_label_table

    named_csv = tmp_path / "labels.csv"
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "label": ["cat", "dog"]}), named_csv)
    assert read_label_table(named_csv) == {"a.jpg": "cat", "b.jpg": "dog"}


@pytest.mark.parametrize("name", ["labels.csv", "labels.parquet"])
def test_a_fifo_as_label_file_is_one_line_not_a_hang(tmp_path, feats, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    for command in (["train", str(feats), "-o", str(tmp_path / "h.npz")],
                    ["audit", str(feats), "-o", str(tmp_path / "a")]):
        result = subprocess.run(VGGEMBED + command + ["--labels", str(fifo)], capture_output=True, text=True,
                                timeout=HANG)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [f"Error: {fifo}: is a FIFO (named pipe), not a label file"]
