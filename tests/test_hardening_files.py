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
from vggembed.images.decode import load_rgb, prepare

from .conftest import HANG

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (vggembed importable); a hang fails the test."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=HANG, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {HANG} s")


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
        Image.new("RGB", (800, 600), (128, 128, 128)),  # all mid-grey, as a missing scan decodes
        Image.new("L", (1000, 750), 255),
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
        from vggembed.images.decode import load_rgb
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
            from vggembed.images.decode import load_rgb
            for p in ["pipe.jpg", "sock.jpg", "/dev/zero", "."]:
                try:
                    load_rgb(p if p.startswith("/") else {str(tmp_path)!r} + "/" + p)
                except ImageError as e:
                    print(e)
        """)
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


# --- weight files that lie about their sizes -------------------------------------------------------

from vggembed.net import synthetic  # noqa: E402
from vggembed.errors import WeightFileError  # noqa: E402
from vggembed.net.labels import LabelFileError, read_labels  # noqa: E402
from vggembed.net.weights import load_weights  # noqa: E402

from .conftest import TINY_FC, TINY_WIDTHS  # noqa: E402


def _members(tiny_params) -> dict[str, np.ndarray]:
    return {f"{n}_{s}": a for n, (w, b) in tiny_params["vgg16"].items() for s, a in (("W", w), ("b", b))}


def write_npz(path: Path, members: dict, forged: dict | None = None) -> Path:
    """An .npz of `members`; `forged` maps a key to (declared shape, data writer, compress)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for key, arr in members.items():
            if forged and key in forged:
                shape, write, compress = forged[key]
                info = zipfile.ZipInfo(key + ".npy")
                info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
                with z.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": "<f4", "fortran_order": False, "shape": shape})
                    write(f)
            else:
                with z.open(key + ".npy", "w") as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr, dtype=np.float32))
    return path


def peak_growth_mb(code_before: str, code: str) -> tuple[str, int]:
    """Run `code` after `code_before` in a fresh interpreter; its output and how much its peak RSS grew."""
    result = run_python(f"""
        import resource
        {code_before}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            {code}
            print("loaded")
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    assert result.returncode == 0, result.stderr
    *out, grown = result.stdout.splitlines()
    return "\n".join(out), int(grown)


LOAD = "from vggembed.net.weights import load_weights"


def test_npz_member_declaring_an_enormous_shape_is_refused_before_allocating(tmp_path, tiny_params):
    members = _members(tiny_params)
    real = members["conv1_1_W"]
    path = write_npz(tmp_path / "huge.npz", members,
                     {"conv1_1_W": ((3, 3, 3, 1 << 34), lambda f: f.write(real.tobytes()), False)})
    out, grown = peak_growth_mb(LOAD, f"load_weights({str(path)!r})")
    assert out == (f"WeightFileError: {path}: conv1_1 has 17179869184 outputs; a VGG-shaped layer has at most 4096")
    assert grown < 100


def test_npz_member_whose_data_is_shorter_than_its_header_says_is_refused(tmp_path, tiny_params):
    members = _members(tiny_params)
    w = members["fc6_W"]
    path = write_npz(tmp_path / "short.npz", members, {"fc6_W": ((w.shape[0], TINY_FC), lambda f: f.write(b"\0" * 64),
                                                                False)})
    with pytest.raises(WeightFileError, match=rf"short\.npz: array fc6_W declares shape \({w.shape[0]}, {TINY_FC}\) "
                                              rf"\({w.shape[0] * TINY_FC * 4} bytes\) but the archive lists 64 bytes"):
        load_weights(path)


def test_npz_deflate_bomb_is_refused_with_little_memory(tmp_path, tiny_params):
    members = _members(tiny_params)
    fc_in, wide = members["fc6_W"].shape[0], 60000  # 188 MB of zeros that deflate to about 180 KB
    members["fc6_b"] = np.zeros(wide, np.float32)
    members["fc7_W"] = np.zeros((wide, TINY_FC), np.float32)
    zeros = bytes(1 << 20)

    def write(f):
        left = fc_in * wide * 4
        while left:
            f.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))

    path = write_npz(tmp_path / "bomb.npz", members, {"fc6_W": ((fc_in, wide), write, True)})
    assert path.stat().st_size < 9_000_000  # fc7_W, stored, is 7.7 MB of it
    out, grown = peak_growth_mb(LOAD, f"load_weights({str(path)!r})")
    assert out.startswith(f"WeightFileError: {path}: array fc6_W would inflate from ") and "deflate bomb" in out, out
    assert grown < 100, f"{grown} MB"


def _append_compressed_zeros_variable(path: Path, name: bytes, nbytes: int) -> None:
    """Append to a MATLAB v5 file a zlib-compressed double array of `nbytes` zeros, streamed."""
    import zlib

    n = nbytes // 8
    body = (struct.pack("<II", 6, 8) + struct.pack("<II", 6, 0)            # array flags: mxDOUBLE_CLASS
            + struct.pack("<II", 5, 8) + struct.pack("<ii", n, 1)          # dimensions n x 1
            + struct.pack("<II", 1, len(name)) + name.ljust(8, b"\0"))     # name
    element = struct.pack("<II", 14, len(body) + 8 + 8 * n) + body + struct.pack("<II", 9, 8 * n)
    z = zlib.compressobj(1)
    chunks = [z.compress(element)]
    zeros = bytes(1 << 20)
    for _ in range(8 * n // len(zeros)):
        chunks.append(z.compress(zeros))
    chunks.append(z.flush())
    data = b"".join(chunks)
    with open(path, "ab") as f:
        f.write(struct.pack("<II", 15, len(data)) + data)


def test_mat_with_an_extra_huge_variable_loads_without_reading_it(tmp_path, tiny_params):
    path = synthetic.write_mat(tiny_params["vgg16"], tmp_path / "extra.mat", labels=[str(i) for i in range(10)])
    _append_compressed_zeros_variable(path, b"junk", 400 << 20)
    assert path.stat().st_size < 3_000_000
    out, grown = peak_growth_mb(LOAD, f"p, s = load_weights({str(path)!r}); print(s.arch, s.conv_widths)")
    assert out == f"vgg16 {TINY_WIDTHS[:1] * 2 + TINY_WIDTHS[1:2] * 2 + TINY_WIDTHS[2:3] * 3 + TINY_WIDTHS[3:4] * 3 + TINY_WIDTHS[4:] * 3}\nloaded"
    assert grown < 100, f"{grown} MB"


def _compressed_bomb(name: bytes, cells: int, cell_bytes: int, endian: str = "<") -> bytes:
    """A MATLAB v5 miCOMPRESSED element (byte order `endian`): variable `name`, a 1 x `cells` cell of double arrays of `cell_bytes`
    zeros each. Built in milliseconds: once deflate's window holds only zeros, each further MiB of zeros
    (sync-flushed) compresses to the same bytes, so they are repeated; the Adler-32 is worked out by hand."""
    import zlib

    tag = endian + "II"

    def matrix(mxclass, dims, label, content_bytes):
        body = (struct.pack(tag, 6, 8) + struct.pack(tag, mxclass, 0)
                + struct.pack(tag, 5, 4 * len(dims)) + struct.pack(f"{endian}{len(dims)}i", *dims).ljust(8, b"\0")
                + struct.pack(tag, 1, len(label)) + label.ljust(-(-len(label) // 8) * 8, b"\0"))
        return struct.pack(tag, 14, (len(body) + content_bytes) & 0xFFFFFFFF) + body

    mib = 1 << 20
    assert cell_bytes % mib == 0
    cell = matrix(6, (cell_bytes // 8, 1), b"", 8 + cell_bytes) + struct.pack(tag, 9, cell_bytes)
    z, adler = zlib.compressobj(9), 1
    parts = [z.compress(matrix(1, (1, cells), name, cells * (len(cell) + cell_bytes)))]
    adler = zlib.adler32(matrix(1, (1, cells), name, cells * (len(cell) + cell_bytes)), adler)
    zeros = bytes(mib)
    for _ in range(cells):
        parts.append(z.compress(cell))
        adler = zlib.adler32(cell, adler)
        for _ in range(2):  # the second MiB of zeros compresses as every later one does
            steady = z.compress(zeros) + z.flush(zlib.Z_SYNC_FLUSH)
            parts.append(steady)
        parts += [steady] * (cell_bytes // mib - 2)
        a, b = adler & 0xFFFF, adler >> 16
        adler = ((b + cell_bytes * a) % 65521) << 16 | a  # Adler-32 over zeros: a stays, b grows by a per byte
    data = b"".join(parts) + z.flush()[:-4] + struct.pack(">I", adler)
    return struct.pack(tag, 15, len(data)) + data


@pytest.mark.parametrize("bombed", ["layers", "meta"])
def test_mat_deflate_bomb_is_refused_with_little_memory(tmp_path, tiny_params, bombed):
    import scipy.io.matlab

    real = synthetic.write_mat(tiny_params["vgg16"], tmp_path / "real.mat")
    with open(real, "rb") as f:
        header, variables = real.read_bytes()[:128], dict(scipy.io.matlab.varmats_from_mat(f))
    path = tmp_path / "bomb.mat"
    path.write_bytes(header + b"".join(v.getvalue()[128:] for k, v in variables.items() if k != bombed)
                     + _compressed_bomb(bombed.encode(), 4, 2 << 30))  # inflates to 8 GiB
    assert path.stat().st_size < 12_000_000
    out, grown = peak_growth_mb(LOAD, f"load_weights({str(path)!r})")
    assert out.startswith(f"WeightFileError: {path}: variable {bombed} would inflate from ") \
        and out.endswith("(a deflate bomb or a forged file)") and "\n" not in out, out
    assert grown < 100, f"{grown} MB"


@pytest.mark.parametrize("compressed", [False, True])
def test_mat_array_declaring_more_bytes_than_its_variable_holds_is_one_line(tmp_path, tiny_params, compressed):
    import zlib

    import scipy.io.matlab

    def matrix(mxclass, dims, label, content):
        body = (struct.pack("<II", 6, 8) + struct.pack("<II", mxclass, 0) + struct.pack("<II", 5, 8)
                + struct.pack("<2i", *dims) + struct.pack("<II", 1, len(label)) + label + bytes(-len(label) % 8))
        return struct.pack("<II", 14, len(body) + len(content)) + body + content

    real = synthetic.write_mat(tiny_params["vgg16"], tmp_path / "real.mat")
    with open(real, "rb") as f:
        header, variables = real.read_bytes()[:128], dict(scipy.io.matlab.varmats_from_mat(f))
    n = (4 << 30) - 16  # a 4 GB array of which 64 bytes are there
    layers = matrix(1, (1, 1), b"layers", matrix(6, (n // 8, 1), b"", struct.pack("<II", 9, n) + bytes(64)))
    if compressed:
        layers = zlib.compress(layers)
        layers = struct.pack("<II", 15, len(layers)) + layers
    path = tmp_path / "short.mat"
    path.write_bytes(header + layers + variables["meta"].getvalue()[128:])
    out, grown = peak_growth_mb(LOAD, f"load_weights({str(path)!r})")
    assert out == f"WeightFileError: {path}: not a readable MATLAB .mat file (truncated or corrupt?): could not read bytes"
    assert grown < 100, f"{grown} MB"


def test_big_endian_mat_deflate_bomb_is_refused_too(tmp_path):
    path = tmp_path / "bomb.mat"
    header = b"MATLAB 5.0 MAT-file, big-endian".ljust(116) + bytes(8) + b"\x01\x00MI"  # MI: written big-endian
    path.write_bytes(header + _compressed_bomb(b"layers", 1, 1 << 30, endian=">"))
    with pytest.raises(WeightFileError, match=r"bomb\.mat: variable layers would inflate from \d+ to more than "):
        load_weights(path)


def write_mat_that_crashes_scipy(path: Path) -> Path:
    """The reproducer of a scipy crash (1.17: loadmat segfaults, exit 139, no message): a `layers` cell holding
    a double array whose empty name element (miINT8, 0 bytes) is followed by 8 zero padding bytes; `meta`
    beside it so that vggembed's reader gets as far as loadmat."""

    def matrix(mxclass, dims, name, content):  # a little-endian miMATRIX: flags, dims, name, content
        body = (struct.pack("<II", 6, 8) + struct.pack("<II", mxclass, 0) + struct.pack("<II", 5, 8)
                + struct.pack("<2i", *dims) + struct.pack("<II", 1, len(name)) + name + bytes(8 - len(name) % 8)
                + content)
        return struct.pack("<II", 14, len(body)) + body

    path.write_bytes(b"MATLAB 5.0 MAT-file".ljust(124) + b"\x00\x01IM"
                     + matrix(1, (1, 1), b"layers", matrix(6, (8, 1), b"", struct.pack("<II", 9, 64) + bytes(64)))
                     + matrix(6, (1, 1), b"meta", struct.pack("<II", 9, 8) + bytes(8)))
    return path


def test_a_mat_file_that_crashes_scipy_is_one_line_not_a_dead_process(tmp_path, tiny):
    import signal

    path = write_mat_that_crashes_scipy(tmp_path / "crash.mat")
    raw = run_python(f"import scipy.io; scipy.io.loadmat({str(path)!r}, variable_names=['layers', 'meta'])")
    if raw.returncode != -signal.SIGSEGV:
        pytest.skip(f"this scipy survives the reproducer (exit {raw.returncode}): nothing to guard against")
    line = f"{path}: crashed the MAT parser (scipy.io.loadmat died of SIGSEGV); a forged or corrupt .mat file"
    env = dict(os.environ, PYTHONPATH=str(ROOT), VGGEMBED_HOME=str(tmp_path / "home"))

    for _ in range(2):  # the verdict is remembered: the second time it comes from the cache
        cli = subprocess.run([sys.executable, "-m", "vggembed", "info", str(path)], capture_output=True, text=True,
                             timeout=HANG, env=env)
        assert (cli.returncode, cli.stderr.splitlines()) == (1, [f"Error: {line}"])
    entries = list((tmp_path / "home" / "mat-parse").iterdir())
    assert len(entries) == 1 and entries[0].read_text().endswith(" SIGSEGV")

    # The API: a WeightFileError, in a process that lives on. A later load of the same file version starts no
    # child (it is forbidden here) and still refuses it; a new version of the file (good weights written over
    # it) is parsed again and loads.
    api = run_python(f"""
        import os, shutil
        os.environ["VGGEMBED_HOME"] = {str(tmp_path / "api-home")!r}
        import vggembed
        from vggembed.net.readers import mat

        def no_child(f):
            raise AssertionError("a child parsed a file version already seen")

        start_child = mat._parse_in_child
        for _ in range(2):
            try:
                vggembed.load_weights({str(path)!r})
            except vggembed.WeightFileError as e:
                print(e)
            mat._parse_in_child = no_child
        shutil.copyfile({str(tiny["vgg16", "matconvnet"])!r}, {str(path)!r})
        mat._parse_in_child = start_child
        print(vggembed.load_weights({str(path)!r})[1].arch)
        mat._parse_in_child = no_child
        print(vggembed.load_weights({str(path)!r})[1].arch)
    """)
    assert api.returncode == 0, api.stderr
    assert api.stdout.splitlines() == [line, line, "vgg16", "vgg16"]


@pytest.mark.parametrize("flag", ["weights", "labels"])
def test_fifo_socket_or_device_as_weights_or_labels_is_a_one_line_error(tmp_path, tiny16, flag):
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        for special, kind in [(tmp_path / "fifo", "a FIFO (named pipe)"), (tmp_path / "sock", "a socket"),
                              (Path("/dev/zero"), "a character device")]:
            args = [str(special)] if flag == "weights" else [str(tiny16), "--labels", str(special)]
            try:
                result = subprocess.run([sys.executable, "-m", "vggembed", "info", *args], capture_output=True,
                                        text=True, timeout=HANG, env=env)
            except subprocess.TimeoutExpired:
                pytest.fail(f"--{flag} {special} hung")
            assert result.returncode == 1
            assert result.stderr.strip().splitlines() == [
                f"Error: {special}: is {kind}, not a {'weight' if flag == 'weights' else 'label'} file"]
    finally:
        sock.close()


# --- malformed label files ---------------------------------------------------------------------


@pytest.mark.parametrize("name,text,problem", [
    ("imagenet_class_index.json", '{"0": ["n01440764", "tench"], "one": ["n01443537", "goldfish"]}',
     "has key 'one'; expected class indices 0, 1, 2, ..."),
    ("imagenet_class_index.json", '{"0": ["n01440764", "tench"], "2": ["n01443537", "goldfish"]}',
     "has 2 keys but index 1 is missing; expected class indices 0..N-1"),
    ("imagenet_class_index.json", '{"0": []}', 'entry 0 is []; expected a name or a [WordNet id, name] pair'),
    ("imagenet_class_index.json", '{"0": {"name": "tench"}}', "entry 0 is {'name': 'tench'}; expected a name or"),
    ("imagenet_class_index.json", '[1, 2]', "item 0 is 1; expected a name or a [WordNet id, name] pair"),
    ("imagenet_class_index.json", '"tench"', 'holds a string; expected an object {"0": ["n01440764", "tench"]'),
    ("imagenet_class_index.json", "[" * 100000 + "]" * 100000, "is not valid JSON"),
    ("imagenet_classes.py", "class_names = 'tench goldfish'", "`class_names` is a string; expected a literal list"),
    ("imagenet_classes.py", "class_names = ['tench', 2]", "class 1 is 2; expected a string"),
    ("imagenet_classes.py", "class_names = {'tench', 'goldfish'}", "`class_names` is a set (which has no order)"),
    ("imagenet_classes.py", "class_names = 1000", "`class_names` is a number"),
    ("imagenet_classes.py", "class_names = {0: 'tench', 'x': 'goldfish'}", "has key 'x'; expected class indices"),
    ("imagenet_classes.py", "class_names = '''a\nb'''.split(SEP)", "not a literal but a call, which vggembed never"),
    ("imagenet_classes.py", "class_names = '''a\nb'''.split('\\n', 1)", "not a literal but a call"),
    ("imagenet_classes.py", "class_names = ', '.join(['a', 'b']).split(', ')", "not a literal but a call"),
    ("imagenet_classes.py", "class_names = ['a'] + ['b']", "`class_names` is not a literal; expected"),
    ("imagenet_classes.py", "class_names = " + "[" * 300 + "]" * 300, "is not valid Python: too many nested"),
    ("imagenet_classes.py", "class_names = ['a']\0", "is not valid Python"),
    ("synset_words.txt", "n01440764 tench, Tinca tinca\nn01443537\n", "line 2 is 'n01443537'; expected a WordNet id"),
    ("synset_words.txt", "n01440764 tench, Tinca tinca\ngoldfish\n", "line 2 is 'goldfish'; expected a WordNet id"),
])
def test_malformed_label_files_are_one_line_errors(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LabelFileError) as e:
        read_labels(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def test_label_file_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "imagenet_classes.py"
    for code in [f"class_names = __import__('os').mkdir({str(marker)!r})",
                 f"class_names = '''a\\nb'''.split(__import__('os').mkdir({str(marker)!r}) or '\\n')"]:
        path.write_text(code)
        with pytest.raises(LabelFileError, match="never runs"):
            read_labels(path)
    assert not marker.exists()


def test_binary_and_huge_label_files(tmp_path, monkeypatch):
    path = tmp_path / "synset_words.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(LabelFileError, match=r"is not UTF-8 text \(bad byte at offset 0\)"):
        read_labels(path)
    import vggembed.net.labels

    monkeypatch.setattr(vggembed.net.labels, "MAX_BYTES", 10)
    path.write_text("n01440764 tench\nn01443537 goldfish\n")
    with pytest.raises(LabelFileError, match="a label file holds one short name per class"):
        read_labels(path)


# --- the weights cache ---------------------------------------------------------------------------


def test_cache_honours_xdg_cache_home(tmp_path, monkeypatch):
    from vggembed.net.cache import cache_dir

    monkeypatch.delenv("VGGEMBED_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vggembed"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec says: ignore it
    assert cache_dir() == Path.home() / ".cache" / "vggembed"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
