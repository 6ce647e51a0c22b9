"""Davi Frossard's VGG16 `.npz`: `{layer}_W` / `{layer}_b` arrays, HWIO, RGB input."""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ...errors import WeightFileError
from ...images.safeio import open_regular
from .. import arch as arch_mod
from ..spec import IMAGENET_MEAN_RGB, WeightSpec
from . import (
    INFLATE_ALLOWANCE,
    MAX_INFLATE_RATIO,
    aligned_empty,
    aligned_float32,
    check_params,
)

_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


class _Header(NamedTuple):
    shape: tuple
    fortran: bool
    dtype: np.dtype
    length: int  # bytes of the .npy header before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read(path: Path, layers=None):
    """(params, spec); with `layers`, only those layers' arrays are read and the others are shape-only
    stand-ins (`_Shape`), each checked as if read."""
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
        # Every declared shape and size is checked before a byte is allocated.
        keys = [f"{n}_{s}" for n in wanted for s in "Wb"]
        headers = {k: _header(archive, path, k) for k in keys}
        check_params(path, arch, {n: (_Shape(headers[n + "_W"].shape), _Shape(headers[n + "_b"].shape))
                                  for n in wanted})
        for k in keys:
            archive.check_size(k, headers[k])
        arrays = {k: _Shape(headers[k].shape) for k in keys}
        todo = [k for k in keys if layers is None or k[:-2] in layers]
        # Reading and checksumming release the GIL: arrays are read side by side.
        with ThreadPoolExecutor(4) as pool:
            arrays.update(zip(todo, pool.map(lambda k: _array(archive, path, k, headers[k]), todo)))
    params = {n: (arrays[n + "_W"], arrays[n + "_b"]) for n in wanted}
    spec = WeightSpec(path=str(path), arch=arch, format="npz", layout="frossard", mean_pixel=IMAGENET_MEAN_RGB)
    return params, spec


class _Shape(NamedTuple):
    """What `check_params` reads of an array, before the array is read."""

    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Archive:
    """The arrays of an .npz, read straight from the file into their final memory.

    `np.load` copies each member through zipfile's reader; here a stored
    (uncompressed, as `np.savez` writes) member is read with `readinto` into
    the array itself while its CRC-32 is checked, so a corrupt member is still
    caught. Compressed members go through numpy's own reader. The file is
    opened through `safeio.open_regular` each time.
    """

    def __init__(self, path: Path):
        self.path = path
        f = open_regular(path, "weight file")
        try:
            self.zip = zipfile.ZipFile(f)
        except BaseException:
            f.close()
            raise
        self.size = os.fstat(f.fileno()).st_size
        self.infos = {i.filename[:-4]: i for i in self.zip.infolist() if i.filename.endswith(".npy")}
        self.files = list(self.infos)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.fp.close()
        self.zip.close()

    def _data_start(self, f, info) -> int:
        """Offset in the file of a stored member's first byte."""
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return info.header_offset + 30 + name_len + extra_len

    def header(self, key: str) -> _Header:
        """The member's .npy header, read without reading its data."""
        info = self.infos[key]
        if info.compress_type != zipfile.ZIP_STORED:
            with self.zip.open(info) as fp:
                return _read_header(fp)
        with open_regular(self.path, "weight file") as f:
            f.seek(self._data_start(f, info))
            return _read_header(f)

    def check_size(self, key: str, header: _Header) -> None:
        """Refuse a member whose declared size the archive cannot hold."""
        info, need = self.infos[key], header.nbytes
        if header.length + need != info.file_size:
            raise WeightFileError(self.path, f"array {key} declares shape {header.shape} ({need} bytes) but the "
                                             f"archive lists {info.file_size - header.length} bytes for it")
        if info.header_offset + info.compress_size > self.size:
            raise WeightFileError(self.path, f"array {key} runs past the end of the file (truncated?)")
        if info.compress_type != zipfile.ZIP_STORED and need > MAX_INFLATE_RATIO * info.compress_size \
                + INFLATE_ALLOWANCE:
            raise WeightFileError(self.path, f"array {key} would inflate from {info.compress_size} to {need} bytes, "
                                             "far more than weights ever compress (a deflate bomb?)")

    def read(self, key: str, header: _Header) -> np.ndarray:
        info = self.infos[key]
        if info.compress_type != zipfile.ZIP_STORED:
            with self.zip.open(info) as fp:
                return np.lib.format.read_array(fp, allow_pickle=False)
        with open_regular(self.path, "weight file") as f:
            start = self._data_start(f, info)
            f.seek(start)
            crc = zlib.crc32(f.read(header.length))
            arr = aligned_empty(header.shape, header.dtype, order="F" if header.fortran else "C")
            view = memoryview(arr.reshape(-1, order="A")).cast("B")
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


def _read_header(fp) -> _Header:
    start = fp.tell()
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp, max_header_size=1 << 16)
    return _Header(tuple(shape), fortran, dtype, fp.tell() - start)


def _header(archive, path, key) -> _Header:
    try:
        header = archive.header(key)
    except ValueError as e:
        raise WeightFileError(path, f"array {key} has an unreadable .npy header: {e}") from None
    except _CORRUPT as e:
        raise WeightFileError(path, f"array {key} is unreadable (truncated or corrupt?): {e}") from None
    if header.dtype.hasobject:
        raise WeightFileError(
            path, f"array {key} is stored as Python objects and needs pickle, which vggembed never enables")
    if not np.issubdtype(header.dtype, np.floating):
        raise WeightFileError(path, f"array {key} has dtype {header.dtype}; expected floating point")
    return header


def _array(archive, path, key, header) -> np.ndarray:
    try:
        arr = archive.read(key, header)
    except MemoryError:
        raise WeightFileError(path, f"array {key} of shape {header.shape} does not fit in memory") from None
    except ValueError as e:
        raise WeightFileError(path, f"array {key} is unreadable: {e}") from None
    except _CORRUPT as e:
        raise WeightFileError(path, f"array {key} is unreadable (truncated or corrupt?): {e}") from None
    return aligned_float32(arr)


def _listing(keys, most=8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more
