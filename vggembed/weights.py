"""Load a weight file into canonical arrays plus the spec that says how to use them.

Canonical form, whatever the file: conv kernels HWIO float32, fc weights as
(in, out) matrices whose rows follow TensorFlow's NHWC flatten of pool5,
biases as vectors. The readers in `vggembed.readers` are plain numpy/scipy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import arch as arch_mod
from .errors import WeightFileError
from .labels import find_labels, read_labels
from .registry import known_by_md5

# Frossard's mean pixel (R, G, B); MatConvNet files carry their own.
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)


@dataclass
class WeightSpec:
    """Everything a caller needs to use one loaded weight file correctly."""

    path: str
    arch: str  # vgg16 | vgg19
    format: str  # npz | mat
    layout: str  # frossard | matconvnet-beta16 | matconvnet
    mean_pixel: tuple[float, float, float]
    channel_order: str = "RGB"
    input_size: tuple[int, int] = (224, 224)
    labels: list[str] | None = None
    labels_source: str | None = None
    has_fc: bool = True
    conv_widths: tuple[int, ...] = ()
    fc_sizes: tuple[int, ...] = ()
    legacy_transpose: bool = False

    @cached_property
    def md5(self) -> str:
        from .download import cached_md5

        return cached_md5(self.path)

    @property
    def known(self) -> str | None:
        """Name of the published file this is (by MD5), or None."""
        p = known_by_md5(self.md5)
        return p.name if p else None

    @property
    def num_classes(self) -> int | None:
        return self.fc_sizes[-1] if self.has_fc else None

    def output_shape(self, name: str, height: int, width: int) -> tuple:
        """Shape of one image's output at canonical layer `name` for a height x width input."""
        shape, convs = (height, width, 3), iter(self.conv_widths)
        for layer in arch_mod.layers(self.arch):
            if layer.kind == "conv":
                shape = shape[:2] + (next(convs),)
            elif layer.kind == "pool":
                shape = (-(-shape[0] // 2), -(-shape[1] // 2), shape[2])
            elif layer.kind == "fc":
                shape = (self.fc_sizes[arch_mod.FC_NAMES.index(layer.name)],)
            if layer.name == name:
                return shape
        raise KeyError(name)

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"


def load_weights(
    path: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    legacy_transpose: bool = False,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], WeightSpec]:
    """Read a Frossard `.npz` or MatConvNet `.mat` file.

    Args:
        path: the weight file. The format is taken from its first bytes, not
            its extension.
        labels: a class-name file for files that carry none (`.npz`). When
            None, one found beside the weights is used.
        legacy_transpose: transpose `.mat` conv kernels with (1, 0, 2, 3), as
            the VGG19 seed and neural-style's `vgg.py` do. Wrong for the
            published files; only for reproducing their feature maps.

    Returns:
        (params, spec): params maps conv{b}_{i} / fc6..fc8 to (weight, bias).

    Raises:
        WeightFileError: naming the file and what is wrong with it.
    """
    from .readers import mat, npz

    path = Path(path)
    if not path.exists():
        raise WeightFileError(path, "no such file")
    if path.is_dir():
        raise WeightFileError(path, "is a folder, not a weight file")
    with open(path, "rb") as f:
        head = f.read(128)
    if head.startswith(b"PK"):
        params, spec = npz.read(path)
    elif head.startswith(b"MATLAB"):
        params, spec = mat.read(path, legacy_transpose=legacy_transpose)
    elif path.suffix.lower() == ".npz":
        raise WeightFileError(path, "not a zip archive, so not a .npz file (truncated or corrupt?)")
    elif path.suffix.lower() == ".mat":
        raise WeightFileError(path, "has no MATLAB header, so not a .mat file (truncated or corrupt?)")
    else:
        raise WeightFileError(path, "neither a .npz archive nor a MATLAB .mat file")

    check_params(path, spec.arch, params)
    spec.conv_widths = tuple(params[n][0].shape[-1] for n in arch_mod.conv_names(spec.arch))
    spec.has_fc = "fc6" in params
    spec.fc_sizes = tuple(params[n][0].shape[-1] for n in arch_mod.FC_NAMES) if spec.has_fc else ()

    if labels is not None:
        spec.labels, spec.labels_source = read_labels(labels), str(labels)
    elif spec.labels is None:
        found = find_labels(path.parent)
        if found is not None:
            spec.labels, spec.labels_source = read_labels(found), str(found)
    if spec.labels is not None and spec.has_fc and len(spec.labels) != spec.num_classes:
        raise WeightFileError(
            path,
            f"has {spec.num_classes} classes but the labels from {spec.labels_source} "
            f"number {len(spec.labels)}",
        )
    return params, spec


def check_params(path, arch: str, params: dict) -> None:
    """Check that every kernel fits the one before it; raise naming the key."""
    prev = 3
    for name in arch_mod.conv_names(arch):
        w, b = params[name]
        _expect(path, name, w, (3, 3, prev, None))
        _expect(path, name + " bias", b, (w.shape[-1],))
        prev = w.shape[-1]
    if "fc6" not in params:
        return
    prev = 7 * 7 * prev  # pool5 is 7x7 at the 224x224 training size
    for name in arch_mod.FC_NAMES:
        w, b = params[name]
        _expect(path, name, w, (prev, None))
        _expect(path, name + " bias", b, (w.shape[-1],))
        prev = w.shape[-1]


def _expect(path, key, arr, shape) -> None:
    ok = arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise WeightFileError(path, f"{key} has shape {tuple(arr.shape)}; expected {want}")
