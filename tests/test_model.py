"""The network: exact against independent implementations, every layer by name, any input size."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import vggembed
from vggembed.net import arch
from vggembed.net import synthetic
from vggembed.errors import LayerError
from vggembed.images.decode import prepare
from vggembed.net.tfimport import cpu_has_native_bf16


def numpy_vgg(params, spec, x):
    """An independent forward pass in plain numpy: {canonical name: output}."""
    out = {}
    x = x.astype(np.float64) - np.asarray(spec.mean_pixel, np.float64)
    for layer in arch.layers(spec.arch):
        if layer.param and layer.param not in params:
            break
        if layer.kind == "conv":
            w, b = (a.astype(np.float64) for a in params[layer.name])
            padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            h, wd = x.shape[1:3]
            x = sum(np.einsum("nhwc,co->nhwo", padded[:, i:i + h, j:j + wd], w[i, j])
                    for i in range(3) for j in range(3)) + b
        elif layer.kind == "relu":
            x = np.maximum(x, 0)
        elif layer.kind == "pool":
            n, h, wd, c = x.shape
            padded = np.pad(x, ((0, 0), (0, h % 2), (0, wd % 2), (0, 0)), constant_values=-np.inf)
            x = padded.reshape(n, (h + 1) // 2, 2, (wd + 1) // 2, 2, c).max(axis=(2, 4))
        elif layer.kind == "fc":
            w, b = (a.astype(np.float64) for a in params[layer.name])
            x = x.reshape(len(x), -1) @ w + b
        else:
            e = np.exp(x - x.max(axis=1, keepdims=True))
            x = e / e.sum(axis=1, keepdims=True)
        out[layer.name] = x
    return out


def test_tiny_network_matches_numpy_reference(tiny, tiny_params, photos):
    m = vggembed.load(tiny["vgg19", "matconvnet"])
    batch = np.stack([prepare(p) for p in photos[:2]]).astype(np.float32)
    ref = numpy_vgg(tiny_params["vgg19"], m.spec, batch)
    names = ["conv1_1", "relu3_4", "pool5", "fc6", "relu7", "fc8", "prob"]
    got = m.run(batch, names)
    for name in names:
        scale = np.abs(ref[name]).max()
        assert np.abs(got[name] - ref[name]).max() <= 1e-4 * scale, name


def test_network_holds_loaded_weights_in_place_and_copies_other_arrays(tiny, tiny_params, photos):
    path = tiny["vgg16", "frossard"]
    params, spec = vggembed.load_weights(path)
    m = vggembed.VGG(params, spec)
    w = params["conv1_1"][0]
    assert not w.flags.writeable  # the network uses this memory: it must not change under it
    tensor = m._params["conv1_1"][0]
    assert np.from_dlpack(tensor).ctypes.data == w.ctypes.data

    # Arrays a caller built (misaligned, Fortran-ordered, float64) are copied, with the same results.
    own = {}
    for name, (w, b) in tiny_params["vgg16"].items():
        shifted = np.empty(w.size + 1, np.float32)[1:].reshape(w.shape)
        shifted[...] = w
        own[name] = (np.asfortranarray(shifted), b.astype(np.float64))
    batch = np.stack([prepare(p) for p in photos[:2]]).astype(np.float32)
    expected = m.run(batch, ["prob"])["prob"]
    np.testing.assert_array_equal(vggembed.VGG(own, spec).run(batch, ["prob"])["prob"], expected)
    assert own["conv1_1"][0].flags.writeable
    # A second network from the same (now read-only) arrays takes its own copy.
    np.testing.assert_array_equal(vggembed.VGG(params, spec).run(batch, ["prob"])["prob"], expected)
    # A converted copy (bf16) leaves the caller's array alone.
    fresh, _ = vggembed.load_weights(path)
    if cpu_has_native_bf16():
        vggembed.VGG(fresh, spec, precision="bf16")
        assert fresh["conv1_1"][0].flags.writeable


def test_odd_size_pooling_rounds_up_like_caffe(tiny, tiny_params):
    m = vggembed.load(tiny["vgg16", "frossard"])
    x = np.random.default_rng(0).uniform(0, 255, (1, 75, 101, 3)).astype(np.float32)
    conv_params = {k: v for k, v in tiny_params["vgg16"].items() if not k.startswith("fc")}
    ref = numpy_vgg(conv_params, m.spec, x)
    got = m.run(x, ["pool5"])["pool5"]
    assert got.shape == (1, 3, 4, 16) == ref["pool5"].shape
    np.testing.assert_allclose(got, ref["pool5"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("size", [(224, 224), (375, 500)])
@pytest.mark.parametrize("which", ["vgg16", "vgg19"])
def test_every_named_layer_has_its_shape(tiny, which, size):
    m = vggembed.load(tiny[which, "matconvnet"])
    h, w = size
    x = np.zeros((2, h, w, 3), np.float32)
    conv_part = [n for n in m.layer_names if not arch.is_head(n)]
    out = m.run(x, conv_part)
    for name in conv_part:
        assert out[name].shape == (2,) + m.output_shape(name, h, w), name
    assert out["conv1_1"].shape == (2, h, w, 4)
    assert out["pool5"].shape == (2, -(-h // 32), -(-w // 32), 16)
    head = [n for n in m.layer_names if arch.is_head(n)] + ["fc1", "fc2", "fc3l", "probs"]
    if size == (224, 224):
        out = m.features(x, head)
        for name in head:
            assert out[name].shape == (2, 10 if name in ("fc8", "prob", "fc3l", "probs") else 32), name
    else:
        with pytest.raises(LayerError, match=r"layer fc6 needs 224x224 input .* got 500x375"):
            m.run(x, ["fc6"])


def test_aliases_name_the_same_tensors(tiny_model, photos):
    f = tiny_model.features(photos[:2], ["fc1", "relu6", "fc2", "relu7", "fc3l", "fc8", "probs", "prob", "fc7"])
    np.testing.assert_array_equal(f["fc1"], f["relu6"])
    np.testing.assert_array_equal(f["fc2"], f["relu7"])
    np.testing.assert_array_equal(f["fc3l"], f["fc8"])
    np.testing.assert_array_equal(f["probs"], f["prob"])
    assert (f["fc7"] < 0).any(), "as a layer, fc7 is the pre-ReLU output"
    # As an embedding, fc7 is Caffe's in-place-ReLU blob: the same as fc2.
    np.testing.assert_array_equal(tiny_model.embed(photos[:2], "fc7"), f["fc2"])
    np.testing.assert_array_equal(tiny_model.embed(photos[:2], "fc6"), f["fc1"])


def test_several_layers_in_one_run_equal_separate_runs(tiny_model, photos):
    both = tiny_model.features(photos[0], ["conv3_1", "fc2"])
    np.testing.assert_array_equal(both["conv3_1"], tiny_model.features(photos[0], ["conv3_1"])["conv3_1"])
    np.testing.assert_array_equal(both["fc2"], tiny_model.features(photos[0], "fc2")["fc2"])


def test_unknown_layer_lists_known_names(tiny_model):
    with pytest.raises(LayerError, match=r"vgg16 has no layer 'conv3_4'; known layers: conv1_1"):
        tiny_model.features(np.zeros((224, 224, 3)), ["conv3_4"])


def test_embed_pools_maps_and_normalises(tiny_model, photos):
    maps = tiny_model.features(photos[:2], ["conv5_3"])["conv5_3"]
    np.testing.assert_allclose(tiny_model.embed(photos[:2], "conv5_3", pool="avg"), maps.mean(axis=(1, 2)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(tiny_model.embed(photos[:2], "conv5_3", pool="max"), maps.max(axis=(1, 2)))
    np.testing.assert_array_equal(tiny_model.embed(photos[:2], "conv5_3", pool="flatten"), maps.reshape(2, -1))
    unit = tiny_model.embed(photos[:2], l2_normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-5)
    with pytest.raises(LayerError, match="3-D map per image; choose a pool"):
        tiny_model.embed(photos[:1], "pool5")


def test_embed_rows_follow_input_order_and_batching(tiny_model, photos):
    one_batch = tiny_model.embed(photos, batch_size=4)
    # A tail batch is padded to the batch size, so each row is computed alike.
    np.testing.assert_array_equal(tiny_model.embed(photos[:3], batch_size=4), one_batch[:3])
    np.testing.assert_array_equal(tiny_model.embed(photos[::-1], batch_size=4), one_batch[::-1])
    # Other batch sizes may pick other kernels: equal to float32 rounding.
    np.testing.assert_allclose(tiny_model.embed(photos, batch_size=3), one_batch, rtol=1e-5, atol=1e-5)


def test_one_graph_serves_every_batch_and_input_size(tiny, photos):
    """No retracing per batch: on a GPU each trace costs seconds and memory."""
    m = vggembed.load(tiny["vgg16", "frossard"])
    m.embed(photos * 3, batch_size=4)  # full batches and a padded short one
    m.run(np.zeros((1, 224, 224, 3), np.float32), ["relu7"])
    for shape in ((3, 75, 101, 3), (2, 224, 224, 3)):
        m.run(np.zeros(shape, np.float32), ["pool5"])
    traces = {key: fn.experimental_get_tracing_count() for key, fn in m._functions.items()}
    assert traces == {(("relu7", None),): 1, (("pool5", None),): 1}


def test_classify_returns_sorted_labelled_top_k(tiny, photos):
    m = vggembed.load(tiny["vgg19", "matconvnet-beta16"])
    preds = m.classify(photos[:2], top=3)
    probs = m.features(photos[:2], "prob")["prob"]
    for p, row in zip(preds, probs):
        assert [x.rank for x in p] == [1, 2, 3]
        assert [x.index for x in p] == list(np.argsort(row)[::-1][:3])
        assert p[0].label == f"label {p[0].index}"
        assert p[0].probability == pytest.approx(row.max())


def test_api_accepts_arrays_bytes_and_pil(tiny_model, photos):
    from PIL import Image

    path = photos[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    ref = tiny_model.embed([path])
    np.testing.assert_array_equal(tiny_model.embed([path.read_bytes()]), ref)
    np.testing.assert_array_equal(tiny_model.embed([Image.open(path)]), ref)
    np.testing.assert_array_equal(tiny_model.embed([rgb]), ref)
    # Float arrays are resized without rounding: within one grey level of the uint8 path.
    exact = prepare(rgb.astype(np.float32))
    assert exact.dtype == np.float32 and np.abs(exact - prepare(path)).max() < 1.0


# ------------------------------------------------------- full-size parity
def _keras_model(which, params):
    import keras

    model = (keras.applications.VGG16 if which == "vgg16" else keras.applications.VGG19)(weights=None)
    convs = arch.conv_names(which)
    dense = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}
    for layer in model.layers:
        if layer.name.startswith("block") and "conv" in layer.name:
            b, i = layer.name[5], layer.name.split("conv")[1]
            name = f"conv{b}_{i}"
            assert name in convs
            layer.set_weights(list(params[name]))
        elif layer.name in dense:
            layer.set_weights(list(params[dense[layer.name]]))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("which", ["vgg16", "vgg19"])
def test_full_size_parity_with_keras_and_across_formats(tmp_path, photos, which):
    """fc2 and probs agree with keras.applications given the same arrays and input;
    .npz, older .mat and newer .mat give identical outputs."""
    import keras

    params = synthetic.make_params(which, seed=7)
    files = [synthetic.write_npz(params, tmp_path / "w.npz"),
             synthetic.write_mat(params, tmp_path / "old.mat", layout="matconvnet-beta16"),
             synthetic.write_mat(params, tmp_path / "new.mat", layout="matconvnet")]
    batch = np.stack([prepare(p) for p in photos[:3]]).astype(np.float32)

    kmodel = _keras_model(which, params)
    del params
    probe = keras.Model(kmodel.input, [kmodel.get_layer("fc2").output, kmodel.output])
    k_fc2, k_probs = (np.asarray(a) for a in probe(batch - np.float32([123.68, 116.779, 103.939]), training=False))
    del kmodel, probe
    gc.collect()

    outputs = []
    for path in files:
        m = vggembed.load(path)
        out = m.run(batch, ["relu7", "prob"])
        outputs.append(out)
        del m
        gc.collect()
    for out in outputs:
        assert np.abs(out["relu7"] - k_fc2).max() <= 1e-4 * np.abs(k_fc2).max()
        assert np.abs(out["prob"] - k_probs).max() <= 1e-4 * np.abs(k_probs).max()
        for ours, theirs in zip(out["prob"], k_probs):
            assert list(np.argsort(ours)[::-1][:5]) == list(np.argsort(theirs)[::-1][:5])
    for other in outputs[1:]:
        np.testing.assert_array_equal(other["relu7"], outputs[0]["relu7"])
        np.testing.assert_array_equal(other["prob"], outputs[0]["prob"])


def test_precision_and_device_choices(tiny, tiny_params, photos):
    from vggembed.errors import VGGEmbedError
    from vggembed.net.model import VGG
    from vggembed.net.tfimport import cpu_has_native_bf16
    from vggembed.net.weights import load_weights

    params, spec = load_weights(tiny["vgg16", "frossard"])
    with pytest.raises(VGGEmbedError, match="fp16 runs on GPUs only"):
        VGG(params, spec, precision="fp16", device="cpu")
    if cpu_has_native_bf16():
        f32 = VGG(params, spec, device="cpu").embed(photos, batch_size=4)
        b16 = VGG(params, spec, precision="bf16", device="cpu").embed(photos, batch_size=4)
        assert b16.dtype == np.float32
        cos = (f32 * b16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(b16, axis=1)
        assert cos.min() > 0.99
    else:
        with pytest.raises(VGGEmbedError, match="lacks native bf16"):
            VGG(params, spec, precision="bf16", device="cpu")
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        with pytest.raises(VGGEmbedError, match="--device gpu: TensorFlow sees no GPU"):
            VGG(params, spec, device="gpu")
