"""The one place that chooses and builds the network a caller asks for.

`load` reads a weight file and returns a `VGG` (float32, bf16, fp16) or an
`int8.Int8VGG`; `load_recipe` does the same for a `Recipe`, and `locate`
turns a recipe that names only a published model into one with a file on
this machine. Neither `model` nor `int8` imports this module, so the arrows
run one way: load -> int8 -> model.
"""

from __future__ import annotations

import time

from ..errors import VGGEmbedError
from ..store.recipe import PRECISIONS
from . import int8
from .download import find_by_md5, find_weights
from .head import Head, read_head
from .model import VGG
from .tfimport import tensorflow
from .weights import load_weights


def load(path=None, *, model: str = "vgg16", labels=None, legacy_transpose: bool = False,
         precision: str = "float32", device: str = "auto", calibration=None, timings: dict | None = None) -> VGG:
    """Load a weight file into a ready-to-run network.

    Args:
        path: a Frossard `.npz` or MatConvNet `.mat` file. None looks in
            $VGGEMBED_WEIGHTS, ./weights/ and the download cache for `model`.
        model: which published file to look for when `path` is None.
        labels: class-name file for weights that carry none.
        legacy_transpose: the VGG19 seed's (1, 0, 2, 3) kernel transpose.
        precision: float32 (default), bf16 (CPUs with native bf16, GPUs), fp16 (GPUs) or int8
            (CPUs with VNNI/AMX, `pip install "vggembed[int8]"`; returns an `int8.Int8VGG`).
        calibration: int8 only: a folder of images to calibrate on instead of the built-in set.
        device: cpu, gpu or auto (the GPU when TensorFlow sees one).
        timings: if given, filled with seconds per start-up phase
            (`runtime`: importing TensorFlow, none for int8; `weights`; `model`).
    """
    if path is None:
        path = find_weights(model)
    if precision not in PRECISIONS:
        raise VGGEmbedError(f"precision must be one of {PRECISIONS}; received {precision!r}")
    if calibration is not None and precision != "int8":
        raise VGGEmbedError("calibration images are for --precision int8 only")
    if precision == "int8":
        int8.check_available(device)  # before the weights: LiteRT, the device and the CPU decide
    t0 = time.perf_counter()
    if precision != "int8":  # int8 runs on LiteRT and numpy: no TensorFlow
        tensorflow()
    t1 = time.perf_counter()
    # A cached int8 model holds every layer but fc8, which runs in float32 outside it; conversion reads the rest.
    params, spec = load_weights(path, labels=labels, legacy_transpose=legacy_transpose,
                                layers=("fc8",) if precision == "int8" else None)
    t2 = time.perf_counter()
    if precision == "int8":
        vgg = int8.Int8VGG(params, spec, calibration=calibration)
    else:
        vgg = VGG(params, spec, precision=precision, device=device)
    if timings is not None:
        timings.update(runtime=t1 - t0, weights=t2 - t1, model=time.perf_counter() - t2)
    return vgg


def load_recipe(recipe, *, labels=None, device: str = "auto", timings: dict | None = None) -> VGG:
    """The network a `Recipe` names (its weights, precision and kernel layout), with its head attached when
    it names one (after checking that the head was trained on this network's features)."""
    head = read_head(recipe.head) if recipe.head else None  # a bad head file fails before the weights load
    vgg = load(recipe.weights, model=recipe.model, labels=labels, legacy_transpose=recipe.legacy_transpose,
               precision=recipe.precision, device=device, calibration=recipe.calibration, timings=timings)
    if head is not None:
        head.check_features(recipe.bind(vgg.spec), str(vgg.spec.path))
        vgg.attach_head(head)
    return vgg


def load_head(path, *, weights=None, device: str = "auto") -> Head:
    """A trained head (`vggembed train`'s HEAD.npz) that can also classify images itself (`Head.classify`):
    its network is loaded on first use from `weights`, or from the file its recipe records (found by MD5 in
    $VGGEMBED_WEIGHTS, ./weights/ and the cache)."""
    head = read_head(path)
    network = None

    def open_network():
        nonlocal network
        if network is None:
            top = len(head.classes)
            recipe = head.recipe.replace(weights=str(weights) if weights else str(find_by_md5(head.recipe, path)),
                                         outputs=(), top=top, head=head.path)
            network = load_recipe(recipe, device=device)
        return network

    head.network = open_network
    return head


def locate(recipe):
    """The same recipe with `weights` set to a file on this machine (looked up by `model` if needed)."""
    if recipe.weights is not None:
        return recipe
    return recipe.replace(weights=str(find_weights(recipe.model)))
