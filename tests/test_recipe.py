"""The recipe travels with the vectors: recorded in every output, checked on --resume."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import vggembed
from vggembed.cli import main
from vggembed.store.writer import recorded_meta
from vggembed.store.recipe import Output, Recipe


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("ext", [".npy", ".npz", ".csv", ".parquet"])
def test_every_output_records_its_recipe_and_counts(tmp_path, image_dir, tiny16, ext):
    (image_dir / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / f"feats{ext}"
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--layer", "pool5", "--pool", "avg",
                 "--l2-normalize", "--dtype", "float16", "--resize", "center-crop")
    assert result.exit_code == 3, result.output
    meta = recorded_meta(out)
    spec = vggembed.load_weights(tiny16)[1]
    assert meta["recipe"] == {
        "vggembed_version": vggembed.__version__, "weights": tiny16.name, "weights_md5": spec.md5, "arch": "vgg16",
        "outputs": [{"name": "pool5_avg", "layer": "pool5", "pool": "avg"}], "top": 0, "resize": "center-crop", "precision": "float32", "dtype": "float16",
        "l2_normalize": True, "fast_decode": False, "legacy_transpose": False, "calibration": None,
        "int8_scheme": None, "head": None, "head_md5": None}
    assert (meta["rows"], meta["inputs"], meta["failed"]) == (4, 5, 1)
    sidecar = tmp_path / f"feats{ext}.meta.json"
    if ext == ".parquet":  # inside the file itself, not beside it
        assert not sidecar.exists()
        assert json.loads(pq.read_schema(out).metadata[b"vggembed"]) == meta
    else:
        assert json.loads(sidecar.read_text()) == meta
    assert not list(tmp_path.glob("*.partial"))


def test_canonical_layer_names_are_recorded(tmp_path, image_dir, tiny16):
    out = tmp_path / "f.npy"
    assert run("embed", image_dir, "-o", out, "--weights", tiny16, "--layer", "fc7").exit_code == 0
    # fc7 as an embedding = fc2 = relu7, written under the name it was given
    assert recorded_meta(out)["recipe"]["outputs"] == [{"name": "fc7", "layer": "relu7", "pool": None}]


def test_resume_refuses_another_recipe_and_accepts_the_same(tmp_path, image_dir, tiny16):
    out = tmp_path / "f.npy"
    staged = tmp_path / "f.npy.meta.json.partial"
    # An interrupted run leaves its recipe staged beside its partial files.
    from vggembed.store.writer import EmbeddingWriter

    writer = EmbeddingWriter(out)
    spec = vggembed.load_weights(tiny16)[1]
    writer.begin(Recipe(weights=str(tiny16)).bind(spec))
    writer.close()
    assert staged.exists()
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--resume", "--l2-normalize")
    assert result.exit_code == 1
    assert (f"{out}: the interrupted run was made with another recipe (l2_normalize: True vs False); "
            "resume with the same options, or pass --overwrite") in result.output
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--resume")
    assert result.exit_code == 0, result.output
    assert recorded_meta(out)["rows"] == 4


def test_recipe_round_trips_and_names_its_differences():
    a = Recipe(weights="/x/vgg16_weights.npz", arch="vgg16", weights_md5="0" * 32)
    b = Recipe.from_dict(a.to_dict())
    assert a.mismatches(b) == [] and b.weights == "vgg16_weights.npz" and b == a.replace(weights=b.weights)
    assert a.mismatches(b.replace(weights_md5="1" * 32, top=5)) == [
        f"weights_md5: {'0' * 32!r} vs {'1' * 32!r}", "top: 0 vs 5"]
    two = a.replace(outputs=(Output("relu7", None, "fc2"), Output("pool5", "gem", "pool5_gem")))
    assert a.mismatches(two) == ["outputs: fc2 (relu7) vs fc2 (relu7), pool5_gem (pool5:gem)"]


def test_a_recipe_recorded_by_the_single_layer_version_reads_as_its_one_output():
    old = {"vggembed_version": "0.1.0", "weights": "vgg16_weights.npz", "weights_md5": "0" * 32, "arch": "vgg16",
           "layer": "pool5", "pool": "avg", "resize": "squash", "precision": "float32", "dtype": "float32",
           "l2_normalize": False, "fast_decode": False, "legacy_transpose": False, "calibration": None}
    recipe = Recipe.from_dict(old)
    assert recipe.outputs == (Output("pool5", "avg", "pool5_avg"),) and recipe.top == 0
    assert recipe.names == ["pool5_avg"] and recipe.select() == recipe
    fc = Recipe.from_dict({**old, "layer": "relu7", "pool": "max"})  # fc layers ignored --pool, and recorded it
    assert fc.outputs == (Output("relu7", None, "relu7"),)


def test_int8_vectors_of_an_older_int8_scheme_are_not_comparable_with_new_ones(tiny16):
    """An int8 output recorded before the model was built by vggembed itself (no int8_scheme) is refused by
    --resume, merge and search's queries, naming the field: its vectors came from another int8 model."""
    from vggembed.store.recipe import INT8_SCHEME

    spec = vggembed.load_weights(tiny16)[1]
    new = Recipe(weights=str(tiny16), precision="int8").bind(spec)
    assert new.int8_scheme == INT8_SCHEME and Recipe(weights=str(tiny16)).bind(spec).int8_scheme is None
    old = {k: v for k, v in new.to_dict().items() if k != "int8_scheme"}
    assert new.mismatches(Recipe.from_dict(old)) == [f"int8_scheme: {INT8_SCHEME!r} vs None"]
    assert new.mismatches(Recipe.from_dict(new.to_dict())) == []
