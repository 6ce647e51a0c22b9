"""A trained head: the user's own classes on top of one output of the network.

`vggembed train` fits it (`use/train.py`); `classify --head`, `export --head` and
`serve --head` run it. Attached to a network (`VGG.attach_head`, done by
`load.load_recipe` when the recipe names a head), it replaces ImageNet's
softmax: the network's `prob` becomes the head's probabilities and its labels
the head's classes, so every consumer of `--top` (the local and Ray engines,
the writers, serve, export) ranks the user's classes unchanged.

HEAD.npz holds plain arrays, loadable with numpy alone
(`np.load(path, allow_pickle=False)`):

| key | value |
| --- | --- |
| `format`, `format_version` | `"vggembed-head"`, 1 |
| `kind` | `"logistic"`: multinomial logistic regression (softmax, cross-entropy, L2) |
| `classes` | (K,) str: class names (at least two, none empty, no two alike); column k of `coef` is `classes[k]` |
| `coef`, `intercept` | (D, K) and (K,) float32, on standardised features |
| `mean`, `scale` | (D,) float32: features are standardised as `(x - mean) / scale` before `coef` |
| `C` | float64 scalar: the inverse L2 strength (`0.5 * |coef|^2 + C * sum of cross-entropies`), as scikit-learn's |
| `recipe` | str: JSON of the features' recipe (weights MD5, layer, pool, resize, precision, version) |
| `metrics` | str: JSON of the evaluation (`use/train.py`'s `evaluate`) |

So `softmax(((x - mean) / scale) @ coef + intercept)` gives the probabilities.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VGGEmbedError, display, reason
from ..images.safeio import open_regular
from ..store.recipe import Recipe

FORMAT = "vggembed-head"
FORMAT_VERSION = 1
KINDS = ("logistic",)
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # what np.load takes for an .npz: a zip's first entry, or an empty zip
KEYS = ("format", "format_version", "kind", "classes", "coef", "intercept", "mean", "scale", "C", "recipe",
        "metrics")
# The recipe fields a head's features must share with the network it runs on. dtype is not one: a head trained
# on float16-rounded vectors runs as well on float32 ones.
FEATURE_FIELDS = ("weights_md5", "arch", "resize", "precision", "l2_normalize", "fast_decode", "legacy_transpose",
                  "calibration", "int8_scheme")


@dataclass
class Head:
    """A multinomial logistic regression on one output of the network.

    Attributes:
        classes: the class names, in column order.
        coef, intercept: (D, K) and (K,) float32 weights on standardised features.
        mean, scale: (D,) float32 standardisation.
        C: the inverse regularisation strength it was fitted at.
        recipe: the recipe of the features it was trained on (one output, no top).
        metrics: its evaluation (see `use/train.py`).
        path, md5: the file it was read from or saved to.
    """

    classes: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    C: float
    recipe: Recipe
    metrics: dict = field(default_factory=dict)
    kind: str = "logistic"
    path: str | None = None
    md5: str | None = None
    network: object = field(default=None, repr=False)  # set by `load.load_head`: fn() -> the network it runs on

    def __post_init__(self):
        self.classes = class_names(self.classes, self.path or "head")
        d, k = self.coef.shape
        if k != len(self.classes) or self.intercept.shape != (k,) or self.mean.shape != (d,) \
                or self.scale.shape != (d,):
            raise VGGEmbedError(f"{self.path or 'head'}: arrays do not fit together: coef {self.coef.shape}, "
                                f"intercept {self.intercept.shape}, mean {self.mean.shape}, scale "
                                f"{self.scale.shape}, {len(self.classes)} classes")
        # The standardisation folded into the weights: one matmul per batch. In float64, so a row's probabilities
        # do not depend on how many rows share its batch or how many threads BLAS runs (float32 kernels sum in
        # different orders; float64 sums differ far below float32's resolution), and the local engine, Ray,
        # serve and `predict_proba` give the same numbers.
        self._w = self.coef.astype(np.float64) / self.scale.astype(np.float64)[:, None]
        self._b = self.intercept.astype(np.float64) - self.mean.astype(np.float64) @ self._w

    @property
    def output(self):
        """The network output (`store.recipe.Output`) the head reads."""
        return self.recipe.outputs[0]

    @property
    def dim(self) -> int:
        return self.coef.shape[0]

    # ----------------------------------------------------------- predicting
    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b), float32, with the standardisation folded in: logits = x @ W + b on raw features."""
        return self._w.astype(np.float32), self._b.astype(np.float32)

    def logits(self, vectors: np.ndarray) -> np.ndarray:
        """(N, K) float64 logits of raw feature rows (as `embed` writes them); rows holding NaN or infinite
        values are refused (they have no class), naming how many and the first."""
        out = self.raw_logits(vectors)
        bad = ~np.isfinite(out).all(axis=1)  # a NaN or infinite value in a row makes its logits so
        if bad.any():
            raise VGGEmbedError(f"{self.path or 'head'}: {int(bad.sum())} of {len(out)} rows hold NaN or infinite "
                                f"values (the first is row {int(np.argmax(bad))}); they have no class: leave them "
                                "out")
        return out

    def raw_logits(self, vectors: np.ndarray) -> np.ndarray:
        """`logits` without the check: the network's own rows (`VGG.run_outputs`), each batch's row on its own."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise VGGEmbedError(f"{self.path or 'head'}: takes {self.dim}-d {self.output.name} vectors; "
                                f"received shape {vectors.shape}")
        out = np.empty((len(vectors), len(self.classes)), np.float64)
        for start in range(0, len(vectors), 4096):  # float64 copies of a block at a time
            out[start:start + 4096] = vectors[start:start + 4096].astype(np.float64) @ self._w + self._b
        return out

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        """(N, K) float32 class probabilities of raw feature rows (as `embed` writes them); rows that are not
        finite are refused (`logits`)."""
        return softmax(self.logits(vectors)).astype(np.float32)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """`predict_proba` of the network's own rows, unchecked (`VGG.run_outputs`): as ImageNet's softmax, a row
        is not checked there."""
        return softmax(self.raw_logits(vectors)).astype(np.float32)

    def predict(self, vectors: np.ndarray) -> list[str]:
        """The most probable class name of each row; rows that are not finite are refused (`logits`)."""
        return [self.classes[i] for i in np.argmax(self.logits(vectors), axis=1)]

    def classify(self, images, top: int = 5, *, batch_size: int = 32) -> list:
        """Top classes of images (paths, bytes, PIL images or arrays), embedded as the head's features were:
        [[Prediction(rank, index, label, probability), ...], ...]. Needs a head from `vggembed.load_head` or
        `vggembed.train` (which know how to load its network)."""
        if self.network is None:
            raise VGGEmbedError("this head has no network to run on: load it with vggembed.load_head(path)")
        net = self.network()
        return net.classify(images, min(top, len(self.classes)), resize=self.recipe.resize, batch_size=batch_size)

    # ------------------------------------------------------------- checking
    def check_features(self, recipe: Recipe, where: str = "the network") -> None:
        """Refuse features of another recipe (weights, layer, pool, precision, ...): one line naming both."""
        mine, theirs = self.recipe.to_dict(), recipe.to_dict()
        diff = [f"{k} {_value(mine[k])} vs {_value(theirs[k])}" for k in FEATURE_FIELDS
                if mine[k] != theirs[k] and not (k == "weights_md5" and theirs[k] is None)]
        if diff:
            raise VGGEmbedError(f"{self.path or 'head'} was trained on features of another recipe than {where} "
                              f"({'; '.join(diff)}); use the weights and options it records "
                              f"(vggembed info {self.path or 'HEAD.npz'}), or train a head on these")

    def check_output(self, output, where: str) -> None:
        """Refuse vectors of another layer or pool than the head's."""
        if (output.layer, output.pool) != (self.output.layer, self.output.pool):
            raise VGGEmbedError(f"{self.path or 'head'} reads {_output(self.output)} but {where} holds "
                              f"{_output(output)}")

    # --------------------------------------------------------------- on disk
    def arrays(self) -> dict:
        return {
            "format": np.array(FORMAT), "format_version": np.array(FORMAT_VERSION), "kind": np.array(self.kind),
            "classes": np.array(self.classes, dtype=str), "coef": self.coef.astype(np.float32),
            "intercept": self.intercept.astype(np.float32), "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32), "C": np.array(float(self.C)),
            "recipe": np.array(json.dumps(self.recipe.to_dict())),
            "metrics": np.array(json.dumps(self.metrics, allow_nan=False)),
        }

    def write(self, f) -> None:
        """Write HEAD.npz's arrays to an open binary file."""
        np.savez(f, **self.arrays())


# Lone surrogates that are no byte escaped by surrogateescape: `display` cannot encode them.
_OTHER_SURROGATES = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def class_text(name) -> str:
    """A class name as text every consumer takes (JSON, Parquet, gRPC, the SavedModel's strings): bytes that are
    not UTF-8 (surrogate escapes, as in file names) as \\xNN, as `display` shows them and `train` names such
    classes; any other lone surrogate as \\uNNNN."""
    name = _OTHER_SURROGATES.sub(lambda m: f"\\u{ord(m.group()):04x}", str(name))
    return display(name)


def class_names(classes, where: str) -> list[str]:
    """A head's class names, as text (`class_text`), checked as `train` makes them: at least two, none empty,
    no two alike; one line naming `where` and the problem otherwise."""
    names = [class_text(c) for c in classes]
    empty = [i for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise VGGEmbedError(f"{where}: class {empty[0]} has an empty name; every class needs one")
    if len(names) < 2:
        raise VGGEmbedError(f"{where}: holds {len(names)} class{'' if len(names) == 1 else 'es'}"
                            f"{' (' + repr(names[0]) + ')' if names else ''}; a head ranks at least two")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise VGGEmbedError(f"{where}: classes {seen[n]} and {i} are both named {n!r}; each class needs its "
                                "own name")
        seen[n] = i
    return names


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def read_head(path) -> Head:
    """A HEAD.npz file; one line naming the file and what is wrong when it is not one."""
    path = Path(path)
    try:
        with open_regular(path, "head file") as f:  # a FIFO or a device is refused, never waited on
            data = f.read()
    except OSError as e:
        raise VGGEmbedError(f"{path}: cannot read the head ({reason(e)})") from None
    if not data.startswith(ZIP_MAGIC):  # else numpy reads it as a .npy or talks of pickles
        what = ("an empty file" if not data else "a .npy array" if data.startswith(b"\x93NUMPY")
                else "not a zip archive")
        raise VGGEmbedError(f"{path}: not a .npz head file ({what}); make one with vggembed train")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise VGGEmbedError(f"{path}: not a vggembed head (no {', '.join(missing)}); make one with "
                                    "vggembed train")
            a = {k: z[k] for k in KEYS}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise VGGEmbedError(f"{path}: not a vggembed head ({reason(e)})") from None
    if str(a["format"]) != FORMAT or int(a["format_version"]) > FORMAT_VERSION:
        raise VGGEmbedError(f"{path}: format {str(a['format'])!r} version {int(a['format_version'])}; this "
                            f"vggembed reads {FORMAT!r} up to version {FORMAT_VERSION}")
    if str(a["kind"]) not in KINDS:
        raise VGGEmbedError(f"{path}: head kind {str(a['kind'])!r} is not one this vggembed runs ({KINDS})")
    try:
        recipe = Recipe.from_dict(json.loads(str(a["recipe"])))
        metrics = json.loads(str(a["metrics"]))
    except (ValueError, TypeError, KeyError) as e:
        raise VGGEmbedError(f"{path}: its recipe or metrics are not readable ({reason(e)})") from None
    if len(recipe.outputs) != 1:
        raise VGGEmbedError(f"{path}: its recipe names {len(recipe.outputs)} outputs; a head reads one")
    arrays = {k: np.asarray(a[k], np.float32) for k in ("coef", "intercept", "mean", "scale")}
    if not all(np.isfinite(v).all() for v in arrays.values()) or not (arrays["scale"] > 0).all():
        raise VGGEmbedError(f"{path}: holds NaN, infinite or non-positive scale values")
    if arrays["coef"].ndim != 2:
        raise VGGEmbedError(f"{path}: coef has shape {arrays['coef'].shape}; expected (D, K)")
    classes = a["classes"]
    if classes.ndim != 1:
        raise VGGEmbedError(f"{path}: classes has shape {classes.shape}; expected (K,) class names")
    if classes.dtype.kind != "U":
        raise VGGEmbedError(f"{path}: class names are {classes.dtype.name} values, not text")
    return Head(classes=classes.tolist(), C=float(a["C"]), recipe=recipe, metrics=metrics,
                kind=str(a["kind"]), path=str(path), md5=hashlib.md5(data).hexdigest(), **arrays)


def _value(v) -> str:
    return repr(v) if not isinstance(v, str) or len(v) < 40 else repr(v[:12] + "...")


def _output(o) -> str:
    return f"{o.name} ({o.layer}{':' + o.pool if o.pool else ''})"
