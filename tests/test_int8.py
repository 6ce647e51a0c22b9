"""--precision int8 on tiny weights: LiteRT + XNNPACK, all-int8 conv/fc, cache, CLI, API and Ray."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import vggembed
from vggembed.net import int8
from vggembed.net import synthetic
from vggembed.cli import main
from vggembed.errors import VGGEmbedError
from vggembed.images.decode import prepare
from vggembed.images.inputs import expand

from .conftest import cosine

try:
    import ai_edge_litert  # noqa: F401

    HAVE_LITERT = True
except ImportError:
    HAVE_LITERT = False

needs_int8 = pytest.mark.skipif(not (HAVE_LITERT and int8.cpu_has_int8_dot()),
                                reason="needs ai-edge-litert and a CPU with VNNI/AMX")


@pytest.fixture(scope="module", autouse=True)
def int8_cache(tmp_path_factory):
    """One weights cache for the module, so each tiny model converts once."""
    home = tmp_path_factory.mktemp("int8home")
    saved = os.environ.get("VGGEMBED_HOME")
    os.environ["VGGEMBED_HOME"] = str(home)
    yield home
    if saved is None:
        os.environ.pop("VGGEMBED_HOME")
    else:
        os.environ["VGGEMBED_HOME"] = saved


@pytest.fixture(scope="module")
def m8(tiny16):
    return vggembed.load(tiny16, precision="int8")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_index(path):
    with open(f"{path}.index.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ model
@needs_int8
def test_every_conv_and_fc_runs_int8_on_xnnpack(m8, photos):
    m8.embed(photos[:1], batch_size=1)
    interpreter = m8._interpreters[(("relu7", None),)]
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    names = [op["op_name"] for op in ops]
    assert names.count("CONV_2D") == 13 and names.count("FULLY_CONNECTED") == 2  # fc8 runs in float outside
    for op in ops:
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            x, w, b = (tensors[i] for i in op["inputs"])
            assert x["dtype"] == np.int8 and w["dtype"] == np.int8 and b["dtype"] == np.int32, op
            out_channels = w["shape"][0]
            assert len(w["quantization_parameters"]["scales"]) == out_channels, "weights not per channel"
    # XNNPACK took every conv and fc layer: their weights are inputs of its (delegate) nodes.
    delegated = {i for op in ops if op["op_name"] == "DELEGATE" for i in op["inputs"]}
    assert delegated, "XNNPACK not applied"
    for op in ops:
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            assert op["inputs"][1] in delegated, f"{op['op_name']} {op['index']} left on the builtin kernels"


@needs_int8
def test_vectors_close_to_float32_and_reproducible(m8, tiny_model, photos):
    ours = m8.embed(photos, layer="fc2", batch_size=4)
    exact = tiny_model.embed(photos, layer="fc2", batch_size=4)
    assert ours.shape == exact.shape and ours.dtype == np.float32
    assert min(cosine(a, b) for a, b in zip(ours, exact)) > 0.98
    np.testing.assert_array_equal(m8.embed(photos, layer="fc2", batch_size=4), ours)  # bit for bit
    # several layers (fc and pooled conv maps) in one converted model come back under their own names
    batch = np.stack([prepare(p) for p in photos]).astype(np.float32)
    layers = ["relu6", "relu7", "pool5", "conv5_3"]
    several, ref = m8.run(batch, layers, pool="avg"), tiny_model.run(batch, layers, pool="avg")
    for name in layers:
        assert several[name].shape == ref[name].shape
        assert min(cosine(a, b) for a, b in zip(several[name], ref[name])) > 0.98, name
    # The tiny network's 32-d fc2 moves ~0.5% under int8 (full size: 0.04%, see the benchmark), enough to swap
    # close classes: int8's top-1 is one of float32's top two, and a decisive prediction (ahead by 0.9) stays.
    exact = tiny_model.run(batch, ["prob"])["prob"]
    margins = np.diff(np.sort(exact, axis=1)[:, -2:], axis=1)[:, 0]
    assert (margins > 0.9).any()
    for photo, probs, margin in zip(photos, exact, margins):
        top = m8.classify(photo, top=3)[0]
        assert [p.rank for p in top] == [1, 2, 3]
        assert top[0].index in np.argsort(probs)[-2:], photo
        if margin > 0.9:
            assert top[0].index == int(probs.argmax()), photo


@needs_int8
def test_the_written_model_is_the_plan(m8, tiny_params, photos):
    """Every conv/fc layer of the model carries exactly the plan's int8 kernel, per-channel scales, corrected
    bias and output range, and ranges become scales and zero points as TensorFlow's converter made them."""
    m8.embed(photos[:1], batch_size=1)
    plan = m8.calibrate((("relu7", None),))
    interpreter = m8._interpreters[(("relu7", None),)]
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    names = [layer.name for layer in m8.layers if layer.kind in ("conv", "fc")][: len(ops)]
    assert len(ops) == 15 and names[-1] == "fc7"
    previous = int8.qparams(int8._centred_range(m8.spec.mean_pixel))
    for name, op in zip(names, ops):
        x, w, b = (tensors[i] for i in op["inputs"])
        y = tensors[op["outputs"][0]]
        codes, scale = plan["weights"][name]
        assert x["quantization"] == (np.float32(previous[0]), previous[1]), name  # the layer before's output
        kernel = np.moveaxis(codes, 3, 0) if name.startswith("conv") else codes.T
        np.testing.assert_array_equal(interpreter.get_tensor(w["index"]), kernel, err_msg=name)
        w_scales = w["quantization_parameters"]["scales"]
        np.testing.assert_allclose(w_scales, scale, rtol=1e-6, err_msg=name)
        assert not w["quantization_parameters"]["zero_points"].any() and w["quantization_parameters"][
            "quantized_dimension"] == 0
        b_scales = b["quantization_parameters"]["scales"]
        np.testing.assert_allclose(b_scales, previous[0] * w_scales, rtol=1e-6, err_msg=name)
        bias = interpreter.get_tensor(b["index"]).astype(np.float64) * b_scales
        assert np.all(np.abs(bias - plan["biases"][name]) <= b_scales / 2 * (1 + 1e-6)), name  # rounded to nearest
        relu = "relu" + name[4:] if name.startswith("conv") else "relu" + name[2:]
        lo, hi = plan["ranges"][relu]
        # ReLU fused: 0..hi, hi as a float32 (the converter's fake-quant attribute) over 255 steps
        assert lo == 0 and y["quantization"] == (np.float32(float(np.float32(hi)) / 255), -128), name
        previous = int8.qparams(plan["ranges"][relu])
    # bias correction moved every conv and fc bias (the measured mean shift of rounding is never exactly 0)
    for name in names:
        assert not np.array_equal(plan["biases"][name], tiny_params["vgg16"][name][1]), name
    # a range that does not start at 0 gets the zero point nearest its end, as the converter nudges it
    assert int8.qparams((-52.7, 47.8)) == (pytest.approx((np.float32(47.8) - np.float32(-52.7)) / 255), 6)
    assert int8.qparams((0.0, 0.0)) == (pytest.approx(1e-6 / 255), -128)  # all zeros on the calibration set


# What the tiny VGG16's int8 model carries (every tensor's quantization, every conv/fc kernel and bias), as
# planned from the built-in calibration set, by INT8_SCHEME: (the LiteRT release whose float kernels ran the
# calibration's convolutions, digest). Measured the same with 1 and 2 threads and OpenBLAS's Haswell and
# SkylakeX kernels on an Intel Xeon (AMX).
PLAN_DIGESTS = {4: ("2.3.0", "6babb882b2be5fcb9376fdb5863610d99c6d8d9f0186d91697dc4545d739eb1f")}


def model_digest(interpreter) -> str:
    """The int8 model's numbers as LiteRT reads them, whatever the flatbuffers package wrote around them."""
    h = hashlib.sha256()
    for t in sorted(interpreter.get_tensor_details(), key=lambda t: t["index"]):
        q = t["quantization_parameters"]
        h.update(f'{t["name"]} {np.dtype(t["dtype"]).str} {tuple(t["shape"])}'.encode())
        h.update(np.asarray(q["scales"], np.float32).tobytes() + np.asarray(q["zero_points"], np.int64).tobytes())
    for op in interpreter._get_ops_details():
        h.update(op["op_name"].encode())
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            for i in op["inputs"][1:]:  # kernel and bias
                h.update(interpreter.get_tensor(i).tobytes())
    return h.hexdigest()


@needs_int8
def test_the_same_weights_and_photos_make_the_same_model(m8, photos):
    """The promise that lets --resume, merge and Ray workers join int8 vectors: one model per scheme, to the bit.
    A change that moves any bit of it changes users' vectors, so it must come with a new INT8_SCHEME
    (store/recipe.py), which keeps the two kinds of vectors apart; then record the new digest above."""
    from importlib.metadata import version

    from vggembed.store.recipe import INT8_SCHEME

    assert INT8_SCHEME in PLAN_DIGESTS, f"record the tiny model's digest for INT8_SCHEME {INT8_SCHEME}"
    litert, expected = PLAN_DIGESTS[INT8_SCHEME]
    if version("ai-edge-litert") != litert:
        pytest.skip(f"digest recorded with LiteRT {litert}; this is {version('ai-edge-litert')}")
    m8.embed(photos[:1], batch_size=1)
    assert model_digest(m8._interpreters[(("relu7", None),)]) == expected, (
        f"the int8 model changed under INT8_SCHEME {INT8_SCHEME}: if that is meant, bump INT8_SCHEME")


@needs_int8
def test_a_model_with_float_layers_is_refused():
    from vggembed.net import tflite

    g = tflite.Graph()
    x = g.tensor("x", tflite.FLOAT32, (1, 8, 8, 3))
    w = g.tensor("w", tflite.FLOAT32, (4, 3, 3, 3), batch=False, data=np.ones((4, 3, 3, 3), np.float32))
    b = g.tensor("b", tflite.FLOAT32, (4,), batch=False, data=np.zeros(4, np.float32))
    y = g.tensor("y", tflite.FLOAT32, (1, 8, 8, 4))
    g.op(tflite.CONV_2D, [x, w, b], [y], tflite.CONV_2D_OPTIONS, [(1, "int32", 1), (2, "int32", 1)])
    float_model = bytes(g.finish([x], [y]))
    with pytest.raises(VGGEmbedError, match=r"^w\.npz: int8 conversion left CONV_2D \d+ in float32; not using it$"):
        int8._check_int8(float_model, "w.npz")


@needs_int8
def test_int8_refuses_what_it_cannot_do(m8, tiny16, photos):
    with pytest.raises(VGGEmbedError, match="runs at the 224x224 input"):
        m8.embed(photos[:1], layer="pool5", pool="avg", resize="none")
    with pytest.raises(VGGEmbedError, match="fixed input"):
        next(m8.walk(np.zeros((1, 64, 64, 3), np.float32), "relu1_1"))
    with pytest.raises(VGGEmbedError, match="runs on the CPU"):
        vggembed.load(tiny16, precision="int8", device="gpu")
    with pytest.raises(VGGEmbedError, match="for --precision int8 only"):
        vggembed.load(tiny16, calibration=".")


# ------------------------------------------------------------------ cache
@needs_int8
def test_cache_is_reused_and_a_corrupt_or_stale_entry_rebuilt(tmp_path, monkeypatch, tiny_params, photos):
    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path / "home"))
    weights = synthetic.write_npz(tiny_params["vgg16"], tmp_path / "w.npz")
    params, spec = vggembed.load_weights(weights)

    def vectors():
        lines = []
        m = int8.Int8VGG(params, spec, log=lines.append)
        return m.embed(photos[:2], batch_size=2), lines

    first, log = vectors()
    assert any("converting" in line for line in log)
    cached = list((tmp_path / "home" / "int8").glob("*.tflite"))
    assert len(cached) == 1 and cached[0].with_name(cached[0].name + ".json").exists()
    assert not list((tmp_path / "home" / "int8").glob("*.tmp"))

    again, log = vectors()
    assert log == [] and (again == first).all()  # no conversion, same model

    data = bytearray(cached[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    cached[0].write_bytes(bytes(data))
    rebuilt, log = vectors()
    assert "corrupt" in log[0] and any("converting" in line for line in log)
    np.testing.assert_array_equal(rebuilt, first)

    meta = cached[0].with_name(cached[0].name + ".json")
    info = json.loads(meta.read_text())
    info["key"]["litert"] = "0.0"  # made by another version
    meta.write_text(json.dumps(info))
    assert any("stale" in line for line in vectors()[1])


@needs_int8
def test_calibration_folder_makes_its_own_model(tmp_path, tiny16, image_dir):
    out = tmp_path / "f.npy"
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--precision", "int8",
                 "--calibration", image_dir)
    assert result.exit_code == 0, result.output
    assert f"calibrating on 4 images from {image_dir}" in result.stderr
    builtin = tmp_path / "b.npy"
    assert run("embed", image_dir, "-o", builtin, "--weights", tiny16, "--precision", "int8").exit_code == 0
    assert not np.array_equal(np.load(out), np.load(builtin))
    (image_dir / "bad.jpg").write_bytes(b"not a jpeg")
    refused = run("embed", image_dir, "-o", tmp_path / "x.npy", "--weights", tiny16, "--precision", "int8",
                  "--calibration", image_dir)
    assert refused.exit_code == 1 and "bad.jpg" in refused.stderr and "--calibration" in refused.stderr


def test_builtin_calibration_views_are_the_same_pixels_on_every_machine():
    """The int8 model follows the calibration pixels to its last bit, and Pillow's resampling changed between
    12.3 and 13.0: the built-in views are resized by vggembed in integer arithmetic, to these exact pixels."""
    images = int8.calibration_images()
    assert len(images) == 40 and all(im.shape == (224, 224, 3) and im.dtype == np.uint8 for im in images)
    digest = hashlib.sha256()
    for im in images:
        digest.update(im.tobytes())
    assert digest.hexdigest() == int8.BUILTIN_SHA256


def test_exact_resize_is_bilinear_resampling(photos):
    """`_resize_exact` is a triangle filter as Pillow's BILINEAR is: within one level of it on a real photo,
    flat areas stay flat, and it upsamples too."""
    from PIL import Image

    photo = np.asarray(Image.open(photos[-1]).convert("RGB").resize((300, 391)))
    mine = int8._resize_exact(photo, (224, 224)).astype(int)
    pillow = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BILINEAR)).astype(int)
    assert np.abs(mine - pillow).max() <= 1 and np.abs(mine - pillow).mean() < 0.3
    flat = np.full((50, 70, 3), 200, np.uint8)
    assert (int8._resize_exact(flat, (224, 160)) == 200).all()
    assert int8._resize_exact(photo[:20, :30], (224, 224)).shape == (224, 224, 3)


@needs_int8
def test_conversion_on_other_calibration_pixels_says_its_model_will_differ(tmp_path, monkeypatch, tiny16):
    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path))
    monkeypatch.setattr(int8, "BUILTIN_SHA256", "0" * 64)
    lines = []
    model = int8.Int8VGG(*vggembed.load_weights(tiny16), log=lines.append)
    model.model_bytes((("relu7", None),))
    assert any("calibration photos decode to other pixels" in line for line in lines)


# -------------------------------------------------------------------- CLI
@needs_int8
def test_cli_embed_and_classify_int8(tmp_path, tiny16, image_dir, m8):
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "feats.npy"
    result = run("embed", image_dir, "-o", out, "--weights", tiny16, "--precision", "int8", "--batch-size", 3)
    assert result.exit_code == 3, result.output  # one bad image, the rest embedded
    index = read_index(out)
    assert [r["path"] for r in index] == [s.name for s in expand([str(image_dir)], None)]  # input order
    bad = [r for r in index if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png")
    good = [r["path"] for r in index if not r["error"]]
    np.testing.assert_array_equal(np.load(out), m8.embed(good, batch_size=3))  # row i is image i, padding or not

    again = tmp_path / "again.npy"
    run("embed", image_dir, "-o", again, "--weights", tiny16, "--precision", "int8", "--batch-size", 3)
    assert again.read_bytes() == out.read_bytes()  # one int8 run reproduces another bit for bit

    result = run("classify", image_dir / "chelsea.png", "--weights", tiny16, "--precision", "int8")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and lines[0].startswith("1. ")
    assert lines[0].split(". ", 1)[1].rsplit(" (", 1)[0] == m8.classify(image_dir / "chelsea.png")[0][0].label


@needs_int8
def test_int8_several_outputs_in_one_pass(tmp_path, tiny16, image_dir, m8):
    """fc2, pool5:avg and the top 3 from one int8 model equal each asked alone (no conv output beside)."""
    common = ["--weights", tiny16, "--precision", "int8", "--batch-size", 3]
    out = tmp_path / "multi.npz"
    result = run("embed", image_dir, "-o", out, *common, "--layer", "fc2,pool5:avg", "--top", 3)
    assert result.exit_code == 0, result.output
    for layer, name in (("fc2", "fc2"), ("pool5:avg", "pool5_avg")):
        alone = tmp_path / f"{name}.npy"
        assert run("embed", image_dir, "-o", alone, *common, "--layer", layer).exit_code == 0
        with np.load(out) as z:
            np.testing.assert_array_equal(z[name], np.load(alone), err_msg=name)
    preds = tmp_path / "preds.npz"
    assert run("classify", image_dir, "-o", preds, *common, "--top", 3).exit_code == 0
    with np.load(out) as z, np.load(preds) as p:
        for name in ("top_index", "top_prob", "top_label"):
            np.testing.assert_array_equal(z[name], p[name], err_msg=name)


@needs_int8
def test_interrupted_int8_run_resumes_to_the_same_result(tmp_path, monkeypatch, tiny16, image_dir):
    full = tmp_path / "full.npy"
    args = ["embed", image_dir, "--weights", tiny16, "--precision", "int8", "--batch-size", 1]
    assert run(*args, "-o", full).exit_code == 0
    calls = []
    compute = int8.Int8VGG._compute

    def interrupted(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a batch
        return compute(self, *a)

    out = tmp_path / "cut.npy"
    monkeypatch.setattr(int8.Int8VGG, "_compute", interrupted)
    assert run(*args, "-o", out).exit_code == 130
    monkeypatch.setattr(int8.Int8VGG, "_compute", compute)
    result = run(*args, "-o", out, "--resume")
    assert result.exit_code == 0 and "2 already done" in result.stderr, result.output
    assert out.read_bytes() == full.read_bytes()
    assert read_index(out) == read_index(full)


def test_missing_extra_names_it(tmp_path, monkeypatch, tiny16, image_dir):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    result = run("embed", image_dir, "-o", tmp_path / "f.npy", "--weights", tiny16, "--precision", "int8")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ['Error: --precision int8 needs LiteRT: pip install "vggembed[int8]"']
    assert not (tmp_path / "f.npy").exists()


@pytest.mark.skipif(not HAVE_LITERT, reason="needs ai-edge-litert (the missing-extra message comes first)")
def test_cpu_without_vnni_is_refused(tmp_path, monkeypatch, tiny16, image_dir):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n")
    monkeypatch.setattr(int8, "CPUINFO", str(fake))
    result = run("classify", image_dir, "--weights", tiny16, "--precision", "int8")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "lacks int8 dot-product instructions (AVX512_VNNI, AVX_VNNI or AMX_INT8)" in line
    fake.write_text("flags\t\t: fpu avx2 avx_vnni\n")  # Alder Lake and later: AVX-VNNI without AVX-512
    assert int8.cpu_has_int8_dot()


# -------------------------------------------------------------------- Ray
@needs_int8
def test_ray_engine_int8_equals_local_int8(tmp_path, tiny16, photos, int8_cache, m8):
    ray = pytest.importorskip("ray")
    folder = tmp_path / "imgs"
    synthetic.photo_crops(photos[0], folder, 12, size=(40, 30), suffix=".jpg")
    (folder / "img000005.jpg").write_bytes(b"")
    local = tmp_path / "local.npy"
    assert run("embed", folder, "-o", local, "--weights", tiny16, "--precision", "int8",
               "--batch-size", 4).exit_code == 3
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,  # ours, not another's
             runtime_env={"env_vars": {"VGGEMBED_HOME": str(int8_cache)}})
    try:
        parts = tmp_path / "parts"
        result = run("embed", folder, "-o", parts, "--engine", "ray", "--weights", tiny16, "--precision", "int8",
                     "--batch-size", 4, "--part-size", 5, "--workers", 2)
        assert result.exit_code == 3, result.output
    finally:
        ray.shutdown()
    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    np.testing.assert_array_equal(np.load(merged), np.load(local))
    assert read_index(merged) == read_index(local)


@needs_int8
@pytest.mark.parametrize("layout", ["matconvnet", "matconvnet-beta16"])
def test_vgg19_from_both_mat_layouts_runs_int8(tiny, layout, photos):
    """VGG19's 16 convolutions all become int8, and its vectors stay close to float32's, from either .mat layout."""
    path = tiny["vgg19", layout]
    m8, m32 = vggembed.load(path, precision="int8"), vggembed.load(path)
    ours, exact = m8.embed(photos, layer="fc2", batch_size=4), m32.embed(photos, layer="fc2", batch_size=4)
    assert min(cosine(a, b) for a, b in zip(ours, exact)) > 0.98
    names = [op["op_name"] for op in m8._interpreters[(("relu7", None),)]._get_ops_details()]
    assert names.count("CONV_2D") == 16 and names.count("FULLY_CONNECTED") == 2


@needs_int8
def test_a_cached_int8_run_never_imports_tensorflow(tmp_path, tiny16, photos):
    """With TensorFlow made unimportable, the CLI converts (no converter: vggembed writes the model) and then
    classifies from the cache; a corrupt cache entry is rebuilt the same way."""
    import subprocess

    stub = tmp_path / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("tensorflow is not importable in this test")\n')
    env = {**os.environ, "VGGEMBED_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(stub.parent)] + sys.path)}

    def classify():
        return subprocess.run([sys.executable, "-m", "vggembed", "classify", str(photos[0]), "--weights", str(tiny16),
                               "--precision", "int8", "--format", "json"], env=env, capture_output=True, text=True,
                              timeout=300)

    first = classify()
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr and "cached as" in first.stderr
    cached = classify()
    assert cached.returncode == 0, cached.stderr
    assert "converting" not in cached.stderr and cached.stdout == first.stdout
    assert len(json.loads(cached.stdout)[0]["predictions"]) == 5
    (model,) = (tmp_path / "home" / "int8").glob("*.tflite")
    model.write_bytes(model.read_bytes()[:1000])  # cut short
    rebuilt = classify()
    assert rebuilt.returncode == 0 and "corrupt" in rebuilt.stderr and rebuilt.stdout == first.stdout


def _converter_model(m, body, pool, plan):
    """What RECIPE_VERSION 2 did: the float network written with the plan's quantization as fake-quant ops,
    turned into int8 kernels by TensorFlow's TFLite converter (tests only: vggembed no longer uses it)."""
    import tensorflow as tf

    from vggembed.net.model import _pooled

    def fq(x, span):
        lo, hi = min(span[0], 0.0), max(span[1], 0.0)
        if hi - lo < 1e-6:
            hi = lo + 1e-6
        return tf.quantization.fake_quant_with_min_max_args(x, min=lo, max=hi, num_bits=8)

    def layer_op(layer, x):
        if layer.kind in ("conv", "fc"):
            w, b = int8._rounded(*plan["weights"][layer.name]), plan["biases"][layer.name]
            if layer.kind == "conv":
                return tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)
            if layer.name == "fc6":
                x = tf.reshape(x, [tf.shape(x)[0], -1])
            return tf.nn.bias_add(tf.matmul(x, w), b)
        if layer.kind == "relu":
            return fq(tf.nn.relu(x), plan["ranges"][layer.name])
        return tf.nn.max_pool2d(x, 2, 2, "SAME")

    mean = tf.constant(np.asarray(m.spec.mean_pixel, np.float32).reshape(1, 1, 1, 3))
    layers = m.layers[: max(m._index[n] for n in body) + 1]

    def forward(x):
        x = fq(fq(x, int8.INPUT_RANGE) - mean, int8._centred_range(m.spec.mean_pixel))
        out = {}
        for layer in layers:
            x = layer_op(layer, x)
            if layer.name in body:
                if layer.kind in ("conv", "fc"):
                    x = fq(x, plan["ranges"][layer.name])
                out[layer.name] = x
                if pool is not None and len(x.shape) == 4:
                    out[layer.name] = fq(_pooled(x, pool), plan["ranges"][f"{layer.name}/{pool}"])
        return [out[name] for name in body]

    fn = tf.function(forward, input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


@needs_int8
@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")  # the input is quantized in the graph
@pytest.mark.parametrize("body, pool", [(("relu7",), None), (("conv5_3", "pool5", "relu6", "relu7"), "avg"),
                                        (("conv2_2", "relu2_2"), "max"), (("fc6", "relu7"), None)])
def test_the_written_model_computes_what_the_converter_made_of_the_same_plan(m8, photos, body, pool):
    """Bit for bit: the same ops, scales, zero points and int32 biases as TensorFlow's converter chose for the
    network written with fake-quant ranges (including its second fc layer where one is wanted before its ReLU)."""
    from ai_edge_litert.interpreter import Interpreter

    pairs = tuple((name, pool) for name in body)
    plan = m8.calibrate(pairs)
    batch = np.stack([prepare(p) for p in photos]).astype(np.float32)

    def outputs(content):
        interpreter = Interpreter(model_content=bytes(content))
        x = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(x["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(x["index"], batch)
        interpreter.invoke()
        return [interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details()]

    ours, theirs = outputs(int8.write_model(m8.spec, pairs, plan)), outputs(_converter_model(m8, body, pool, plan))
    assert len(ours) == len(theirs) == len(body)
    for name, a, b in zip(body, ours, theirs):
        np.testing.assert_array_equal(a, b.reshape(a.shape), err_msg=name)
