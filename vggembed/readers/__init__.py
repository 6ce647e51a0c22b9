"""One reader per weight-file format. Each is plain numpy/scipy (no TensorFlow)
and returns canonical (params, WeightSpec); see `vggembed.weights` and `vggembed.spec`."""

import numpy as np

# TensorFlow adopts a CPU buffer without copying (DLPack) only when it is
# 64-byte aligned (Eigen's widest vectors); numpy aligns to 16. Readers
# allocate weights this way so the network can use them in place.
ALIGN = 64


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
