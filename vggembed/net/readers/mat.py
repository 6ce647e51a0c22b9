"""MatConvNet `.mat` files, in both layouts found in the wild.

- older (v1.0-beta16): top-level `layers`, `classes`, `normalization`;
  `normalization.averageImage` is a whole mean image.
- newer: top-level `layers` and `meta` (`meta.normalization`, `meta.classes`);
  `averageImage` is the mean pixel.

Struct fields are read by name, never by position: their order differs
between files. Kernels are stored HWIO for RGB input (MatConvNet's Caffe
importer reverses the blob's axes and swaps the first two), so they are used
as stored; fc6..fc8 are stored as convolutions and become matrices here.

scipy's parser can crash on a forged file, so each file version is parsed
first in a child process (`check_survivable`); see the section below.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from ...errors import WeightFileError
from ...images.safeio import open_regular
from .. import arch as arch_mod
from ..cache import recall, remember
from ..spec import WeightSpec
from . import INFLATE_ALLOWANCE, MAX_INFLATE_RATIO, aligned_float32

# The top-level variables each layout needs; anything else in the file
# (however large) is never read.
LAYOUTS = {
    "matconvnet": ("layers", "meta"),
    "matconvnet-beta16": ("layers", "normalization", "classes"),
}
# VGG19 has 43 MatConvNet layers (conv, relu, pool, softmax, dropout).
MAX_LAYERS = 1000


def read(path: Path, *, legacy_transpose: bool = False):
    try:
        with open_regular(path, "weight file") as f:
            check_survivable(f, path)
            layout, data = _parse(f, path)
    except NotImplementedError:
        raise WeightFileError(path, "is a MATLAB v7.3 (HDF5) file; save it as -v7 to read it") from None
    except MemoryError:
        raise WeightFileError(path, "holds arrays too large for memory (a forged or corrupt file?)") from None
    except (ValueError, TypeError, OSError, EOFError, zlib.error, IndexError) as e:
        raise WeightFileError(path, f"not a readable MATLAB .mat file (truncated or corrupt?): {e}") from None
    if layout == "matconvnet":
        meta = _unwrap(data["meta"])
        norm = _field(path, meta, "normalization", "meta")
        classes = _field(path, meta, "classes", "meta", required=False)
    else:
        norm, classes = data["normalization"], data.get("classes")

    mean = np.asarray(_field(path, norm, "averageImage", "normalization"), dtype=np.float64)
    if mean.size % 3:
        raise WeightFileError(path, f"normalization.averageImage has shape {mean.shape}; expected 3 values or HxWx3")
    mean_pixel = tuple(float(v) for v in mean.reshape(-1, 3).mean(axis=0))
    size = _field(path, norm, "imageSize", "normalization", required=False)
    input_size = (224, 224) if size is None else tuple(int(v) for v in np.asarray(size).ravel()[:2])

    labels = None
    if classes is not None:
        desc = _field(path, classes, "description", "classes", required=False)
        labels = _strings(desc) if desc is not None else None

    convs = _conv_layers(path, data["layers"])
    names = [n for n, _, _ in convs]
    if "conv3_4" in names:
        arch = "vgg19"
    elif "conv1_1" in names:
        arch = "vgg16"
    else:
        raise WeightFileError(path, f"holds no VGG conv layers (expected conv1_1, ...); found: {names[:8]}")
    wanted = arch_mod.conv_names(arch)
    has_fc = any(n in arch_mod.FC_NAMES for n in names)
    if has_fc:
        wanted += list(arch_mod.FC_NAMES)
    if names != wanted:
        missing = [n for n in wanted if n not in names]
        detail = f"missing {missing}" if missing else f"unexpected order or extra layers {names}"
        raise WeightFileError(path, f"conv layers do not match {arch}: {detail}")

    params = {}
    for name, kernel, bias in convs:
        if kernel.ndim != 4:
            raise WeightFileError(path, f"{name} kernel has shape {kernel.shape}; expected 4 dimensions")
        if name in arch_mod.FC_NAMES:
            # HWIO flattened row-major == TensorFlow's NHWC flatten of the input.
            kernel = kernel.reshape(-1, kernel.shape[-1])
        elif legacy_transpose:
            kernel = kernel.transpose(1, 0, 2, 3)
        params[name] = (aligned_float32(kernel), aligned_float32(bias.reshape(-1)))

    spec = WeightSpec(
        path=str(path),
        arch=arch,
        format="mat",
        layout=layout,
        mean_pixel=mean_pixel,
        input_size=input_size,
        labels=labels,
        labels_source="the .mat file" if labels is not None else None,
        legacy_transpose=legacy_transpose,
    )
    return params, spec


def _parse(f, path) -> tuple[str, dict]:
    """(layout, the layout's top-level variables as loadmat returns them) of the open file `f`."""
    import scipy.io  # here: a cached int8 run, which reads a .npz, need not pay its 0.3 s import

    # Before scipy reads a compressed variable: even listing one
    # inflates a whole 128 KiB block of it at once (up to 132 MB).
    _check_inflated_sizes(f, path, {n for need in LAYOUTS.values() for n in need})
    f.seek(0)
    listed = {name: shape for name, shape, _ in scipy.io.whosmat(f)}
    # whosmat seeks past each variable, so it stops past the end of
    # a file whose last variable was cut (and on the last byte of a whole one).
    if f.tell() >= os.fstat(f.fileno()).st_size:
        raise WeightFileError(path, "not a readable MATLAB .mat file (truncated or corrupt?): "
                                    "its last variable runs past the end of the file")
    layout = next((k for k, need in LAYOUTS.items() if set(need[:2]) <= set(listed)), None)
    if layout is None:
        raise WeightFileError(
            path,
            f"unknown .mat layout: top-level variables are {sorted(listed)}; expected layers+meta "
            "(MatConvNet) or layers+classes+normalization (MatConvNet beta16)",
        )
    if math.prod(listed["layers"]) > MAX_LAYERS:
        raise WeightFileError(path, f"layers has shape {listed['layers']}; a VGG has under {MAX_LAYERS} layers")
    f.seek(0)
    return layout, scipy.io.loadmat(f, struct_as_record=False, squeeze_me=False,
                                    variable_names=[n for n in LAYOUTS[layout] if n in listed])


# ------------------------------------------------- a parser that may crash
# scipy's MAT reader is C code that a forged file can crash outright (a tiny
# one makes loadmat segfault: exit 139, no message). So a file is first parsed
# in a child process, once per file version, and the verdict remembered in the
# cache like the file's MD5; the parent reads it only if the child survived.
VERDICT = "mat-parse"  # the cache's folder for these verdicts
SURVIVED = "survived"
# Deaths that say something about the file (the parser's own fault), so they are remembered. Any other
# signal (SIGKILL from an out-of-memory killer or a user, say) is reported but the file is tried again next time.
CRASHES = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from vggembed.net.readers.mat import _validate; _validate(int(sys.argv[2]))")


def check_survivable(f, path) -> None:
    """Raise a WeightFileError naming `path` if parsing the open file `f` kills the process that does it.

    The child parses exactly what the parent will read (the same open file,
    passed by descriptor) as `read` does (inflation check, whosmat,
    loadmat), and no more; a file version that was seen to survive costs
    one stat and one small cache read."""
    st = os.fstat(f.fileno())
    verdict = recall(VERDICT, path, st)
    if verdict is None:
        verdict = _parse_in_child(f)
        if verdict is None:
            return  # no child could be started: read as before
        if verdict == SURVIVED or verdict in {s.name for s in CRASHES}:
            remember(VERDICT, path, st, verdict)
    if verdict == SURVIVED:
        return
    if verdict in {s.name for s in CRASHES}:
        raise WeightFileError(path, f"crashed the MAT parser (scipy.io.loadmat died of {verdict}); a forged or "
                                    "corrupt .mat file")
    raise WeightFileError(path, f"the MAT parser reading it was ended by {verdict} (out of memory?)")


def _parse_in_child(f) -> str | None:
    """SURVIVED, or the name of the signal that killed a child parsing `f`; None if none could start."""
    package_root = str(Path(__file__).resolve().parents[3])  # the folder holding `vggembed`
    try:
        rc = subprocess.run([sys.executable, "-c", _CHILD, package_root, str(f.fileno())],
                            pass_fds=(f.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL).returncode
    except (OSError, ValueError):
        return None
    if rc >= 0:
        return SURVIVED  # whatever the parse found, the parent finds again and says
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _validate(fd: int) -> None:
    """The child: parse the file open as `fd` as `read` does, and exit; only a crash is news to the parent."""
    with os.fdopen(fd, "rb") as f:
        try:
            _parse(f, f"/dev/fd/{fd}")
        except Exception:  # noqa: BLE001 - the parent reads the file again and reports what is wrong
            pass
    os._exit(0)  # no clean-up of what was read: the parent is waiting


MI_MATRIX, MI_COMPRESSED = 14, 15
_CHUNK = 1 << 20


def _check_inflated_sizes(f, path, names) -> None:
    """Refuse a compressed variable named in `names` that inflates to far more than its compressed size.

    loadmat inflates a compressed (miCOMPRESSED) variable as its nested
    headers ask, into memory, before anything can be checked; a few MB of
    zlib can ask for gigabytes. Here each needed one is inflated a chunk at
    a time and only counted. The bound is relative (MAX_INFLATE_RATIO, as for
    .npz) rather than absolute: real weights barely compress (the published
    VGG19's 548 MB of float32 `layers` shrink by a few percent), and it keeps
    what loadmat may then allocate to 16x the variable's own bytes in the
    file, where a fixed bound such as 2 GiB would still let a 2 MB file take
    2 GiB. Uncompressed variables need no check: whosmat's walk already
    refuses one that runs past the end of the file, and loadmat reads them
    from the file itself. MAT v4 files have no compression.
    """
    f.seek(0)
    header = f.read(128)
    endian = {b"IM": "<", b"MI": ">"}.get(header[126:128])
    if endian is None:
        return
    tag = struct.Struct(endian + "II")
    size, pos = os.fstat(f.fileno()).st_size, 128
    while pos + 8 <= size:
        f.seek(pos)
        mdtype, nbytes = tag.unpack(f.read(8))
        if mdtype >> 16:  # small data element: type and 1..4 bytes of data in 8 bytes
            pos += 8
            continue
        pos += 8 + nbytes  # as loadmat steps: top-level elements are not padded
        if mdtype != MI_COMPRESSED:
            continue
        bound = MAX_INFLATE_RATIO * nbytes + INFLATE_ALLOWANCE
        inflate, data, head, name, total, left = zlib.decompressobj(), b"", b"", None, 0, nbytes
        while not inflate.eof:
            if not data:
                if not left:
                    break  # cut short: loadmat says so
                data = f.read(min(_CHUNK, left))
                if not data:
                    break
                left -= len(data)
            out = inflate.decompress(data, _CHUNK)
            data = inflate.unconsumed_tail
            total += len(out)
            if name is None:
                head += out[: 4096 - len(head)]
                name = _element_name(head, endian, final=len(head) >= 4096 or inflate.eof)
                if name is not None and name not in names:
                    break
            if total > bound:
                raise WeightFileError(
                    path, f"variable {name} would inflate from {nbytes} to more than {bound} bytes, far more "
                          "than weights ever compress (a deflate bomb or a forged file)")


def _element_name(head: bytes, endian: str, final: bool):
    """The variable name in the first inflated bytes of a compressed variable, "" if it has none
    (or is not a matrix); None while more bytes are needed to tell."""
    tag = struct.Struct(endian + "II")
    try:
        mdtype, _ = tag.unpack_from(head, 0)
        if mdtype != MI_MATRIX:
            return ""
        at = 8
        for _ in range(3):  # array flags, dimensions, name
            mdtype, n = tag.unpack_from(head, at)
            if mdtype >> 16:
                n, start, at = mdtype >> 16, at + 4, at + 8
            else:
                start, at = at + 8, at + 8 + -(-n // 8) * 8
        if start + n > len(head):
            raise struct.error("short")
    except struct.error:
        return "" if final else None
    return head[start: start + n].decode("latin1")


def _conv_layers(path, layers):
    """(name, kernel, bias) of every `conv`-type layer, in file order."""
    out = []
    cells = np.asarray(layers).ravel()
    for i, cell in enumerate(cells):
        layer = _unwrap(cell)
        where = f"layers{{{i + 1}}}"
        if _string(_field(path, layer, "type", where)) != "conv":
            continue
        name = _string(_field(path, layer, "name", where))
        fields = _fieldnames(layer)
        if "weights" in fields:
            w = np.asarray(getattr(layer, "weights")).ravel()
            if w.size != 2:
                raise WeightFileError(path, f"{name}.weights holds {w.size} arrays; expected {{kernel, bias}}")
            kernel, bias = w[0], w[1]
        elif "filters" in fields and "biases" in fields:  # MatConvNet before beta8
            kernel, bias = layer.filters, layer.biases
        else:
            raise WeightFileError(path, f"{name} has no weights field (fields: {fields})")
        out.append((name, np.asarray(kernel), np.asarray(bias)))
    return out


def _unwrap(x):
    """Strip the 1x1 cell and struct arrays that loadmat wraps values in."""
    while isinstance(x, np.ndarray) and x.dtype == object and x.size == 1:
        x = x.flat[0]
    if isinstance(x, np.ndarray) and x.dtype.kind == "V" and x.size == 1:
        x = x.flat[0]
    return x


def _fieldnames(s) -> list[str]:
    return list(getattr(s, "_fieldnames", None) or [])


def _field(path, struct, name, where, required=True):
    s = _unwrap(struct)
    if name not in _fieldnames(s):
        if not required:
            return None
        raise WeightFileError(path, f"{where} has no field {name!r} (fields: {_fieldnames(s)})")
    return _unwrap(getattr(s, name))


def _string(x) -> str:
    x = _unwrap(x)
    if isinstance(x, np.ndarray):
        return "".join(str(v) for v in x.ravel())
    return str(x)


def _strings(x) -> list[str]:
    arr = np.asarray(x)
    if arr.dtype == object:
        return [_string(v) for v in arr.ravel()]
    if arr.dtype.kind == "U" and arr.ndim == 2 and arr.shape[0] > 1:  # char matrix, one row each
        return ["".join(row).rstrip() for row in arr]
    return [str(v).rstrip() for v in arr.ravel()]
