"""The recipe: everything that decides what an embedding's numbers mean.

One `Recipe` is built once from the command-line options (or the Python
arguments) and shared by every part of a run: the local and Ray engines read
it to load the network and decode images, the writers record it beside the
vectors (`OUT.meta.json`, Parquet schema metadata, the Ray manifest), `--resume`
and `merge` check it, and `search` embeds its queries with the index's own
recipe. Two vector files are comparable only when their recipes match.

How a run goes (batch size, threads, device, progress) is not part of the
recipe: those are `local.Options`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ..errors import VGGEmbedError

# The package's version (pyproject.toml reads it here); recorded with every output it makes.
__version__ = "0.1.0"

# The fields two vector files must share for their rows to be comparable.
COMPARED = ("weights_md5", "arch", "layer", "pool", "resize", "precision", "dtype", "l2_normalize", "fast_decode",
            "legacy_transpose", "calibration")


@dataclass(frozen=True)
class Recipe:
    """How vectors are made.

    Args:
        weights: the weight file on this machine (None: look for `model`).
        model: the published file to look for when `weights` is None (not recorded).
        layer: the embedding layer; canonical once bound (`fc2` becomes `relu7`).
        pool: avg, max or flatten for conv/pool layers.
        resize: squash, center-crop or none.
        precision: float32, bf16, fp16 or int8.
        dtype: float32 or float16 in the output.
        l2_normalize: unit-length rows.
        fast_decode: JPEG reduced-size decoding.
        legacy_transpose: the VGG19 seed's (1, 0, 2, 3) kernel transpose.
        calibration: int8 only: the folder of calibration images (None: the built-in set).
        arch, weights_md5: known once the weight file is read (`bind`).
        vggembed_version: the version that made the vectors.
    """

    weights: str | None = None
    model: str = "vgg16"
    layer: str = "fc2"
    pool: str | None = None
    resize: str = "squash"
    precision: str = "float32"
    dtype: str = "float32"
    l2_normalize: bool = False
    fast_decode: bool = False
    legacy_transpose: bool = False
    calibration: str | None = None
    arch: str | None = None
    weights_md5: str | None = None
    vggembed_version: str = __version__

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def bind(self, spec, layer: str | None = None) -> "Recipe":
        """Fill in what the loaded weight file says: its architecture, its MD5, the canonical layer."""
        return self.replace(weights=spec.path, arch=spec.arch, weights_md5=spec.md5, layer=layer or self.layer)

    # ---------------------------------------------------------- on disk
    def to_dict(self) -> dict:
        """The recorded form: the weight file by name and MD5, not by this machine's path."""
        return {
            "vggembed_version": self.vggembed_version,
            "weights": os.path.basename(self.weights) if self.weights else None,
            "weights_md5": self.weights_md5,
            "arch": self.arch,
            "layer": self.layer,
            "pool": self.pool,
            "resize": self.resize,
            "precision": self.precision,
            "dtype": self.dtype,
            "l2_normalize": self.l2_normalize,
            "fast_decode": self.fast_decode,
            "legacy_transpose": self.legacy_transpose,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def mismatches(self, other: "Recipe") -> list[str]:
        """'field: mine vs theirs' for every field that makes the two recipes' vectors incomparable."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in COMPARED if a[k] != b[k]]

    def check_same(self, other: "Recipe", what: str, hint: str = "") -> None:
        """Raise naming `what` (and the differing fields) when `other`, a recorded recipe, differs from this one."""
        diff = self.mismatches(other)
        if diff:
            raise VGGEmbedError(f"{what} was made with another recipe ({'; '.join(diff)})" + (f"; {hint}" if hint else ""))


def meta_json(recipe: Recipe, **counts) -> bytes:
    """The `OUT.meta.json` document: the recipe and the row counts."""
    return (json.dumps({"recipe": recipe.to_dict(), **counts}, indent=1) + "\n").encode()


def read_meta(path) -> dict:
    """A `.meta.json` document; VGGEmbedError naming the file when it is not one."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError) as e:
        raise VGGEmbedError(f"{path}: not a readable vggembed meta file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("recipe"), dict):
        raise VGGEmbedError(f"{path}: has no recipe")
    return doc
