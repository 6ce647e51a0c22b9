"""A hostile world of files: cut and forged images, special files, float images,
weight files that lie about their sizes, malformed label files.

Anything that could hang runs in a subprocess with a timeout, so a regression
fails instead of hanging the suite.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vggembed.errors import ImageError
from vggembed.images import load_rgb, prepare

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (vggembed importable); a hang fails the test."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s")


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def scan_start(data: bytes) -> int:
    """Offset of the first byte of entropy-coded data after the first SOS header."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2: sos + 4])[0]


def with_declared_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header claiming width x height."""
    sof = data.index(b"\xff\xc0") if b"\xff\xc0" in data else data.index(b"\xff\xc2")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


@pytest.fixture(scope="module")
def grace(photos) -> Image.Image:
    return Image.open(photos[3]).convert("RGB")


# --- truncated and forged JPEGs -------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True])
def test_header_only_jpeg_is_a_failed_row(tmp_path, grace, progressive):
    data = jpeg_bytes(grace, progressive=progressive)
    path = tmp_path / "header.jpg"
    path.write_bytes(data[: scan_start(data)] + b"\xff\xd9")  # SOS, then at once the end marker
    with pytest.raises(ImageError, match=r"header\.jpg: .*(holds 0 bytes of image data|stops before its last scan)"):
        load_rgb(path)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_jpeg_cut_and_given_back_its_end_marker_is_a_failed_row(tmp_path, grace, fraction):
    data = jpeg_bytes(grace)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * fraction)] + b"\xff\xd9")
    with pytest.raises(ImageError, match=r"cut\.jpg: JPEG image data stops early"):
        load_rgb(path)
    with pytest.raises(ImageError, match="stops early"):
        load_rgb(path, draft=(64, 64))  # --fast-decode


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9])
def test_progressive_jpeg_cut_anywhere_is_a_failed_row(grace, fraction):
    data = jpeg_bytes(grace, progressive=True)
    with pytest.raises(ImageError, match="stops (early|before its last scan)"):
        load_rgb(data[: int(len(data) * fraction)] + b"\xff\xd9")


def test_cut_jpeg_is_refused_even_when_pillow_is_told_to_load_truncated_images(grace, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library in the process may set
    data = jpeg_bytes(grace)
    with pytest.raises(ImageError, match="no end-of-image marker"):
        load_rgb(data[: len(data) // 2])


def test_complete_jpegs_of_every_kind_still_decode(photos):
    """No false alarm: real photos and flat pictures (the hardest case for the
    size bound and the grey-tail check), in every JPEG flavour, with and without draft."""
    rng = np.random.default_rng(0)
    noisy_grey_corner = np.pad(rng.integers(0, 255, (120, 150, 3), dtype=np.uint8), ((0, 40), (0, 40), (0, 0)),
                               constant_values=128)
    pictures = [Image.open(p).convert("RGB") for p in photos] + [
        Image.new("RGB", (1600, 1200), (128, 128, 128)),  # all mid-grey, as a missing scan decodes
        Image.new("L", (2000, 1500), 255),
        Image.fromarray(noisy_grey_corner),
    ]
    flavours = [{}, {"progressive": True}, {"optimize": True}, {"subsampling": 0}, {"quality": 5, "optimize": True},
                {"progressive": True, "optimize": True, "quality": 5}]
    for picture in pictures:
        for mode in ("RGB", "L", "CMYK"):
            for kw in flavours:
                data = jpeg_bytes(picture.convert(mode), **kw)
                want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                np.testing.assert_array_equal(np.asarray(load_rgb(data)), want)
                assert load_rgb(data, draft=(16, 16)).size[0] >= 16


def test_small_jpeg_declaring_a_huge_size_is_refused_before_decoding(tmp_path, grace):
    path = tmp_path / "liar.jpg"
    path.write_bytes(with_declared_size(jpeg_bytes(grace.resize((64, 48)), quality=20), 9000, 9000))
    assert path.stat().st_size < 4000
    result = run_python(f"""
        import resource
        from vggembed.errors import ImageError
        from vggembed.images import load_rgb
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_rgb({str(path)!r})
            print("decoded")
        except ImageError as e:
            print(e)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, "MB")
    """)
    message, grown = result.stdout.splitlines()
    assert "liar.jpg: declares 9000x9000 pixels but holds" in message and "a cut or forged file" in message
    assert int(grown.split()[0]) < 20, grown  # decoding would take 9000*9000*4 bytes = 309 MB


def test_small_png_declaring_a_huge_size_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "PNG")
    data = buf.getvalue()
    ihdr = data.index(b"IHDR")
    body = struct.pack(">II", 9000, 9000) + data[ihdr + 12: ihdr + 17]
    import zlib
    forged = data[: ihdr - 4] + struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) \
        + data[ihdr + 21:]
    with pytest.raises(ImageError, match=r"declares 9000x9000 pixels but holds \d+ bytes of image data, which cannot "
                                         r"inflate"):
        load_rgb(forged)
    one_bit = io.BytesIO()
    Image.new("1", (12000, 1000)).save(one_bit, "PNG", optimize=True)  # as compressible as a real file gets
    assert load_rgb(one_bit.getvalue()).size == (12000, 1000)


# --- special files ------------------------------------------------------------------------------


def test_fifo_socket_and_device_are_failed_rows_not_hangs(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.jpg"))
    try:
        result = run_python(f"""
            from vggembed.errors import ImageError
            from vggembed.images import load_rgb
            for p in ["pipe.jpg", "sock.jpg", "/dev/zero", "."]:
                try:
                    load_rgb(p if p.startswith("/") else {str(tmp_path)!r} + "/" + p)
                except ImageError as e:
                    print(e)
        """, timeout=30)
    finally:
        sock.close()
    assert result.stdout.splitlines() == [
        f"{tmp_path}/pipe.jpg: is a FIFO (named pipe), not an image file",
        f"{tmp_path}/sock.jpg: is a socket, not an image file",
        "/dev/zero: is a character device, not an image file",
        f"{tmp_path}/.: is a folder, not an image file",
    ], result.stderr


# --- float images ------------------------------------------------------------------------------


def _float_tiff(tmp_path, values: np.ndarray) -> Path:
    path = tmp_path / "f.tif"
    Image.fromarray(values.astype(np.float32), "F").save(path)
    assert Image.open(path).mode == "F"
    return path


def test_float_image_in_0_1_is_scaled_to_0_255(tmp_path):
    values = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (4, 1))
    out = np.asarray(load_rgb(_float_tiff(tmp_path, values)))
    np.testing.assert_array_equal(out[..., 0], np.rint(values * 255).astype(np.uint8))
    assert (out[..., 0] == out[..., 2]).all()


def test_float_image_in_0_255_is_taken_as_it_is(tmp_path):
    values = np.tile(np.arange(256, dtype=np.float32), (4, 1))
    np.testing.assert_array_equal(np.asarray(load_rgb(_float_tiff(tmp_path, values)))[..., 1], values.astype(np.uint8))


@pytest.mark.parametrize("bad,message", [
    (np.nan, r"f\.tif: float image contains 1 NaN or infinite values"),
    (np.inf, r"f\.tif: float image contains 1 NaN or infinite values"),
    (-40.0, r"f\.tif: float image has values from -40 to 1; expected 0\.\.1 or 0\.\.255"),
    (1e6, r"f\.tif: float image has values from 0 to 1e\+06; expected 0\.\.1 or 0\.\.255"),
])
def test_float_image_with_nan_inf_or_an_unknown_range_is_a_failed_row_without_warnings(tmp_path, bad, message):
    values = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (4, 1))
    values[2, 3] = bad
    path = _float_tiff(tmp_path, values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stray RuntimeWarning would reach the user's stderr
        with pytest.raises(ImageError, match=message):
            load_rgb(path)


def test_float_array_with_nan_is_refused():
    arr = np.zeros((8, 8, 3), np.float32)
    arr[1, 1, 1] = np.nan
    with pytest.raises(ImageError, match="NaN or infinite"):
        prepare(arr, size=(8, 8))
