"""Load a weight file into canonical arrays plus the spec that says how to use them.

Canonical form, whatever the file: conv kernels HWIO float32, fc weights as
(in, out) matrices whose rows follow TensorFlow's NHWC flatten of pool5,
biases as vectors. The readers in `vggembed.readers` are plain numpy/scipy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import WeightFileError
from ..images.safeio import NotAFileError, open_regular
from . import arch as arch_mod
from .labels import find_labels, read_labels
from .readers import check_params, mat, npz
from .spec import IMAGENET_MEAN_RGB, WeightSpec  # noqa: F401 (IMAGENET_MEAN_RGB re-exported)


def load_weights(
    path: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    legacy_transpose: bool = False,
    layers=None,
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
        layers: only these layers' arrays are wanted (e.g. `("fc8",)` where
            a cached int8 model holds the rest). Every layer's shape is still
            checked; a `.npz` reads just those arrays, a `.mat` is read whole.

    Returns:
        (params, spec): params maps conv{b}_{i} / fc6..fc8 (or just `layers`) to (weight, bias).

    Raises:
        WeightFileError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        with open_regular(path, "weight file") as f:
            head = f.read(128)
    except NotAFileError as e:
        raise WeightFileError(path, e.problem) from None
    if head.startswith(b"PK"):
        params, spec = npz.read(path, layers)
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
    if layers is not None:
        params = {n: p for n, p in params.items() if n in layers}

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
