"""The command line, in-process (CliRunner) and as real subprocesses in shell pipelines."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vggembed
from vggembed.net import synthetic
from vggembed.cli import main

from .conftest import HANG, interruptible, wait_for

VGGEMBED = [sys.executable, "-m", "vggembed"]


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    return result


def read_index(out: Path):
    with open(str(out) + ".index.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_help_is_fast_and_does_not_import_tensorflow():
    code = ("import sys; from click.testing import CliRunner; from vggembed.cli import main; "
            "r = CliRunner().invoke(main, ['embed', '--help']); assert r.exit_code == 0, r.output; "
            "assert 'tensorflow' not in sys.modules; print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "vggembed embed images/ -o feats.npy" in out
    assert run("-h").exit_code == 0 and "Exit codes" in run("--help").output


def test_embed_folder_npy_matches_api_with_row_index(tmp_path, image_dir, tiny16, tiny_model):
    out = tmp_path / "feats.npy"
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    feats = np.load(out)
    rows = read_index(out)
    paths = [r["path"] for r in rows]
    # sorted by relative path: files first by name, then the subfolder's
    assert [Path(p).name for p in paths] == ["astronaut.png", "chelsea.png", "coffee.png", "grace_hopper.jpg"]
    assert [int(r["row"]) for r in rows] == [0, 1, 2, 3]
    np.testing.assert_array_equal(feats, tiny_model.embed(paths, batch_size=2))
    assert feats.dtype == np.float32 and feats.shape == (4, 32)
    assert list(csv.reader(open(str(out) + ".errors.csv"))) == [["path", "error"]]
    assert not list(tmp_path.glob("*.partial"))
    assert "embedded 4 of 4 images" in result.stderr


def test_csv_and_parquet_hold_the_same_vectors(tmp_path, image_dir, tiny16):
    import pyarrow.parquet as pq

    run("embed", image_dir, "-o", tmp_path / "a.npy", "--weights", tiny16)
    ref = np.load(tmp_path / "a.npy")
    assert run("embed", image_dir, "-o", tmp_path / "a.csv", "--weights", tiny16).exit_code == 0
    with open(tmp_path / "a.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["path", "fc2_0", "fc2_1"] and len(rows) == 5
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], dtype=np.float32), ref)
    assert run("embed", image_dir, "-o", tmp_path / "a.parquet", "--weights", tiny16).exit_code == 0
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.column_names == ["path", "path_bytes", "fc2"]  # path_bytes: see writer.path_columns
    np.testing.assert_array_equal(np.array(table["fc2"].to_pylist(), dtype=np.float32), ref)
    assert table["path"].to_pylist() == [r[0] for r in rows[1:]]


def test_dtype_l2_and_conv_layer_options(tmp_path, image_dir, tiny16, tiny_model):
    out = tmp_path / "f.npy"
    assert run("embed", image_dir, "-o", out, "--weights", tiny16, "--layer", "conv5_3", "--pool", "max",
               "--dtype", "float16", "--l2-normalize").exit_code == 0
    feats = np.load(out)
    assert feats.dtype == np.float16 and feats.shape == (4, 16)
    paths = [r["path"] for r in read_index(out)]
    ref = tiny_model.embed(paths, "conv5_3", pool="max", l2_normalize=True, batch_size=16)
    np.testing.assert_allclose(feats.astype(np.float32), ref, rtol=2e-3, atol=1e-3)
    result = run("embed", image_dir, "-o", tmp_path / "g.npy", "--weights", tiny16, "--layer", "pool5")
    assert result.exit_code == 2 and "pool5 gives a 3-D map per image; name a pool, as in pool5:avg" in result.stderr


def make_bad_images(folder: Path, photos) -> list[str]:
    """Every kind of bad image, mixed among good ones; returns the bad names."""
    folder.mkdir(exist_ok=True)
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "c_text.png").write_text("not an image\n")
    data = photos[3].read_bytes()
    (folder / "d_truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.new("1", (12000, 12000)).save(folder / "e_bomb.png")
    os.symlink(folder / "nowhere.jpg", folder / "f_dangling.jpg")
    (folder / "g_folder.jpg").mkdir()  # a folder that looks like an image: walked into, holds nothing
    return ["b_empty.jpg", "c_text.png", "d_truncated.jpg", "e_bomb.png", "f_dangling.jpg"]


def test_bad_images_never_stop_the_run_or_shift_rows(tmp_path, photos, tiny16):
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    for i, p in enumerate(photos):
        shutil.copy(p, good_dir / f"{'aceg'[i]}_{p.name}")
    mixed = tmp_path / "mixed"
    shutil.copytree(good_dir, mixed)
    bad = make_bad_images(mixed, photos)
    # odd-mode images that must work, and so belong to both folders
    for folder in (good_dir, mixed):
        Image.open(photos[0]).convert("CMYK").save(folder / "h_cmyk.jpg")
        Image.open(photos[1]).convert("P").save(folder / "i_palette.png")
        Image.open(photos[2]).convert("LA").save(folder / "j_la.png")

    result = run("embed", mixed, "-o", tmp_path / "mixed.npy", "--weights", tiny16, "--batch-size", 2)
    assert result.exit_code == 3, result.output
    clean = run("embed", good_dir, "-o", tmp_path / "good.npy", "--weights", tiny16, "--batch-size", 2)
    assert clean.exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "mixed.npy"), np.load(tmp_path / "good.npy"))

    rows = read_index(tmp_path / "mixed.npy")
    assert sorted(Path(r["path"]).name for r in rows if not r["row"]) == sorted(bad)
    good_rows = [r for r in rows if r["row"]]
    assert [int(r["row"]) for r in good_rows] == list(range(7))
    assert [Path(r["path"]).name for r in good_rows] == [Path(r["path"]).name for r in read_index(tmp_path / "good.npy")]
    with open(str(tmp_path / "mixed.npy") + ".errors.csv", newline="") as f:
        errors = {Path(r["path"]).name: r["error"] for r in csv.DictReader(f)}
    assert errors["b_empty.jpg"] == "empty file (0 bytes)"
    assert "truncated" in errors["d_truncated.jpg"]
    assert "pixels, over the limit" in errors["e_bomb.png"] or "bomb" in errors["e_bomb.png"]
    assert errors["f_dangling.jpg"] == "no such file"
    for name in bad:  # one line on stderr per bad image, naming it
        assert sum(name in line for line in result.stderr.splitlines()) == 1
    assert "embedded 7 of 12 images" in result.stderr and "5 failed" in result.stderr


def test_strict_stops_at_first_bad_image(tmp_path, photos, tiny16):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(photos[0], folder / "a.png")
    (folder / "b.png").write_bytes(b"")
    result = run("embed", folder, "-o", tmp_path / "x.npy", "--weights", tiny16, "--strict")
    assert result.exit_code == 1
    assert "b.png: empty file (0 bytes) (--strict)" in result.stderr
    assert not (tmp_path / "x.npy").exists()


def test_existing_output_needs_overwrite(tmp_path, image_dir, tiny16):
    out = tmp_path / "f.npy"
    assert run("embed", image_dir, "-o", out, "--weights", tiny16).exit_code == 0
    result = run("embed", image_dir, "-o", out, "--weights", tiny16)
    assert result.exit_code == 1 and "f.npy: exists; pass --overwrite" in result.stderr
    assert run("embed", image_dir, "-o", out, "--weights", tiny16, "--overwrite").exit_code == 0


def test_unknown_output_format(tmp_path, image_dir, tiny16):
    result = run("embed", image_dir, "-o", tmp_path / "f.txt", "--weights", tiny16)
    assert result.exit_code == 1 and "unknown output format '.txt'" in result.stderr


def test_missing_weights_names_the_fetch_command(tmp_path, image_dir, monkeypatch):
    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VGGEMBED_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    result = run("embed", image_dir, "-o", tmp_path / "f.npy")
    assert result.exit_code == 1
    assert "run: vggembed weights fetch vgg16" in result.stderr
    result = run("classify", image_dir, "--model", "vgg19")
    assert "run: vggembed weights fetch vgg19" in result.stderr


def test_weights_found_in_local_weights_folder(tmp_path, image_dir, tiny16, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VGGEMBED_WEIGHTS", raising=False)
    (tmp_path / "weights").mkdir()
    shutil.copy(tiny16, tmp_path / "weights" / "vgg16_weights.npz")
    assert run("embed", image_dir, "-o", "f.npy").exit_code == 0


# ----------------------------------------------------------------- classify
def test_classify_one_image_prints_the_seed_form(tiny, photos):
    result = run("classify", photos[0], "--weights", tiny["vgg19", "matconvnet"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    m = vggembed.load(tiny["vgg19", "matconvnet"])
    preds = m.classify([photos[0]], batch_size=16)[0]
    assert lines == [f"{p.rank}. {p.label} ({p.probability:.4f})" for p in preds]
    assert "classified 1 of 1" in result.stderr  # stdout carries data only


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "table"])
def test_classify_many_formats(tmp_path, image_dir, tiny, fmt):
    weights = tiny["vgg16", "matconvnet"]
    out = tmp_path / f"preds.{fmt}"
    result = run("classify", image_dir, "--weights", weights, "--top", 3, "--format", fmt, "-o", out)
    assert result.exit_code == 0 and result.stdout == ""
    text = out.read_text()
    if fmt == "csv":
        rows = list(csv.DictReader(text.splitlines()))
        assert len(rows) == 12 and list(rows[0]) == ["path", "rank", "index", "label", "probability"]
        assert [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
        assert rows[0]["label"] == f"label {rows[0]['index']}"
    elif fmt == "json":
        data = json.loads(text)
        assert len(data) == 4 and len(data[0]["predictions"]) == 3
    elif fmt == "jsonl":
        assert [len(json.loads(line)["predictions"]) for line in text.splitlines()] == [3] * 4
    else:
        assert text.splitlines()[0].split("\t") == ["path", "rank", "index", "label", "probability"]
        assert len(text.splitlines()) == 13


def test_classify_without_labels_says_so(tiny16, photos):
    result = run("classify", photos[0], "--weights", tiny16)
    assert result.exit_code == 0 and result.stdout.startswith("1. class ")
    assert "no labels" in result.stderr


def test_info(tiny):
    result = run("info", tiny["vgg19", "matconvnet-beta16"])
    assert result.exit_code == 0
    out = result.stdout
    assert "mat (matconvnet-beta16)" in out and "vgg19" in out and "10 from the .mat file" in out
    assert "relu7 (= fc2)" in out and "(not a known published file)" in out
    assert "conv5_4          (14, 14, 16)" in out
    bad = run("info", "/nonexistent.npz")
    assert bad.exit_code == 1 and "/nonexistent.npz: no such file" in bad.stderr


# ------------------------------------------------- real processes, pipelines
def test_stdin_pipeline_with_find(tmp_path, image_dir, tiny16, tiny_model):
    out = tmp_path / "x.npy"
    cmd = (f"find {image_dir} -name '*.png' | sort | {sys.executable} -m vggembed embed - -o {out} "
           f"--weights {tiny16} --batch-size 16")
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    paths = [r["path"] for r in read_index(out)]
    assert paths == sorted(str(p) for p in image_dir.rglob("*.png"))
    np.testing.assert_array_equal(np.load(out), tiny_model.embed(paths, batch_size=16))
    assert "oneDNN" not in proc.stderr and "cuda" not in proc.stderr.lower()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory, photos):
    """300 small real-photo crops, enough for a run to be stopped part way."""
    folder = tmp_path_factory.mktemp("many")
    synthetic.photo_crops(photos[2], folder, 300)
    return folder


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, many_images, tiny16, sig):
    listing = tmp_path / "list.txt"
    paths = [str(p) for p in sorted(many_images.iterdir())]
    listing.write_text("\n".join(paths) + "\n")
    full = tmp_path / "full.npy"
    args = ["embed", "--weights", str(tiny16), "--batch-size", "4", "--workers", "1"]
    subprocess.run(VGGEMBED + args + ["--files-from", str(listing), "-o", str(full)], check=True, capture_output=True)

    # The run reads its paths from a pipe that stays open after the first
    # half, so it is certainly mid-way, with rows written, when stopped.
    out = tmp_path / "cut.npy"
    proc = subprocess.Popen(VGGEMBED + args + ["-", "-o", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=interruptible)
    proc.stdin.write("".join(p + "\n" for p in paths[:150]).encode())
    proc.stdin.flush()
    index = Path(str(out) + ".index.csv.partial")
    wait_for(lambda: index.exists() and index.read_text().count("\n") > 40, "40 rows staged")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), err
    assert not out.exists(), "an interrupted run must not leave a file that looks complete"
    if sig == signal.SIGINT:
        assert b"--resume" in err
    args += ["--files-from", str(listing)]

    refused = subprocess.run(VGGEMBED + args + ["-o", str(out)], capture_output=True, text=True)
    assert refused.returncode == 1 and "pass --resume" in refused.stderr

    resumed = subprocess.run(VGGEMBED + args + ["-o", str(out), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done by the interrupted run" in resumed.stderr
    np.testing.assert_array_equal(np.load(out), np.load(full))
    assert read_index(out) == read_index(full)
    assert not list(tmp_path.glob("*.partial"))


def test_resume_never_keeps_index_lines_whose_rows_are_missing(tmp_path, image_dir, tiny16):
    """A staged file cut shorter than its index (disk full, a copy) loses rows, never shifts them."""
    full = tmp_path / "full.npy"
    assert run("embed", image_dir, "-o", full, "--weights", tiny16, "--batch-size", 1).exit_code == 0
    out = tmp_path / "cut.npy"
    index = read_index(full)
    # fake an interrupted run: index says 3 rows done, the data holds only 1
    with open(str(out) + ".index.csv.partial", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "row", "error"])
        w.writerows([r["path"], r["row"], ""] for r in index[:3])
    from vggembed.store.writer import npy_header

    data = np.load(full)
    # What the single-output version staged (OUT.partial) is refused with what to do ...
    old = Path(str(out) + ".partial")
    old.write_bytes(npy_header(0, data.shape[1], np.float32) + data[:1].tobytes())
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--batch-size", 1, "--resume")
    assert result.exit_code == 1 and result.stderr == (
        f"Error: {old}: an interrupted run of an older vggembed left this, which --resume cannot continue; "
        "pass --overwrite to start over\n")
    # ... and this version's staged file (OUT.NAME.partial), cut short, loses rows but never shifts them.
    old.rename(str(out) + ".fc2.partial")
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--batch-size", 1, "--resume")
    assert result.exit_code == 0, result.output
    assert "1 already done" in result.stderr
    np.testing.assert_array_equal(np.load(out), data)
    assert read_index(out) == index


def test_native_size_needs_a_conv_layer(tmp_path, image_dir, tiny16, tiny_model):
    bad = run("embed", image_dir, "-o", tmp_path / "f.npy", "--weights", tiny16, "--resize", "none")
    assert bad.exit_code == 1 and "layer fc2 needs the 224x224 input" in bad.stderr
    assert not list(tmp_path.glob("f.npy*"))
    out = tmp_path / "g.npy"
    ok = run("embed", image_dir, "-o", out, "--weights", tiny16, "--resize", "none", "--layer", "relu5_3",
             "--pool", "avg")
    assert ok.exit_code == 0, ok.output
    paths = [r["path"] for r in read_index(out)]
    ref = np.concatenate([tiny_model.embed([p], "relu5_3", pool="avg", resize="none") for p in paths])
    np.testing.assert_array_equal(np.load(out), ref)


def test_an_unexpected_decoder_exception_is_one_failed_row(tmp_path, image_dir, tiny16, monkeypatch):
    from vggembed.images import decode as images

    real = images.load_rgb

    def flaky(source, **kw):
        if str(source).endswith("coffee.png"):
            raise TypeError("decoder bug")
        return real(source, **kw)

    monkeypatch.setattr(images, "load_rgb", flaky)
    result = run("embed", image_dir, "-o", tmp_path / "f.npy", "--weights", tiny16)
    assert result.exit_code == 3
    errors = {Path(r["path"]).name: r["error"] for r in read_index(tmp_path / "f.npy") if r["error"]}
    assert errors == {"coffee.png": "TypeError: decoder bug"}
    assert np.load(tmp_path / "f.npy").shape == (3, 32)
