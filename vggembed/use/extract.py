"""`vggembed.extract`: a folder or list of images into arrays in memory, for notebooks.

The same computation as `vggembed embed` (`engines.local.batches` and `compute`: one pass per batch, several
outputs and `--top`), with the rows kept in memory instead of written: for collections that fit in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..engines.local import Options, Summary, batches, check_outputs, compute
from ..net.model import VGG
from ..store.recipe import Recipe


@dataclass
class Extracted:
    """What `extract` returns: `arrays` ({name: array}, a row per image that worked, in input order:
    each output's vectors, and with `top` `top_index`, `top_prob` and `top_label`), the `paths` of those
    rows, and the `errors` ([(path, error)]) of the images that failed."""

    arrays: dict
    paths: list
    errors: list

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def extract(inputs, layers=("fc2",), *, top: int = 0, pool: str | None = None, net: VGG | None = None,
            weights=None, model: str = "vgg16", precision: str = "float32", resize: str = "squash",
            dtype: str = "float32", l2_normalize: bool = False, batch_size: int = 16, workers: int = 2,
            labels=None) -> Extracted:
    """Run images through the network once into arrays in memory: several layers and the top-K predictions
    together, as `vggembed embed` writes them (same rows, bit for bit, for the same batch size).

    Args:
        inputs: an image path, folder, tar shard or URL, or a list of them (listed as the command lists them).
        layers: `--layer` values: "fc2", "pool5:avg", "fc2,pool5:gem", or a list of them; () with `top` only.
        top: K for the top-K ImageNet predictions (0: none).
        pool: the pool of conv/pool layers named without one.
        net: an already loaded network (`vggembed.load`); otherwise `weights`/`model` and `precision` load one.

    Example:
        >>> out = vggembed.extract("photos/", ["fc2", "pool5:avg"], top=5, weights="vgg16_weights.npz")
        >>> out["fc2"].shape, out["top_label"][0]
    """
    from ..images.inputs import expand
    from ..net.arch import parse_outputs

    recipe = Recipe(weights=None if weights is None else str(weights), model=model, precision=precision,
                    resize=resize, dtype=dtype, l2_normalize=l2_normalize,
                    outputs=parse_outputs(layers, pool=pool, top=top), top=top)
    if net is None:
        from ..net.load import load_recipe

        net = load_recipe(recipe, labels=labels)
    recipe = check_outputs(net, recipe.replace(precision=net.precision))
    opts = Options(batch_size=batch_size, workers=workers)
    given = [inputs] if isinstance(inputs, (str, bytes, os.PathLike)) else list(inputs)
    sources = list(expand([os.fsdecode(i) for i in given]))
    vectors = {o.name for o in recipe.outputs}
    blocks: dict[str, list] = {name: [] for name in recipe.names if name != "top_label"}
    paths, errors = [], []
    for chunk, batch, pad in batches(net, sources, recipe, opts, Summary(), total=len(sources)):
        errors += [(item.source, item.error) for item in chunk if item.error is not None]
        paths += [item.source for item in chunk if item.error is None]
        if batch is not None:
            for name, block in compute(net, batch, recipe, pad).items():
                blocks[name].append(block.astype(recipe.dtype) if name in vectors else block)
    arrays = {name: np.concatenate(b) if b else np.zeros((0, 0), np.float32) for name, b in blocks.items()}
    if recipe.top:
        arrays["top_label"] = np.array([[net.label(int(i)) for i in row] for row in arrays["top_index"]],
                                       dtype=str).reshape(len(paths), recipe.top)
    return Extracted(arrays, paths, errors)
