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
__version__ = "0.2.0"

# The fields two vector files must share for their rows to be comparable.
COMPARED = ("weights_md5", "arch", "outputs", "top", "resize", "precision", "dtype", "l2_normalize", "fast_decode",
            "legacy_transpose", "calibration", "int8_scheme", "head_md5")

# `--precision`: float32, bf16 and fp16 run on TensorFlow (`net.model.VGG`), int8 on LiteRT (`net.int8.Int8VGG`).
PRECISIONS = ("float32", "bf16", "fp16", "int8")

# How `--precision int8` plans and builds its model (net/int8.py's cache key carries it too). A change that moves
# int8 vectors bumps it, so outputs made before are not mixed with new ones (resume, merge, search queries).
# 2: TensorFlow's converter; 3: the model written by vggembed from a plan computed by LiteRT and numpy;
# 4: the built-in calibration views resized by vggembed in integer arithmetic instead of by Pillow (whose
# resampling changed between 12.3 and 13.0), so every machine makes the same model.
INT8_SCHEME = 4


# The columns (Parquet, CSV) and arrays (.npz) of `--top K`: K class indices, probabilities and labels per image.
TOP_COLUMNS = ("top_index", "top_prob", "top_label")


def output_name(layer: str, pool: str | None) -> str:
    """The name an output is written under when none was given: `pool5_avg`, `relu7`."""
    return f"{layer}_{pool}" if pool else layer


@dataclass(frozen=True)
class Output:
    """One vector output of a run (see `net.arch.parse_outputs`, which makes them from `--layer` values).

    Args:
        layer: the canonical layer (`relu7` for `fc2`).
        pool: for conv/pool layers, how the map becomes a vector (avg, max, flatten, gem, rmac); None for fc layers.
        name: the column / array name it is written under, as the user named it (`fc2`, `pool5_avg`).
    """

    layer: str
    pool: str | None = None
    name: str = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", output_name(self.layer, self.pool))

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "pool": self.pool}


FC2 = Output("relu7", None, "fc2")


@dataclass(frozen=True)
class Recipe:
    """How vectors are made.

    Args:
        weights: the weight file on this machine (None: look for `model`).
        model: the published file to look for when `weights` is None (not recorded).
        outputs: the vector outputs, in order (`Output`s; fc2 by default); may be empty when `top` is set.
        top: K, to add the top-K ImageNet predictions (`TOP_COLUMNS`); 0 for none.
        resize: squash, center-crop or none.
        precision: float32, bf16, fp16 or int8.
        dtype: float32 or float16 in the output.
        l2_normalize: unit-length rows.
        fast_decode: JPEG reduced-size decoding.
        legacy_transpose: the VGG19 seed's (1, 0, 2, 3) kernel transpose.
        calibration: int8 only: the folder of calibration images (None: the built-in set).
        int8_scheme: int8 only, known once bound: `INT8_SCHEME`, how the int8 model was planned and built.
        arch, weights_md5: known once the weight file is read (`bind`).
        head: a trained head (`vggembed train`'s HEAD.npz) on this machine: with it, `top` ranks the head's own
            classes instead of ImageNet's (`net.head`).
        head_md5: the head file's MD5, recorded and compared as the weights' is.
        vggembed_version: the version that made the vectors.
    """

    weights: str | None = None
    model: str = "vgg16"
    outputs: tuple = (FC2,)
    top: int = 0
    resize: str = "squash"
    precision: str = "float32"
    dtype: str = "float32"
    l2_normalize: bool = False
    fast_decode: bool = False
    legacy_transpose: bool = False
    calibration: str | None = None
    int8_scheme: int | None = None
    arch: str | None = None
    weights_md5: str | None = None
    head: str | None = None
    head_md5: str | None = None
    vggembed_version: str = __version__

    def __post_init__(self):
        # outputs may be given as (layer, pool, name) tuples, as `net.arch.parse_outputs` makes them
        object.__setattr__(self, "outputs", tuple(o if isinstance(o, Output) else Output(*o) for o in self.outputs))

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def bind(self, spec, head=None) -> "Recipe":
        """Fill in what the loaded weight file says: its architecture and its MD5 (and, for int8, the scheme);
        with a head (`net.head.Head`) that `top` ranks, its file and MD5."""
        return self.replace(weights=spec.path, arch=spec.arch, weights_md5=spec.md5,
                            int8_scheme=INT8_SCHEME if self.precision == "int8" else None,
                            head=head.path if head is not None and self.top else None,
                            head_md5=head.md5 if head is not None and self.top else None)

    @property
    def names(self) -> list[str]:
        """Every array a run of this recipe writes, in order: the outputs' names, then `TOP_COLUMNS` with --top."""
        return [o.name for o in self.outputs] + (list(TOP_COLUMNS) if self.top else [])

    def select(self, name: str | None = None, where: str = "the file") -> "Recipe":
        """The recipe of one of the vector outputs (by name; None: the only one, or the first), as if it had
        been made alone: what search, dedup and cluster compare and embed queries with."""
        if not self.outputs:
            raise VGGEmbedError(f"{where}: holds predictions only (top {self.top}), no vectors")
        if name is None:
            return self.replace(outputs=self.outputs[:1], top=0)
        for o in self.outputs:
            if o.name == name:
                return self.replace(outputs=(o,), top=0)
        raise VGGEmbedError(f"{where}: has no vectors named {name!r}; it holds "
                            f"{', '.join(o.name for o in self.outputs)}")

    # ---------------------------------------------------------- on disk
    def to_dict(self) -> dict:
        """The recorded form: the weight file by name and MD5, not by this machine's path."""
        return {
            "vggembed_version": self.vggembed_version,
            "weights": os.path.basename(self.weights) if self.weights else None,
            "weights_md5": self.weights_md5,
            "arch": self.arch,
            "outputs": [o.to_dict() for o in self.outputs],
            "top": self.top,
            "resize": self.resize,
            "precision": self.precision,
            "dtype": self.dtype,
            "l2_normalize": self.l2_normalize,
            "fast_decode": self.fast_decode,
            "legacy_transpose": self.legacy_transpose,
            "calibration": self.calibration,
            "int8_scheme": self.int8_scheme,
            "head": os.path.basename(self.head) if self.head else None,
            "head_md5": self.head_md5,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A recorded recipe; one recorded before several outputs existed (`layer`, `pool`) is that one output."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in names}
        if "outputs" in d:
            fields["outputs"] = tuple(Output(o["layer"], o.get("pool"), o.get("name") or "")
                                      for o in d["outputs"] or ())
        elif "layer" in d:  # fc layers ignored --pool then, and recorded it
            pool = None if d["layer"] in ("fc6", "relu6", "fc7", "relu7", "fc8", "prob") else d.get("pool")
            fields["outputs"] = (Output(d["layer"], pool),)
        return cls(**fields)

    def mismatches(self, other: "Recipe") -> list[str]:
        """'field: mine vs theirs' for every field that makes the two recipes' vectors incomparable."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {_shown(k, a[k])} vs {_shown(k, b[k])}" for k in COMPARED if a[k] != b[k]]

    def check_same(self, other: "Recipe", what: str, hint: str = "") -> None:
        """Raise naming `what` (and the differing fields) when `other`, a recorded recipe, differs from this one."""
        diff = self.mismatches(other)
        if diff:
            raise VGGEmbedError(f"{what} was made with another recipe ({'; '.join(diff)})" + (f"; {hint}" if hint else ""))


def _shown(key: str, value) -> str:
    """A recorded field as a difference names it: outputs as `fc2 (relu7), pool5_avg (pool5:avg)`."""
    if key != "outputs":
        return repr(value)
    return ", ".join(f"{o['name']} ({o['layer']}{':' + o['pool'] if o['pool'] else ''})" for o in value) or "none"


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
