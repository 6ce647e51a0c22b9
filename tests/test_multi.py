"""Several layers and the top-K predictions from one pass: every format, resume, classify -o, search --layer,
the Python API, and the retrieval pools (GeM, R-MAC) against plain numpy references of the published formulas."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vggembed
from vggembed.cli import main
from vggembed.net import synthetic

from .conftest import interruptible

VGGEMBED = [sys.executable, "-m", "vggembed"]
LAYERS = ["--layer", "fc2", "--layer", "pool5:avg,conv5_3:gem", "--top", "3"]
NAMES = ["fc2", "pool5_avg", "conv5_3_gem"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture
def mixed_dir(image_dir):
    """The photos and one file that is not an image: a failed row among good ones."""
    (image_dir / "broken.jpg").write_text("not an image")
    return image_dir


def single_runs(tmp_path, folder, weights, batch=4):
    """Each layer embedded alone (.npy), and the classify report (csv), with the same batch size."""
    alone = {}
    for layer, name in zip(["fc2", "pool5:avg", "conv5_3:gem"], NAMES):
        out = tmp_path / f"alone-{name}.npy"
        assert run("embed", folder, "-o", out, "--weights", weights, "--layer", layer, "--batch-size", batch,
                   "-q").exit_code in (0, 3)
        alone[name] = np.load(out)
    report = tmp_path / "report.csv"
    assert run("classify", folder, "--weights", weights, "--top", 3, "--format", "csv", "-o", report,
               "--batch-size", batch, "-q").exit_code in (0, 3)
    rows = read_csv(report)[1:]
    alone["top_index"] = np.array([int(r[2]) for r in rows]).reshape(-1, 3)
    alone["top_label"] = np.array([r[3] for r in rows]).reshape(-1, 3)
    alone["top_prob"] = np.array([float(r[4]) for r in rows]).reshape(-1, 3)
    alone["index"] = read_csv(tmp_path / "alone-fc2.npy.index.csv")
    return alone


def read_any(out: Path) -> dict:
    """{name: array} from a .npz, .parquet or .csv written by embed, read without vggembed."""
    if out.suffix == ".npz":
        with np.load(out) as z:
            return {k: z[k] for k in z.files}
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        return {c: np.array(table[c].to_pylist()) for c in table.column_names if c not in ("path", "path_bytes")}
    from pyarrow import csv as pacsv

    table = pacsv.read_csv(out)  # a plain CSV reader: one header row, a value per column
    got = {}
    for name in NAMES:
        columns = [c for c in table.column_names if c.startswith(f"{name}_") and c[len(name) + 1:].isdigit()]
        if columns:
            assert columns == [f"{name}_{i}" for i in range(len(columns))]
            got[name] = np.stack([table[c].to_numpy() for c in columns], axis=1).astype(np.float32)
    for name in ("top_index", "top_prob", "top_label"):
        got[name] = np.stack([np.array(table[f"{name}_{r}"].to_pylist()) for r in (1, 2, 3)], axis=1)
    return got


def assert_equals_alone(got: dict, alone: dict):
    for name in NAMES:
        np.testing.assert_array_equal(got[name], alone[name], err_msg=name)  # bit for bit
    np.testing.assert_array_equal(got["top_index"], alone["top_index"])
    np.testing.assert_array_equal(got["top_label"].astype(str), alone["top_label"])
    # classify prints 4 decimals; the written probabilities are the float32 values themselves
    np.testing.assert_allclose(got["top_prob"].astype(np.float32), alone["top_prob"], atol=5e-5)


# ------------------------------------------------------------- usage errors
@pytest.mark.parametrize("args, message", [
    (["--layer", "fc9"], "--layer fc9: no such layer"),
    (["--layer", "fc2:avg"], "--layer fc2:avg: fc2 is a vector already; pools are for conv/pool layers"),
    (["--layer", "pool5:median"], "--layer pool5:median: unknown pool 'median'"),
    (["--layer", "pool5"], "--layer pool5: pool5 gives a 3-D map per image; name a pool"),
    (["--top", "1001"], "--top 1001: at most 1000 (the ImageNet classes)"),
    (["--layer", "fc2", "--layer", "fc7"], "--layer fc7: the same output as fc2; name each output once"),
    (["--layer", "fc2,pool5:avg"], "this run makes 2 (fc2, pool5_avg); write .npz or .parquet"),
    (["--top", "5"], "this run makes 4 (fc2, top_index, top_prob, top_label); write .npz or .parquet"),
])
def test_bad_outputs_are_usage_errors_before_any_weights_load(tmp_path, image_dir, args, message):
    # A weight file that does not exist: reaching it would be exit 1 "no such file".
    result = run("embed", image_dir, "-o", tmp_path / "f.npy", "--weights", tmp_path / "none.npz", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith("Error: ") and message in result.stderr.splitlines()[-1]
    assert not list(tmp_path.glob("f.npy*"))


def test_classify_top_above_1000_is_a_usage_error(tmp_path, image_dir):
    result = run("classify", image_dir, "--weights", tmp_path / "none.npz", "--top", 1001)
    assert result.exit_code == 2 and "--top 1001: at most 1000 (the ImageNet classes)" in result.stderr


# ------------------------------------------------------------ one pass, every format
@pytest.mark.parametrize("ext", [".npz", ".parquet", ".csv"])
def test_each_output_equals_the_layer_alone_in_every_format(tmp_path, mixed_dir, tiny16, ext):
    alone = single_runs(tmp_path, mixed_dir, tiny16)
    out = tmp_path / f"multi{ext}"
    result = run("embed", mixed_dir, "-o", out, "--weights", tiny16, *LAYERS, "--batch-size", 4)
    assert result.exit_code == 3, result.output  # the broken file: a failed row, the run goes on
    assert "wrote" in result.stderr and "fc2 32, pool5_avg 16, conv5_3_gem 16, top 3" in result.stderr
    assert_equals_alone(read_any(out), alone)
    assert read_csv(f"{out}.index.csv") == alone["index"]
    assert read_csv(f"{out}.errors.csv")[1][0].endswith("broken.jpg")
    if ext == ".npz":
        with zipfile.ZipFile(out) as z:
            assert sorted(z.namelist()) == sorted(f"{n}.npy" for n in NAMES + ["top_index", "top_prob",
                                                                                "top_label"])
    if ext == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(out)
        assert schema.names == ["path", "path_bytes", *NAMES, "top_index", "top_prob", "top_label"]
        assert schema.field("top_label").type.list_size == 3 and str(schema.field("top_label").type.value_type) \
            == "string"
    assert not list(tmp_path.glob("*.partial"))


def test_pool5_flatten_beside_fc2(tmp_path, image_dir, tiny16):
    out = tmp_path / "f.npz"
    assert run("embed", image_dir, "-o", out, "--weights", tiny16, "--layer", "fc2,pool5:flatten").exit_code == 0
    ref = vggembed.load(tiny16).embed(sorted(str(p) for p in image_dir.rglob("*.*")), "pool5", pool="flatten",
                                      batch_size=16)
    with np.load(out) as z:
        assert z["pool5_flatten"].shape == (4, 7 * 7 * 16) and z["fc2"].shape == (4, 32)
        paths = [r[0] for r in read_csv(f"{out}.index.csv")[1:]]
        assert paths == sorted(paths)
        np.testing.assert_array_equal(z["pool5_flatten"], ref)


def test_resume_of_another_set_of_outputs_is_refused(tmp_path, image_dir, tiny16):
    from vggembed.store.recipe import Recipe
    from vggembed.store.writer import EmbeddingWriter

    out = tmp_path / "f.npz"
    writer = EmbeddingWriter(out)
    writer.begin(Recipe(weights=str(tiny16)).bind(vggembed.load_weights(tiny16)[1]))
    writer.close()
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--layer", "fc2", "--top", 5, "--resume")
    assert result.exit_code == 1 and "the interrupted run was made with another recipe (top: 5 vs 0)" in result.stderr


@pytest.fixture(scope="module")
def many_images(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("many")
    synthetic.photo_crops(photos[2], folder, 160)
    return folder


def test_a_killed_multi_output_run_resumes_to_the_same_result(tmp_path, many_images, tiny16):
    paths = [str(p) for p in sorted(many_images.iterdir())]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    args = ["embed", "--weights", str(tiny16), "--batch-size", "4", "--workers", "1", *LAYERS]
    full = tmp_path / "full.npz"
    subprocess.run(VGGEMBED + args + ["--files-from", str(listing), "-o", str(full)], check=True,
                   capture_output=True)
    # Paths come from a pipe that stays open after the first half, so the run is mid-way when killed.
    out = tmp_path / "cut.npz"
    proc = subprocess.Popen(VGGEMBED + args + ["-", "-o", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=interruptible)
    proc.stdin.write("".join(p + "\n" for p in paths[:80]).encode())
    proc.stdin.flush()
    index = Path(str(out) + ".index.csv.partial")
    deadline = time.time() + 120
    while time.time() < deadline and not (index.exists() and index.read_text().count("\n") > 30):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists() and Path(str(out) + ".top_index.partial").exists()
    resumed = subprocess.run(VGGEMBED + args + ["--files-from", str(listing), "-o", str(out), "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done by the interrupted run" in resumed.stderr
    with np.load(out) as got, np.load(full) as want:
        assert got.files == want.files
        for name in want.files:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert read_csv(f"{out}.index.csv") == read_csv(f"{full}.index.csv")
    assert not list(tmp_path.glob("*.partial"))


# ------------------------------------------------------------------ classify -o
@pytest.mark.parametrize("ext", [".parquet", ".npz", ".csv"])
def test_classify_writes_the_predictions_embed_top_writes(tmp_path, mixed_dir, tiny16, ext):
    out = tmp_path / f"preds{ext}"
    result = run("classify", mixed_dir, "-o", out, "--weights", tiny16, "--top", 3, "--batch-size", 4)
    assert result.exit_code == 3, result.output
    assert "classified 4 of 5 images" in result.stderr and f"wrote {out} (4 rows: top 3)" in result.stderr
    alone = single_runs(tmp_path, mixed_dir, tiny16)
    got = read_any(out)
    for name in ("top_index", "top_label"):
        np.testing.assert_array_equal(got[name].astype(alone[name].dtype), alone[name])
    np.testing.assert_allclose(got["top_prob"].astype(np.float32), alone["top_prob"], atol=5e-5)
    again = run("classify", mixed_dir, "-o", out, "--weights", tiny16, "--top", 3, "--resume")
    assert again.exit_code == 0 and "already complete" in again.stderr


def test_classify_one_image_still_prints_the_table(tmp_path, photos, tiny):
    weights = tiny["vgg16", "matconvnet"]
    table = run("classify", photos[0], "--weights", weights)
    assert table.exit_code == 0 and table.stdout.splitlines()[0].startswith("1. label ")
    out = tmp_path / "p.npz"
    assert run("classify", photos[0], "--weights", weights, "-o", out).exit_code == 0
    with np.load(out) as z:
        assert [f"{r}. {lab} ({p:.4f})" for r, (lab, p) in enumerate(zip(z["top_label"][0], z["top_prob"][0]), 1)] \
            == table.stdout.splitlines()


def test_classify_resume_without_a_file_output_is_a_usage_error(tmp_path, image_dir, tiny16):
    result = run("classify", image_dir, "--weights", tiny16, "--resume")
    assert result.exit_code == 2 and "--resume and --overwrite are for -o OUT.parquet" in result.stderr


# ---------------------------------------------------------- search --layer, the API
def test_search_dedup_cluster_pick_a_layer(tmp_path, image_dir, tiny16):
    multi = tmp_path / "m.parquet"
    assert run("embed", image_dir, "-o", multi, "--weights", tiny16, "--layer", "fc2,pool5:avg", "--top", 2
               ).exit_code == 0
    alone = tmp_path / "p.npy"
    assert run("embed", image_dir, "-o", alone, "--weights", tiny16, "--layer", "pool5:avg").exit_code == 0
    photo = sorted(image_dir.glob("*.png"))[0]
    for args in (["search", "{}", photo, "-k", 3, "--weights", tiny16], ["dedup", "{}", "--threshold", 0.5],
                 ["cluster", "{}", "-k", 2]):
        want = run(*[alone if a == "{}" else a for a in args])
        got = run(*[multi if a == "{}" else a for a in args], "--layer", "pool5_avg")
        assert got.exit_code == want.exit_code == 0, got.output
        assert got.stdout == want.stdout
    first = run("search", multi, "--rows", 0, "-k", 2)
    named = run("search", multi, "--rows", 0, "-k", 2, "--layer", "fc2")
    assert first.stdout == named.stdout  # the default is the first output
    bad = run("search", multi, "--rows", 0, "--layer", "pool5")
    assert bad.exit_code == 1
    assert bad.stderr == f"Error: {multi}: has no vectors named 'pool5'; it holds fc2, pool5_avg\n"
    preds = tmp_path / "preds.npz"
    assert run("classify", image_dir, "-o", preds, "--weights", tiny16).exit_code == 0
    only = run("dedup", preds)
    assert only.exit_code == 1 and "holds predictions only (top 5), no vectors" in only.stderr


def test_an_old_single_layer_parquet_still_reads(tmp_path):
    """What the single-layer version wrote: one `embedding` column, the recipe with `layer` and `pool`."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vggembed.store.vectors import open_vectors

    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    recipe = {"vggembed_version": "0.1.0", "weights": "vgg16_weights.npz", "weights_md5": "0" * 32,
              "arch": "vgg16", "layer": "pool5", "pool": "avg", "resize": "squash", "precision": "float32",
              "dtype": "float32", "l2_normalize": False, "fast_decode": False, "legacy_transpose": False,
              "calibration": None}
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)
    table = pa.table({"path": ["a", "b", "c"], "path_bytes": pa.array([None] * 3, pa.binary()), "embedding": column})
    out = tmp_path / "old.parquet"
    pq.write_table(table.replace_schema_metadata({b"vggembed": json.dumps({"recipe": recipe, "rows": 3})}), out)
    with open_vectors(out) as v:
        assert v.name == "pool5_avg" and v.paths == ["a", "b", "c"]
        np.testing.assert_array_equal(v.read(0, 3), vectors)
    with open_vectors(out, layer="pool5_avg") as v:
        assert v.recipe.outputs[0].layer == "pool5"
    assert run("dedup", out, "--threshold", 0.99).exit_code == 0


def test_extract_equals_the_command(tmp_path, mixed_dir, tiny16):
    out = tmp_path / "m.npz"
    run("embed", mixed_dir, "-o", out, "--weights", tiny16, *LAYERS, "--batch-size", 4)
    got = vggembed.extract(mixed_dir, ["fc2", "pool5:avg,conv5_3:gem"], top=3, weights=tiny16, batch_size=4)
    with np.load(out) as z:
        assert sorted(got.arrays) == sorted(z.files)
        for name in z.files:
            np.testing.assert_array_equal(got[name], z[name], err_msg=name)
    index = read_csv(f"{out}.index.csv")[1:]
    assert got.paths == [r[0] for r in index if r[1]]
    assert [p for p, _ in got.errors] == [r[0] for r in index if not r[1]]
    with pytest.raises(vggembed.LayerError, match="fc2 is a vector already"):
        vggembed.extract(mixed_dir, "fc2:max", weights=tiny16)


# ------------------------------------------------------------ GeM and R-MAC
def gem_reference(x, p=3.0, eps=1e-6):
    """Radenović et al., eq. (1): f_k = (1/|X_k| sum_{x in X_k} x^p)^(1/p), on the map clamped at eps."""
    n, h, w, c = x.shape
    out = np.zeros((n, c))
    for i in range(n):
        for k in range(c):
            values = [max(float(x[i, a, b, k]), eps) for a in range(h) for b in range(w)]
            out[i, k] = (sum(v ** p for v in values) / len(values)) ** (1 / p)
    return out


def rmac_regions_reference(H, W, L=3):
    """Tolias et al.'s region sampling, transcribed from their MATLAB `rmac_regions` (1-based there)."""
    ovr = 0.4
    steps = [2, 3, 4, 5, 6, 7]
    w = min(W, H)
    b = [(max(H, W) - w) / (s - 1) for s in steps]
    costs = [abs((w ** 2 - w * bi) / w ** 2 - ovr) for bi in b]
    idx = costs.index(min(costs)) + 1  # MATLAB's index of the minimum
    Wd = idx if H < W else 0
    Hd = idx if H > W else 0
    regions = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        bw = (W - wl) / (l + Wd - 1) if l + Wd - 1 else 0
        cenW = [math.floor(wl2 + i * bw) - wl2 for i in range(l + Wd)]
        bh = (H - wl) / (l + Hd - 1) if l + Hd - 1 else 0
        cenH = [math.floor(wl2 + i * bh) - wl2 for i in range(l + Hd)]
        for i_ in cenH:
            for j_ in cenW:
                if wl:
                    regions.append((i_, j_, wl))
    return regions


def rmac_reference(x):
    """Sum over regions of the L2-normalized per-region channel maxima, then L2-normalized (no whitening)."""
    n, h, w, c = x.shape
    out = np.zeros((n, c))
    for i in range(n):
        total = np.zeros(c)
        for top, left, side in rmac_regions_reference(h, w):
            v = np.array([max(float(x[i, a, b, k]) for a in range(top, top + side) for b in range(left, left + side))
                          for k in range(c)])
            total += v / (np.sqrt((v ** 2).sum()) + 1e-6)
        out[i] = total / (np.sqrt((total ** 2).sum()) + 1e-6)
    return out


@pytest.mark.parametrize("shape", [(2, 7, 7, 5), (1, 9, 14, 3), (1, 16, 6, 4), (1, 1, 1, 2)])
def test_gem_and_rmac_match_the_published_formulas(shape):
    from vggembed.net import pooling
    from vggembed.net.model import _pooled

    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3
    np.testing.assert_allclose(np.asarray(_pooled(x, "gem")), gem_reference(x), rtol=1e-5, atol=1e-6)
    relu = np.maximum(x, 0)
    np.testing.assert_allclose(pooling.rmac(relu), rmac_reference(relu), rtol=1e-5, atol=1e-6)
    assert [tuple(r) for r in pooling.rmac_regions(*shape[1:3])] == rmac_regions_reference(*shape[1:3])


def test_rmac_regions_at_vgg_map_sizes():
    from vggembed.net import pooling

    # 224x224 input: pool5 is 7x7: 1 + 4 + 9 regions of sides 7, 4, 3
    assert [r[2] for r in pooling.rmac_regions(7, 7)] == [7] + [4] * 4 + [3] * 9
    # a wide map gets extra regions along its long side, covering it to the edge
    regions = pooling.rmac_regions(14, 20)
    assert max(left + side for _, left, side in regions) == 20 and len(regions) > 14


def test_gem_and_rmac_of_a_layer_equal_the_formulas_on_its_map(tiny_model, photos):
    batch = tiny_model._stack(photos[:2], "squash")
    got = tiny_model.run_outputs(batch, (("relu5_3", "gem"), ("relu5_3", "rmac"), ("relu5_3", None)))
    maps = got["relu5_3", None]
    np.testing.assert_allclose(got["relu5_3", "gem"], gem_reference(maps), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["relu5_3", "rmac"], rmac_reference(maps), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the page
def test_the_pages_commands_work(tmp_path, photos, tiny, monkeypatch):
    """Every `vggembed` line of docs/multi-output.md's sh blocks, in order, in a folder with photos/ and
    laska.png (the Ray lines are run by tests/test_ray.py's own test)."""
    import re
    import shlex
    import shutil

    page = (Path(__file__).resolve().parents[1] / "docs" / "multi-output.md").read_text()
    lines = [line for block in re.findall(r"```sh\n(.*?)```", page, flags=re.S) for line in block.splitlines()
             if line.startswith("vggembed ")]
    assert len(lines) >= 12
    (tmp_path / "photos").mkdir()
    for p in photos[:3]:
        shutil.copy(p, tmp_path / "photos" / p.name)
    shutil.copy(photos[0], tmp_path / "laska.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VGGEMBED_WEIGHTS", str(tiny["vgg16", "matconvnet"]))
    for line in lines:
        if "--engine ray" in line or "parts/" in line:
            continue
        result = CliRunner().invoke(main, shlex.split(line)[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{line}: {result.output}"


def test_a_ray_folder_of_the_single_layer_version_reads_and_merges_but_does_not_resume(tmp_path):
    """Format 3: one `embedding` column and a recipe with `layer`/`pool`."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vggembed.store.recipe import Recipe
    from vggembed.store.runfolder import RunDir, Store
    from vggembed.store.vectors import open_vectors

    recipe = {"vggembed_version": "0.1.0", "weights": "vgg16_weights.npz", "weights_md5": "0" * 32,
              "arch": "vgg16", "layer": "relu7", "pool": None, "resize": "squash", "precision": "float32",
              "dtype": "float32", "l2_normalize": False, "fast_decode": False, "legacy_transpose": False,
              "calibration": None}
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"version": 3, "id": "r", "inputs": 3, "parts": 1,
                                                      "inputs_sha256": "x", "part_size": 10, "recipe": recipe}))
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 4, mask=pa.array([False, True, False]))
    table = pa.table({"path": ["a", "b", "c"], "path_bytes": pa.array([None] * 3, pa.binary()),
                      "status": ["ok", "error", "ok"], "error": [None, "bad", None], "embedding": column})
    meta = {"version": 3, "run": "r", "part": 0, "first": 0, "inputs": 3, "rows": 3, "failed": 1, "recipe": recipe}
    pq.write_table(table.replace_schema_metadata({b"vggembed": json.dumps(meta)}), folder / "part-00000.parquet")

    with open_vectors(folder) as v:
        assert v.paths == ["a", "c"] and v.name == "relu7"
        np.testing.assert_array_equal(v.read(0, 2), vectors[[0, 2]])
    assert run("merge", folder, "-o", tmp_path / "m.npy").exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), vectors[[0, 2]])
    with pytest.raises(vggembed.VGGEmbedError, match="an older vggembed wrote this run, whose parts --resume "
                                                      "cannot continue; pass --overwrite to start over"):
        RunDir(Store(str(folder)), ["a", "b", "c"], 1, Recipe.from_dict(recipe), 10, resume=True, overwrite=False)
