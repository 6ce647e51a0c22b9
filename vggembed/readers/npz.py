"""Davi Frossard's VGG16 `.npz`: `{layer}_W` / `{layer}_b` arrays, HWIO, RGB input."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from .. import arch as arch_mod
from ..errors import WeightFileError
from ..weights import IMAGENET_MEAN_RGB, WeightSpec

_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


def read(path: Path):
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, *_CORRUPT) as e:
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
        params = {n: (_array(archive, path, n + "_W"), _array(archive, path, n + "_b")) for n in wanted}
    spec = WeightSpec(path=str(path), arch=arch, format="npz", layout="frossard", mean_pixel=IMAGENET_MEAN_RGB)
    return params, spec


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
    return np.ascontiguousarray(arr, dtype=np.float32)


def _listing(keys, most=8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more
