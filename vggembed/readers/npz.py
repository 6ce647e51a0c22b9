"""Davi Frossard's VGG16 `.npz`: `{layer}_W` / `{layer}_b` arrays, HWIO, RGB input."""

from __future__ import annotations

import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .. import arch as arch_mod
from ..errors import WeightFileError
from ..spec import IMAGENET_MEAN_RGB, WeightSpec
from . import aligned_empty, aligned_float32

_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


def read(path: Path):
    try:
        archive = _Archive(path)
    except _CORRUPT as e:
        raise WeightFileError(path, f"not a readable .npz archive (truncated or corrupt?): {e}") from None
    with archive:
        keys = set(archive.files)
        if "conv3_4_W" in keys:
            arch = "vgg19"
        elif "conv1_1_W" in keys:
            arch = "vgg16"
        else:
            raise WeightFileError(
                path,
                "holds no VGG conv layers (expected keys such as conv1_1_W, conv1_1_b); "
                f"found: {_listing(keys)}",
            )
        convs = arch_mod.conv_names(arch)
        fc_keys = {f"{n}_{s}" for n in arch_mod.FC_NAMES for s in "Wb"}
        wanted = [n for n in convs] + (list(arch_mod.FC_NAMES) if keys & fc_keys else [])
        missing = [f"{n}_{s}" for n in wanted for s in "Wb" if f"{n}_{s}" not in keys]
        if missing:
            unexpected = sorted(keys - {f"{n}_{s}" for n in convs + list(arch_mod.FC_NAMES) for s in "Wb"})
            extra = f"; unexpected keys: {_listing(unexpected)}" if unexpected else ""
            raise WeightFileError(path, f"missing keys for {arch}: {_listing(missing)}{extra}")
        # Reading and checksumming release the GIL: arrays are read side by side.
        keys = [f"{n}_{s}" for n in wanted for s in "Wb"]
        with ThreadPoolExecutor(4) as pool:
            arrays = dict(zip(keys, pool.map(lambda k: _array(archive, path, k), keys)))
    params = {n: (arrays[n + "_W"], arrays[n + "_b"]) for n in wanted}
    spec = WeightSpec(path=str(path), arch=arch, format="npz", layout="frossard", mean_pixel=IMAGENET_MEAN_RGB)
    return params, spec


class _Archive:
    """The arrays of an .npz, read straight from the file into their final memory.

    `np.load` copies each member through zipfile's reader; here a stored
    (uncompressed, as `np.savez` writes) member is read with `readinto` into
    the array itself while its CRC-32 is checked, so a corrupt member is still
    caught. Compressed members go through numpy's own reader.
    """

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path)
        self.infos = {i.filename[:-4]: i for i in self.zip.infolist() if i.filename.endswith(".npy")}
        self.files = list(self.infos)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()

    def __getitem__(self, key: str) -> np.ndarray:
        info = self.infos[key]
        if info.compress_type != zipfile.ZIP_STORED:
            with self.zip.open(info) as fp:
                return np.lib.format.read_array(fp, allow_pickle=False)
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            start = f.tell()
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
            header_len = f.tell() - start
            f.seek(start)
            crc = zlib.crc32(f.read(header_len))
            arr = aligned_empty(shape, dtype, order="F" if fortran else "C")
            view = memoryview(arr.reshape(-1, order="A")).cast("B")
            if header_len + view.nbytes != info.file_size:
                raise zipfile.BadZipFile(f"{info.filename}: header and size disagree")
            done = 0
            while done < view.nbytes:
                n = f.readinto(view[done: done + (1 << 24)])
                if not n:
                    raise EOFError(f"{info.filename} ends after {done} of {view.nbytes} bytes")
                crc = zlib.crc32(view[done: done + n], crc)
                done += n
            if crc != info.CRC:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
        return arr


def _array(archive, path, key) -> np.ndarray:
    try:
        arr = archive[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise WeightFileError(
                path, f"array {key} is stored as Python objects and needs pickle, which vggembed never enables"
            ) from None
        raise WeightFileError(path, f"array {key} is unreadable: {e}") from None
    except _CORRUPT as e:
        raise WeightFileError(path, f"array {key} is unreadable (truncated or corrupt?): {e}") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise WeightFileError(path, f"array {key} has dtype {arr.dtype}; expected floating point")
    return aligned_float32(arr)


def _listing(keys, most=8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more
