"""One reader per weight-file format. Each is plain numpy/scipy (no TensorFlow)
and returns canonical (params, WeightSpec); see `vggembed.weights` and `vggembed.spec`."""

import numpy as np

from ...errors import WeightFileError
from .. import arch as arch_mod

# TensorFlow adopts a CPU buffer without copying (DLPack) only when it is
# 64-byte aligned (Eigen's widest vectors); numpy aligns to 16. Readers
# allocate weights this way so the network can use them in place.
ALIGN = 64

# Trained weights are noise-like floats that deflate shrinks by under 10%;
# a compressed member (.npz) or variable (.mat) that inflates to far more
# than that is a deflate bomb (deflate itself allows up to 1032:1). Small
# ones (biases of zeros, a .mat's class names and struct headers) are let
# through by the allowance.
MAX_INFLATE_RATIO = 16
INFLATE_ALLOWANCE = 1 << 20


def aligned_empty(shape, dtype, order: str = "C") -> np.ndarray:
    """An uninitialised array whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start: start + nbytes].view(dtype).reshape(shape, order=order)


def aligned_float32(arr) -> np.ndarray:
    """`arr` as a writeable, C-contiguous, aligned float32 array; copied only if it is not one already."""
    arr = np.asarray(arr)
    if arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.writeable and arr.ctypes.data % ALIGN == 0:
        return arr
    out = aligned_empty(arr.shape, np.float32)
    out[...] = arr
    return out


# Far above any VGG (conv layers have at most 512 channels, fc layers 4096,
# ImageNet-21k 21841 classes): wider layers are a forged header, refused
# before memory is allocated for them.
MAX_CONV_WIDTH = 4096
MAX_FC_WIDTH = 65536


def check_params(path, arch: str, params: dict) -> None:
    """Check that every kernel fits the one before it; raise naming the key.

    Only shapes are read, so `params` may hold shape-only stand-ins
    (`np.broadcast_to`) for arrays not read yet.
    """
    prev = 3
    for name in arch_mod.conv_names(arch):
        w, b = params[name]
        _expect(path, name, w, (3, 3, prev, None))
        _at_most(path, name, w, MAX_CONV_WIDTH)
        _expect(path, name + " bias", b, (w.shape[-1],))
        prev = w.shape[-1]
    if "fc6" not in params:
        return
    prev = 7 * 7 * prev  # pool5 is 7x7 at the 224x224 training size
    for name in arch_mod.FC_NAMES:
        w, b = params[name]
        _expect(path, name, w, (prev, None))
        _at_most(path, name, w, MAX_FC_WIDTH)
        _expect(path, name + " bias", b, (w.shape[-1],))
        prev = w.shape[-1]


def _expect(path, key, arr, shape) -> None:
    ok = arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise WeightFileError(path, f"{key} has shape {tuple(arr.shape)}; expected {want}")


def _at_most(path, key, arr, width) -> None:
    if arr.shape[-1] > width:
        raise WeightFileError(path, f"{key} has {arr.shape[-1]} outputs; a VGG-shaped layer has at most {width}")
