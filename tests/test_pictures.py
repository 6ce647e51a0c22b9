"""`vggembed maps` and `vggembed plot`: geometry, content, saved tensors, the seed's legacy maps."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image

import vggembed
from vggembed.cli import main
from vggembed.use.pictures import grid_geometry, panel_size

SEED_VGG19 = (
    "conv1_1 relu1_1 conv1_2 relu1_2 pool1 conv2_1 relu2_1 conv2_2 relu2_2 pool2 "
    "conv3_1 relu3_1 conv3_2 relu3_2 conv3_3 relu3_3 conv3_4 relu3_4 pool3 "
    "conv4_1 relu4_1 conv4_2 relu4_2 conv4_3 relu4_3 conv4_4 relu4_4 pool4 "
    "conv5_1 relu5_1 conv5_2 relu5_2 conv5_3 relu5_3 conv5_4 relu5_4").split()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def panels(img: Image.Image, count, cols, size):
    from vggembed.use.pictures import GAP, TITLE_HEIGHT

    arr = np.asarray(img)
    out = []
    for i in range(count):
        x = GAP + (i % cols) * (size[0] + GAP)
        y = GAP + (i // cols) * (size[1] + TITLE_HEIGHT + GAP) + TITLE_HEIGHT
        out.append(arr[y: y + size[1], x: x + size[0]])
    return out


@pytest.mark.parametrize("which,count", [("vgg19", 36), ("vgg16", 30)])
def test_all_layers_grid_geometry_and_distinct_panels(tmp_path, tiny, photos, which, count):
    out = tmp_path / "maps.png"
    result = run("maps", photos[0], "-o", out, "--weights", tiny[which, "matconvnet"], "--panel-width", 120)
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    size = panel_size(300, 451, 120)  # chelsea.png is 451x300, run at its own size
    assert img.size == grid_geometry(count, 9, size)
    cells = panels(img, count, 9, size)
    assert len({c.tobytes() for c in cells}) == count, "every panel shows a different map"
    assert all(c.std() > 0 for c in cells[:5])


def test_save_npy_equals_api_features(tmp_path, tiny, photos):
    weights = tiny["vgg19", "matconvnet-beta16"]
    layers = ["conv1_1", "relu2_1", "pool3", "relu5_4"]
    result = run("maps", photos[1], "-o", tmp_path / "m.png", "--weights", weights, "--layers", ",".join(layers),
                 "--channel", "strongest", "--save-npy", tmp_path / "npy")
    assert result.exit_code == 0, result.output
    ref = vggembed.load(weights).features(photos[1], layers, resize="none")
    for name in layers:
        saved = np.load(tmp_path / "npy" / f"{name}.npy")
        assert saved.dtype == np.float32 and saved.shape == ref[name].shape
        np.testing.assert_allclose(saved, ref[name], rtol=1e-5, atol=1e-5)
    assert Image.open(tmp_path / "m.png").size == grid_geometry(4, 4, panel_size(400, 600, 240))


def seed_vgg19_maps(path, image):
    """The VGG19 tutorial's own code path: positional struct indexing, (1,0,2,3) transpose."""
    import tensorflow as tf

    data = scipy.io.loadmat(path)
    mean_pixel = np.mean(data["normalization"][0][0][0], axis=(0, 1))
    weights = data["layers"][0]
    current = tf.constant(np.array([image - mean_pixel]), tf.float32)
    net = {}
    for i, name in enumerate(SEED_VGG19):
        kind = name[:4]
        if kind == "conv":
            kernels, bias = weights[i][0][0][0][0]
            kernels = np.transpose(kernels, (1, 0, 2, 3))
            current = tf.nn.bias_add(tf.nn.conv2d(current, tf.constant(kernels), (1, 1, 1, 1), "SAME"),
                                     bias.reshape(-1))
        elif kind == "relu":
            current = tf.nn.relu(current)
        else:
            current = tf.nn.max_pool(current, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
        net[name] = current.numpy()
    return net


def test_legacy_transpose_reproduces_the_seeds_maps(tmp_path, tiny, photos):
    path = tiny["vgg19", "matconvnet-beta16"]
    image = np.asarray(Image.open(photos[0]).convert("RGB"), dtype=np.float64)
    seed = seed_vgg19_maps(path, image)
    legacy = vggembed.load(path, legacy_transpose=True).features(photos[0], SEED_VGG19, resize="none")
    exact = vggembed.load(path).features(photos[0], ["conv1_1", "relu5_4"], resize="none")
    for name in SEED_VGG19:
        scale = np.abs(seed[name]).max()
        assert np.abs(legacy[name] - seed[name]).max() <= 1e-4 * scale, name
    assert not np.allclose(exact["conv1_1"], seed["conv1_1"], rtol=1e-3), "the default reads kernels as stored"


def test_channel_montage(tmp_path, tiny, photos):
    out = tmp_path / "grid.png"
    result = run("maps", photos[0], "--layer", "conv3_1", "--channels", 64, "-o", out,
                 "--weights", tiny["vgg19", "matconvnet"])
    assert result.exit_code == 0, result.output
    # the tiny conv3_1 has 8 channels: all of them, in a 3x3 grid
    size = panel_size(75, 113, 128)
    assert Image.open(out).size == grid_geometry(8, 3, size)
    assert len({c.tobytes() for c in panels(Image.open(out), 8, 3, size)}) == 8


def test_plot_draws_one_bar_per_dimension(tmp_path, tiny16, photos, tiny_model):
    out = tmp_path / "fc2.png"
    result = run("plot", photos[0], "-o", out, "--weights", tiny16)
    assert result.exit_code == 0 and "32 bars" in result.stderr
    img = np.asarray(Image.open(out).convert("RGB"))
    vector = tiny_model.embed([photos[0]], batch_size=1)[0]
    blue = (img == [0x1F, 0x77, 0xB4]).all(axis=2)
    columns = blue.any(axis=0)
    runs = np.flatnonzero(np.diff(columns.astype(int)) == 1).size + int(columns[0])
    # adjacent non-zero bars touch, so count groups of consecutive non-zero dimensions
    groups = np.flatnonzero(np.diff((vector > 0).astype(int)) == 1).size + int(vector[0] > 0)
    assert runs == groups > 0


def test_too_large_image_is_refused_with_the_limit(tmp_path, tiny, photos):
    result = run("maps", photos[0], "-o", tmp_path / "m.png", "--weights", tiny["vgg19", "matconvnet"],
                 "--max-memory", 0.001)
    assert result.exit_code == 1
    assert "451x300 needs about" in result.stderr and "--max-memory" in result.stderr
    assert not (tmp_path / "m.png").exists()
    shrunk = run("maps", photos[0], "-o", tmp_path / "m.png", "--weights", tiny["vgg19", "matconvnet"],
                 "--max-side", 100, "--layers", "conv1_1")
    assert shrunk.exit_code == 0 and "at 100x67" in shrunk.stderr


def test_fc_layers_are_not_maps(tmp_path, tiny16, photos):
    result = run("maps", photos[0], "-o", tmp_path / "m.png", "--weights", tiny16, "--layers", "fc2")
    assert result.exit_code == 1 and "fully connected" in result.stderr
