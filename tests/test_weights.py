"""Readers: every layout gives the same canonical arrays; every bad file a clear error."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from vggembed.net import synthetic
from vggembed.errors import LayerError, WeightFileError
from vggembed.net.labels import LabelFileError, read_labels
from vggembed.net.readers import ALIGN
from vggembed.net.weights import load_weights

from .conftest import LABELS, TINY_CLASSES


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
@pytest.mark.parametrize("layout", ["frossard", "matconvnet", "matconvnet-beta16"])
def test_every_layout_reads_back_the_written_arrays(tiny, tiny_params, arch, layout):
    params, spec = load_weights(tiny[arch, layout])
    assert spec.arch == arch and spec.layout == layout
    assert sorted(params) == sorted(tiny_params[arch])
    for name, (w, b) in tiny_params[arch].items():
        np.testing.assert_array_equal(params[name][0], w, err_msg=name)
        np.testing.assert_array_equal(params[name][1], b, err_msg=name)
        for a in params[name]:  # what TensorFlow can adopt without a copy
            assert a.dtype == np.float32 and a.flags.c_contiguous and a.ctypes.data % ALIGN == 0, name
    np.testing.assert_allclose(spec.mean_pixel, (123.68, 116.779, 103.939), rtol=1e-6)
    assert spec.input_size == (224, 224) and spec.has_fc and spec.fc_sizes == (32, 32, TINY_CLASSES)
    if layout != "frossard":
        assert spec.labels == LABELS and spec.labels_source == "the .mat file"


@pytest.mark.parametrize("layout", ["frossard", "matconvnet"])
def test_reading_some_layers_gives_those_arrays_and_the_whole_spec(tiny, tiny_params, layout):
    """What a cached int8 run reads: fc8 only, with the spec (widths, classes) of the whole file."""
    full, spec = load_weights(tiny["vgg16", layout])
    some, spec_some = load_weights(tiny["vgg16", layout], layers=("fc8",))
    assert list(some) == ["fc8"]
    for a, b in zip(some["fc8"], full["fc8"]):
        np.testing.assert_array_equal(a, b)
    assert spec_some == spec


def test_reading_some_layers_still_checks_every_shape(tmp_path, tiny_params):
    params = dict(tiny_params["vgg16"])
    w, b = params["conv2_1"]
    params["conv2_1"] = (w[:, :, :2], b)  # does not fit conv1_2's output
    path = synthetic.write_npz(params, tmp_path / "bad.npz")
    with pytest.raises(WeightFileError, match="conv2_1 has shape"):
        load_weights(path, layers=("fc8",))


def test_beta16_mean_is_the_mean_of_the_average_image(tmp_path, tiny_params):
    path = synthetic.write_mat(tiny_params["vgg16"], tmp_path / "m.mat", layout="matconvnet-beta16",
                               mean=(100.0, 110.0, 120.0))
    _, spec = load_weights(path)
    np.testing.assert_allclose(spec.mean_pixel, (100.0, 110.0, 120.0))


def test_legacy_transpose_swaps_conv_kernel_axes_only(tiny, tiny_params):
    params, spec = load_weights(tiny["vgg19", "matconvnet-beta16"], legacy_transpose=True)
    assert spec.legacy_transpose
    np.testing.assert_array_equal(params["conv2_1"][0], tiny_params["vgg19"]["conv2_1"][0].transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(params["fc7"][0], tiny_params["vgg19"]["fc7"][0])


def test_conv_only_file_serves_conv_layers_and_refuses_fc(tmp_path, photos):
    import vggembed

    params = synthetic.make_params("vgg16", (4, 4, 8, 8, 8), fc=None)
    path = synthetic.write_npz(params, tmp_path / "convonly.npz")
    m = vggembed.load(path)
    assert not m.spec.has_fc
    assert m.embed(photos[:1], layer="pool5", pool="avg").shape == (1, 8)
    with pytest.raises(LayerError, match="no fully connected layers.*'fc2'"):
        m.embed(photos[:1], layer="fc2")
    with pytest.raises(LayerError, match="cannot compute 'prob'"):
        m.classify(photos[:1])


# ------------------------------------------------------------------ labels
def test_labels_found_beside_npz_in_frossard_form_never_executed(tmp_path, tiny_params):
    names = [f"name {i}, alias" for i in range(TINY_CLASSES)]
    marker = tmp_path / "executed"
    (tmp_path / "imagenet_classes.py").write_text(
        f"open({str(marker)!r}, 'w')\nclass_names = '''" + "\n".join(names) + "'''.split(\"\\n\")\n")
    path = synthetic.write_npz(tiny_params["vgg16"], tmp_path / "w.npz")
    _, spec = load_weights(path)
    assert spec.labels == names and spec.labels_source.endswith("imagenet_classes.py")
    assert not marker.exists()


@pytest.mark.parametrize("name,text,expected", [
    ("synset_words.txt", "n01440764 tench, Tinca tinca\nn01443537 goldfish\n", ["tench, Tinca tinca", "goldfish"]),
    ("imagenet_class_index.json", '{"1": ["n01443537", "goldfish"], "0": ["n01440764", "tench"]}',
     ["tench", "goldfish"]),
    ("labels.txt", "cat\ndog\n\n", ["cat", "dog"]),
    ("list.py", "class_names = ['cat', 'dog']", ["cat", "dog"]),
    ("dict.py", "class_names = {1: 'dog', 0: 'cat'}", ["cat", "dog"]),
])
def test_label_formats(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    assert read_labels(tmp_path / name) == expected


def test_label_count_must_match_classes(tmp_path, tiny16):
    (tmp_path / "labels.txt").write_text("only\ntwo\n")
    with pytest.raises(WeightFileError, match="has 10 classes but the labels from .*labels.txt number 2"):
        load_weights(tiny16, labels=tmp_path / "labels.txt")


def test_python_labels_that_are_not_literals_are_refused(tmp_path):
    (tmp_path / "c.py").write_text("import os\nclass_names = os.listdir('.')\n")
    with pytest.raises(LabelFileError, match="not a literal"):
        read_labels(tmp_path / "c.py")


# --------------------------------------------------------------- bad files
def _npz(tmp_path, arrays, name="bad.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _arrays(arch="vgg16"):
    params = synthetic.make_params(arch, (4, 4, 8, 8, 8), fc=16, classes=5)
    return {f"{n}_{s}": a for n, (w, b) in params.items() for s, a in (("W", w), ("b", b))}


def test_missing_file(tmp_path):
    with pytest.raises(WeightFileError, match=r"nope\.npz: no such file"):
        load_weights(tmp_path / "nope.npz")


def test_truncated_npz(tmp_path):
    good = _npz(tmp_path, _arrays(), "good.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightFileError, match=r"cut\.npz: .*(truncated or corrupt)"):
        load_weights(cut)


def test_random_bytes_named_npz(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightFileError, match=r"noise\.npz: not a zip archive"):
        load_weights(path)


def test_wrong_keys_are_named(tmp_path):
    path = _npz(tmp_path, {"weights": np.zeros(3, np.float32)})
    with pytest.raises(WeightFileError, match=r"holds no VGG conv layers .* found: weights"):
        load_weights(path)


def test_missing_keys_are_named(tmp_path):
    arrays = _arrays()
    del arrays["conv4_2_W"], arrays["fc7_b"]
    with pytest.raises(WeightFileError, match=r"missing keys for vgg16: conv4_2_W, fc7_b"):
        load_weights(_npz(tmp_path, arrays))


def test_wrong_shape_names_key_expected_and_found(tmp_path):
    arrays = _arrays()
    arrays["conv2_1_W"] = np.zeros((3, 3, 5, 8), np.float32)
    with pytest.raises(WeightFileError, match=r"conv2_1 has shape \(3, 3, 5, 8\); expected \(3, 3, 4, \*\)"):
        load_weights(_npz(tmp_path, arrays))


def test_wrong_fc6_shape(tmp_path):
    arrays = _arrays()
    arrays["fc6_W"] = np.zeros((100, 16), np.float32)
    with pytest.raises(WeightFileError, match=r"fc6 has shape \(100, 16\); expected \(392, \*\)"):
        load_weights(_npz(tmp_path, arrays))


def test_npz_that_needs_pickle_is_refused(tmp_path):
    arrays = _arrays()
    arrays["conv1_1_W"] = np.array([None, 1], dtype=object)
    with pytest.raises(WeightFileError, match=r"conv1_1_W is stored as Python objects and needs pickle"):
        load_weights(_npz(tmp_path, arrays))


def test_npz_member_corrupt(tmp_path):
    path = _npz(tmp_path, _arrays())
    # Overwrite the stored bytes of one member: the zip directory stays intact.
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("conv3_1_W.npy")
    name_len, extra_len = np.frombuffer(bytes(data[info.header_offset + 26: info.header_offset + 30]), "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len) + 200  # inside the array's values
    data[start: start + 8] = b"garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match=r"bad\.npz: (array conv3_1_W|not a readable)"):
        load_weights(path)


def test_unknown_mat_layout(tmp_path):
    import scipy.io

    path = tmp_path / "other.mat"
    scipy.io.savemat(path, {"net": np.zeros(3)})
    with pytest.raises(WeightFileError, match=r"other\.mat: unknown \.mat layout: top-level variables are \['net'\]"):
        load_weights(path)


def test_truncated_mat(tmp_path, tiny):
    good = tiny["vgg19", "matconvnet"]
    cut = tmp_path / "cut.mat"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(WeightFileError, match=r"cut\.mat: not a readable MATLAB \.mat file"):
        load_weights(cut)


def test_mat_missing_layer_fields_named(tmp_path):
    import scipy.io

    layers = np.empty((1, 1), dtype=object)
    layers[0, 0] = {"type": "conv", "name": "conv1_1"}
    path = tmp_path / "nofield.mat"
    scipy.io.savemat(path, {"layers": layers, "meta": {"normalization": {"averageImage": np.ones(3)}}})
    with pytest.raises(WeightFileError, match=r"conv1_1 has no weights field"):
        load_weights(path)


def test_folder_is_not_a_weight_file(tmp_path):
    with pytest.raises(WeightFileError, match="is a folder"):
        load_weights(tmp_path)


def test_compressed_npz_reads_the_same(tmp_path, tiny_params):
    params = tiny_params["vgg16"]
    path = tmp_path / "c.npz"
    np.savez_compressed(path, **{f"{n}_{s}": a for n, (w, b) in params.items() for s, a in (("W", w), ("b", b))})
    got, _ = load_weights(path)
    for name, (w, b) in params.items():
        np.testing.assert_array_equal(got[name][0], w)
        np.testing.assert_array_equal(got[name][1], b)
