"""vggembed export: a SavedModel that plain TensorFlow (and TensorFlow Serving) loads, and .tflite files that
LiteRT alone runs, each giving embed's rows."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vggembed.images.decode import prepare
from vggembed.net import int8

from .conftest import cosine, env_without_tf_noise

try:
    import ai_edge_litert  # noqa: F401
except ImportError:
    HAVE_LITERT = False
else:
    HAVE_LITERT = True


def vggembed(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "vggembed", *map(str, args)], capture_output=True, text=True,
                          env=env or env_without_tf_noise(), **kw)


def child(code: str, env=None):
    """Run `code` in a fresh Python that must not import vggembed; its stdout is JSON."""
    code = textwrap.dedent(code) + '\nassert not any(m.startswith("vggembed") for m in sys.modules)\n'
    r = subprocess.run([sys.executable, "-c", "import sys, json\n" + code], capture_output=True, text=True,
                       env=env or env_without_tf_noise(), cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(7).uniform(0, 255, (3, 224, 224, 3)).astype(np.float32)


def test_saved_model_loads_in_plain_tensorflow_and_equals_embed(tmp_path, tiny16, tiny_model, photos, pixels):
    for resize in ("squash", "center-crop"):
        r = vggembed("export", tmp_path / resize, "--format", "saved-model", "--weights", tiny16,
                     "--layer", "fc2,pool5:avg", "--top", "3", "--resize", resize)
        assert r.returncode == 0, r.stderr
        assert f"wrote {tmp_path / resize / '1'}" in r.stderr
    assert (tmp_path / "squash" / "1" / "saved_model.pb").is_file()
    assert (tmp_path / "squash" / "1" / "variables").is_dir()
    np.save(tmp_path / "pixels.npy", pixels)
    got = child(f"""
        import numpy as np, tensorflow as tf
        out = {{}}
        for resize in ("squash", "center-crop"):
            m = tf.saved_model.load({str(tmp_path)!r} + "/" + resize + "/1")
            files = [tf.io.read_file(p) for p in {[str(p) for p in photos]!r}]
            y = m.signatures["serving_default"](images=tf.stack(files))
            out[resize] = {{k: v.numpy().tolist() for k, v in y.items() if k != "top_label"}}
            out[resize]["top_label"] = [[s.decode() for s in row] for row in y["top_label"].numpy()]
            out[resize]["recipe"] = json.loads(m.recipe.numpy())
        p = m.signatures["pixels"](pixels=tf.constant(np.load({str(tmp_path / "pixels.npy")!r})))
        out["pixels"] = {{k: v.numpy().tolist() for k, v in p.items() if k != "top_label"}}
        print(json.dumps(out))
        """)
    # The float-pixel signature is embed's computation.
    n = len(pixels)
    assert np.allclose(got["pixels"]["fc2"], tiny_model.embed_batch(pixels, "relu7", None, pad_to=n), atol=1e-5,
                       rtol=1e-5)
    assert np.allclose(got["pixels"]["pool5_avg"], tiny_model.embed_batch(pixels, "pool5", "avg", pad_to=n),
                       atol=1e-5, rtol=1e-5)
    # Encoded images: decoded and resized by TensorFlow, within cosine 0.9999 of embed (Pillow) on real photos.
    for resize in ("squash", "center-crop"):
        out = got[resize]
        batch = np.stack([prepare(str(p), resize_mode=resize) for p in photos]).astype(np.float32)
        for name, layer, pool in (("fc2", "relu7", None), ("pool5_avg", "pool5", "avg")):
            ref = tiny_model.embed_batch(batch, layer, pool, pad_to=len(photos))
            for a, b in zip(out[name], ref):
                assert cosine(np.asarray(a), b) > 0.9999, (resize, name)
        probs = tiny_model.run(batch, ["prob"], pad_to=len(photos))["prob"]
        assert out["top_index"] == [[p.index for p in tiny_model.top_k(row, 3)] for row in probs]
        assert out["top_label"] == [[p.label for p in tiny_model.top_k(row, 3)] for row in probs]
        recipe = out["recipe"]
        assert recipe["weights_md5"] == tiny_model.spec.md5 and recipe["resize"] == resize
        assert [o["name"] for o in recipe["outputs"]] == ["fc2", "pool5_avg"] and recipe["top"] == 3
        assert recipe["vggembed_version"]


def test_saved_model_cli_shows_clean_signatures(tmp_path, tiny16):
    assert vggembed("export", tmp_path / "m", "--format", "saved-model", "--weights", tiny16,
                    "--layer", "pool5:max", "--version", "3").returncode == 0
    r = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--all",
                        "--dir", str(tmp_path / "m" / "3")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "signature_def['serving_default']" in text and "signature_def['pixels']" in text
    assert "inputs['images']" in text and "DT_STRING" in text
    assert "inputs['pixels']" in text and "(-1, 224, 224, 3)" in text
    assert "outputs['pool5_max']" in text and "(-1, 16)" in text
    # A second export to the same version needs --overwrite.
    again = vggembed("export", tmp_path / "m", "--format", "saved-model", "--weights", tiny16, "--version", "3")
    assert again.returncode == 1 and "already exists" in again.stderr


@pytest.mark.parametrize("args, code, message", [
    (["--format", "saved-model", "--precision", "int8"], 1, "--format tflite"),
    (["--format", "saved-model", "--resize", "none"], 1, "fixed input size"),
    (["--format", "saved-model", "--layer", "pool5:rmac"], 1, "R-MAC"),
    (["--format", "tflite", "--precision", "bf16"], 1, "float32 or int8"),
    # embed's own parser of --layer: usage errors before any weights are read
    (["--format", "saved-model", "--layer", "pool5"], 2, "name a pool"),
    (["--format", "saved-model", "--layer", "nope"], 2, "no such layer"),
])
def test_export_refuses_what_it_cannot_write(tmp_path, tiny16, args, code, message):
    r = vggembed("export", tmp_path / "out", "--weights", tiny16, *args)
    assert r.returncode == code and message in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) <= 3, r.stderr  # click: usage, hint, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt, name, message", [
    ("saved-model", "afile", "{tmp}/afile/1: cannot write here: {tmp}/afile is a file, not a folder"),
    ("saved-model", "/proc/nope", "/proc/nope/1: cannot write here: no such file or directory (/proc/nope)"),
    ("tflite", "/proc/nope.tflite", "/proc/nope.tflite: cannot write here: no such file or directory"),
    ("tflite", "afolder", "{tmp}/afolder: exists and is not a regular file"),
    ("saved-model", "asm/1", "{tmp}/asm/1: exists and is not a folder"),
])
def test_a_place_that_cannot_be_written_is_one_line_before_the_network_is_built(tmp_path, tiny16, fmt, name,
                                                                                 message):
    (tmp_path / "afile").write_text("hi\n")
    (tmp_path / "afolder").mkdir()
    (tmp_path / "asm").mkdir()
    (tmp_path / "asm" / "1").write_text("mine")
    out = name if name.startswith("/") else tmp_path / (name.split("/")[0])
    # --overwrite: the kind of the place is refused even where replacing is allowed
    r = vggembed("-v", "export", out, "--format", fmt, "--weights", tiny16, "--overwrite")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == ["Error: " + message.format(tmp=tmp_path)]  # -v: nothing was loaded
    assert (tmp_path / "afile").read_text() == "hi\n" and (tmp_path / "asm" / "1").read_text() == "mine"
    assert list((tmp_path / "afolder").iterdir()) == [] and not list(tmp_path.glob("*.lock"))


def test_an_existing_tflite_sidecar_needs_overwrite_like_the_file(tmp_path, tiny16):
    out = tmp_path / "only.tflite"
    (tmp_path / "only.tflite.json").write_text("{}\n")
    r = vggembed("-v", "export", out, "--format", "tflite", "--weights", tiny16)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"Error: {out}.json already exists: pass --overwrite"]
    assert (tmp_path / "only.tflite.json").read_text() == "{}\n" and not out.exists()
    assert vggembed("export", out, "--format", "tflite", "--weights", tiny16, "--overwrite").returncode == 0
    assert json.loads((tmp_path / "only.tflite.json").read_text())["outputs"] == ["fc2"] and out.stat().st_size


def test_a_place_that_fails_while_writing_is_one_error_naming_it(tmp_path, tiny16, tiny_model):
    """Past the check made before the build (a place that goes away, a full disk): TensorFlow's and the OS's
    errors as one OutputError naming the output, and nothing left behind."""
    from vggembed.engines.local import check_outputs
    from vggembed.net import export
    from vggembed.store.destination import OutputError
    from vggembed.store.recipe import Recipe

    bound = check_outputs(tiny_model, Recipe(weights=str(tiny16)))
    with pytest.raises(OutputError, match=r"^/proc/nope/1: cannot write here: .*/proc/nope") as e:
        export.saved_model(tiny_model, bound, "/proc/nope")
    assert "\n" not in str(e.value)
    with pytest.raises(OutputError, match=r"^/proc/nope.tflite: cannot write here: no such file or directory"):
        export.tflite(tiny_model, bound, "/proc/nope.tflite")


def test_bad_pool_is_a_usage_error(tmp_path, tiny16):
    r = vggembed("export", tmp_path / "out", "--format", "tflite", "--weights", tiny16, "--layer", "pool5:median")
    assert r.returncode == 2 and "pool5:median" in r.stderr


@pytest.mark.skipif(not HAVE_LITERT, reason="needs ai-edge-litert")
def test_float32_tflite_runs_in_litert_alone(tmp_path, tiny16, tiny_model, pixels):
    out = tmp_path / "vgg.tflite"
    r = vggembed("export", out, "--format", "tflite", "--weights", tiny16, "--layer", "fc2", "--layer", "pool5:avg",
                 "--top", "3")
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "vgg.tflite.json").read_text())
    assert side["outputs"] == ["fc2", "pool5_avg", "top_index", "top_prob"]
    assert side["labels"] == [tiny_model.spec.label(i) for i in range(10)]
    np.save(tmp_path / "pixels.npy", pixels)
    got = child(f"""
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter
        runner = Interpreter(model_path={str(out)!r}).get_signature_runner("serving_default")
        y = runner(pixels=np.load({str(tmp_path / "pixels.npy")!r}))
        print(json.dumps({{k: v.tolist() for k, v in y.items()}}))
        """)
    n = len(pixels)
    # XNNPACK's float32 kernels sum in another order than oneDNN's: equal to float32 rounding.
    assert np.allclose(got["fc2"], tiny_model.embed_batch(pixels, "relu7", None, pad_to=n), rtol=1e-4, atol=1e-3)
    assert np.allclose(got["pool5_avg"], tiny_model.embed_batch(pixels, "pool5", "avg", pad_to=n), rtol=1e-4,
                       atol=1e-3)
    probs = tiny_model.run(pixels, ["prob"], pad_to=n)["prob"]
    assert got["top_index"] == [[p.index for p in tiny_model.top_k(row, 3)] for row in probs]


@pytest.mark.skipif(not (HAVE_LITERT and int8.cpu_has_int8_dot()), reason="int8 needs LiteRT and a VNNI/AMX CPU")
def test_int8_tflite_is_the_model_embed_runs(tmp_path, monkeypatch, tiny16, photos):
    import vggembed as api

    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path / "home"))
    out = tmp_path / "vgg8.tflite"
    env = {**env_without_tf_noise(), "VGGEMBED_HOME": str(tmp_path / "home")}
    r = vggembed("export", out, "--format", "tflite", "--precision", "int8", "--weights", tiny16,
                 "--layer", "pool5:avg,pool4:avg", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "vgg8.tflite.json").read_text())["outputs"] == ["pool4_avg", "pool5_avg"]
    batch = np.stack([prepare(str(p)) for p in photos]).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    got = child(f"""
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter
        it = Interpreter(model_path={str(out)!r})
        x = np.load({str(tmp_path / "batch.npy")!r})
        it.resize_tensor_input(it.get_input_details()[0]["index"], x.shape)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        print(json.dumps([it.get_tensor(o["index"]).tolist() for o in it.get_output_details()]))
        """)
    m8 = api.load(tiny16, precision="int8")
    ref = m8.run(batch, ["pool4", "pool5"], "avg", pad_to=len(batch))
    assert np.array_equal(np.asarray(got[0], np.float32), ref["pool4"])
    assert np.array_equal(np.asarray(got[1], np.float32), ref["pool5"])
    refused = vggembed("export", tmp_path / "x.tflite", "--format", "tflite", "--precision", "int8",
                       "--weights", tiny16, "--top", "5", env=env)
    assert refused.returncode == 1 and "int8 layers only" in refused.stderr


@pytest.mark.parametrize("resize", ["squash", "center-crop"])
def test_the_graph_decodes_and_resizes_as_pillow_does(tmp_path, photos, resize):
    """Pillow's BILINEAR written in TensorFlow ops: the same 8-bit pixels as embed's, up- and downscaling."""
    from PIL import Image

    from vggembed.net.export import _decoder
    from vggembed.net.tfimport import tensorflow

    tf = tensorflow()
    small = tmp_path / "small.png"
    Image.open(photos[0]).resize((100, 80)).save(small)
    decode = tf.function(_decoder(resize, 224, 224))
    for p in [*photos, small]:
        got = decode(tf.constant([p.read_bytes()])).numpy()[0]
        assert np.array_equal(got, prepare(str(p), resize_mode=resize).astype(np.float32)), p.name


def test_every_command_in_the_deploy_doc_exists():
    """docs/deploy.md's `vggembed ...` lines name real commands and options."""
    import shlex
    from pathlib import Path

    import click

    from .test_docs import resolve

    text = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    lines, fenced = [], False
    for line in text.splitlines():
        fenced = not fenced if line.startswith("```") else fenced
        if fenced and line.startswith("vggembed "):
            lines.append(line)
    assert len(lines) >= 4
    for line in lines:
        cmd, rest = resolve(shlex.split(line)[1:])
        assert not isinstance(cmd, click.Group), line
        known = {opt for p in cmd.params for opt in p.opts + p.secondary_opts}
        assert all(w.split("=")[0] in known for w in rest if w.startswith("-")), line
