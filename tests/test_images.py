"""Decoding: every mode people have becomes correct RGB; every bad file a one-line error."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from vggembed.errors import ImageError
from vggembed.images.decode import load_rgb, prepare


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_grayscale_becomes_three_equal_channels(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    rgb = np.asarray(load_rgb(_save(Image.fromarray(grey, "L"), tmp_path / "g.png")))
    assert rgb.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey)


def test_alpha_is_dropped_like_the_seeds_imread(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    out = np.asarray(load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    np.testing.assert_array_equal(out, rgba[..., :3])
    la = Image.fromarray(rgba[..., :2].copy(), "LA")
    out = np.asarray(load_rgb(_save(la, tmp_path / "la.png")))
    np.testing.assert_array_equal(out[..., 1], rgba[..., 0])


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    out = np.asarray(load_rgb(_save(img, tmp_path / "p.png", transparency=0)))
    assert out.shape == (4, 4, 3) and (out == [200, 100, 50]).all()


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_rgb(path))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 128, 255]])
    # What a plain convert('RGB') gives: everything above 255 becomes white.
    assert (np.asarray(Image.open(path).convert("RGB"))[0, 1:, 0] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    path = _save(img, tmp_path / "phone.jpg", exif=exif, quality=95)
    out = np.asarray(load_rgb(path))
    assert out.shape == (40, 20, 3)
    assert out[2, 10, 2] > 200 and out[-3, 10, 0] > 200  # blue now on top


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in ink
    out = np.asarray(load_rgb(_save(cmyk, tmp_path / "c.jpg")))
    assert out.shape == (8, 8, 3) and out[..., 0].min() > 200 and out[..., 1:].max() < 60


def test_extension_that_lies_is_ignored(tmp_path, photos):
    path = tmp_path / "really_png.jpg"
    path.write_bytes(photos[0].read_bytes())
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), np.asarray(Image.open(photos[0]).convert("RGB")))


@pytest.mark.parametrize("name,content,message", [
    ("empty.jpg", b"", "empty file (0 bytes)"),
    ("text.png", b"hello, not an image\n" * 10, "not an image Pillow can identify"),
])
def test_unreadable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=re.escape(f"{name}: {message}")):
        load_rgb(path)


def test_truncated_jpeg(tmp_path, photos):
    buf = io.BytesIO()
    Image.open(photos[3]).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: ends inside its image data with no end-of-image marker"):
        load_rgb(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="gone.jpg: no such file"):
        load_rgb(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_rgb(tmp_path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = _save(Image.new("1", (12000, 12000)), tmp_path / "bomb.png")  # 144 Mpx, a few KB on disk
    with pytest.raises(ImageError, match=r"bomb\.png: (12000x12000 is 144000000 pixels, over the limit|"
                                         r"decompression bomb)"):
        load_rgb(path)
    with pytest.raises(ImageError, match=r"100x100 is 10000 pixels, over the limit of 5000 .*--max-pixels"):
        load_rgb(_save(Image.new("RGB", (100, 100)), tmp_path / "small.png"), max_pixels=5000)


def test_resize_policies(photos):
    img = Image.open(photos[0]).convert("RGB")  # 451x300
    squash = prepare(photos[0], resize_mode="squash")
    np.testing.assert_array_equal(squash, np.asarray(img.resize((224, 224), Image.BILINEAR)))
    crop = prepare(photos[0], resize_mode="center-crop")
    resized = img.resize((385, 256), Image.BILINEAR)  # short side 256, aspect kept
    np.testing.assert_array_equal(crop, np.asarray(resized)[16:240, 80:304])
    assert prepare(photos[0], resize_mode="none").shape == (300, 451, 3)


def test_fast_decode_stays_close_on_large_jpeg(tmp_path, photos):
    big = Image.open(photos[0]).convert("RGB").resize((1804, 1200), Image.BICUBIC)
    path = _save(big, tmp_path / "big.jpg", quality=92)
    exact = prepare(path).astype(np.float32)
    fast = prepare(path, fast_decode=True).astype(np.float32)
    assert fast.shape == exact.shape == (224, 224, 3)
    assert np.abs(fast - exact).mean() < 4.0  # grey levels out of 255
