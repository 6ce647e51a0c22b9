"""Random VGG weights written in the exact layouts of the published files.

Real weights cannot be downloaded everywhere (CI, air-gapped machines), so
tests and benchmarks make their own: full-size for parity and speed, tiny
(a few channels) for everything else. Layouts follow
`shared/reference/weights-formats.md`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from . import arch as arch_mod

FULL_WIDTHS = (64, 128, 256, 512, 512)


def make_params(
    arch: str = "vgg16",
    widths: tuple[int, ...] = FULL_WIDTHS,
    fc: int | None = 4096,
    classes: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Canonical params (HWIO kernels, (in, out) fc matrices), He-scaled so
    activations keep a sane range through all layers. `fc=None` leaves the
    fully connected layers out, like a conv-only file."""
    rng = np.random.default_rng(seed)
    params = {}
    prev = 3
    for b, n in enumerate(arch_mod.CONFIGS[arch]):
        for i in range(1, n + 1):
            out = widths[b]
            w = rng.standard_normal((3, 3, prev, out), dtype=np.float32) * np.float32(np.sqrt(2 / (9 * prev)))
            params[f"conv{b + 1}_{i}"] = (w, rng.uniform(-0.1, 0.1, out).astype(np.float32))
            prev = out
    if fc is None:
        return params
    prev = 7 * 7 * prev
    for name, out in zip(arch_mod.FC_NAMES, (fc, fc, classes)):
        w = rng.standard_normal((prev, out), dtype=np.float32) * np.float32(np.sqrt(2 / prev))
        params[name] = (w, rng.uniform(-0.1, 0.1, out).astype(np.float32))
        prev = out
    return params


def write_npz(params, path) -> Path:
    """Frossard's layout: `{layer}_W`, `{layer}_b`, plain np.savez."""
    path = Path(path)
    np.savez(path, **{f"{n}_{s}": a for n, (w, b) in params.items() for s, a in (("W", w), ("b", b))})
    return path


def write_mat(params, path, *, layout: str = "matconvnet", labels=None, mean=(123.68, 116.779, 103.939)) -> Path:
    """MatConvNet's layout: `matconvnet` (layers + meta) or
    `matconvnet-beta16` (layers + classes + normalization).

    The two layouts use different struct field orders and bias shapes, as the
    real files do, so readers that index fields by position fail on one.
    """
    path = Path(path)
    beta16 = layout == "matconvnet-beta16"
    arch = "vgg19" if "conv3_4" in params else "vgg16"
    layers = []
    for layer in arch_mod.layers(arch):
        if layer.param and layer.param not in params:
            break
        if layer.kind in ("conv", "fc"):
            w, b = params[layer.name]
            if layer.kind == "fc":  # stored as convolutions: 7x7 for fc6, 1x1 after
                side = 7 if layer.name == "fc6" else 1
                w = w.reshape(side, side, -1, w.shape[-1])
            cell = np.empty((1, 2), dtype=object)
            cell[0, 0], cell[0, 1] = w, (b.reshape(1, -1) if beta16 else b.reshape(-1, 1))
            entry = {"weights": cell, "pad": np.array([[0, 0, 0, 0]] if layer.kind == "fc" else [[1, 1, 1, 1]], float),
                     "type": "conv", "name": layer.name, "stride": np.array([[1, 1]], float)}
        elif layer.kind == "pool":
            entry = {"name": layer.name, "type": "pool", "method": "max", "pool": np.array([[2, 2]], float),
                     "stride": np.array([[2, 2]], float), "pad": np.array([[0, 1, 0, 1]], float)}
        else:
            entry = {"name": layer.name, "type": layer.kind, "leak": 0.0} if layer.kind == "relu" else \
                {"name": layer.name, "type": layer.kind}
        if not beta16:  # newer files list name and type first
            entry = {k: entry[k] for k in ("name", "type", *[k for k in entry if k not in ("name", "type")])}
        layers.append(entry)
    cells = np.empty((1, len(layers)), dtype=object)
    for i, entry in enumerate(layers):
        cells[0, i] = entry

    n_classes = params["fc8"][0].shape[-1] if "fc8" in params else 1000
    labels = list(labels) if labels is not None else [f"synthetic class {i}" for i in range(n_classes)]
    classes = {"name": _cell([f"n{i:08d}" for i in range(len(labels))]), "description": _cell(labels)}
    mean = np.asarray(mean, dtype=np.float32)
    if beta16:
        average = np.broadcast_to(mean, (224, 224, 3)).copy()
        norm = {"averageImage": average, "keepAspect": 1.0, "border": np.array([[32, 32]], float),
                "imageSize": np.array([[224, 224, 3]], float), "interpolation": "bilinear"}
        scipy.io.savemat(path, {"layers": cells, "classes": classes, "normalization": norm}, do_compression=False)
    else:
        norm = {"imageSize": np.array([[224, 224, 3]], float), "averageImage": mean.reshape(3, 1),
                "keepAspect": 1.0, "border": np.array([[32, 32]], float), "interpolation": "bilinear",
                "cropSize": 0.875}
        meta = {"inputs": {"name": "input", "size": np.array([[224, 224, 3, 10]], float)},
                "classes": classes, "normalization": norm}
        scipy.io.savemat(path, {"layers": cells, "meta": meta}, do_compression=False)
    return path


def _cell(strings) -> np.ndarray:
    cell = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        cell[0, i] = s
    return cell


def photo_crops(photo, folder, n: int, size=(64, 48), suffix=".png") -> list[Path]:
    """`n` different small crops of one real photo, named 0000..., for runs over many files."""
    from PIL import Image

    base = Image.open(photo).convert("RGB")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        x, y = (i * 7) % (base.width - size[0]), (i * 13) % (base.height - size[1])
        paths.append(folder / f"img{i:06d}{suffix}")
        base.crop((x, y, x + size[0], y + size[1])).save(paths[-1])
    return paths
