"""Named outputs of a deployed network: the layers a caller asked for (each with its pool) and the top-K classes.

`export` (SavedModel, .tflite) and `serve` both take a list of `Output`s and a
`top` count, built once from `--layer NAME[:POOL]` and `--top K`, so the
exported graph and the server answer with the same names:

- a layer's output is named as asked, with its pool after an underscore
  (`fc2`, `pool5_avg`), and holds what `embed` writes for that layer and pool;
- with `top`, `top_indices` (int), `top_probabilities` (float) and
  `top_labels` (string), most probable first.

`compute` runs a preprocessed batch through a loaded network for all of them:
one `VGG.run` per distinct pool (one pass in the usual case of a single pool),
called exactly as `embed` calls it, so every row equals `embed`'s row for the
same image at the same batch shape, at every precision.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import LayerError, VGGEmbedError

TOP_OUTPUTS = ("top_indices", "top_probabilities", "top_labels")


class Output(NamedTuple):
    name: str  # the output's name in a signature and in a served answer
    layer: str  # canonical layer, once bound (`bind`); as typed before
    pool: str | None


def bind(vgg, outputs: list[Output]) -> list[Output]:
    """The same outputs with canonical layers, checked against the loaded network as `embed` checks them."""
    bound = []
    for out in outputs:
        layer = vgg.embedding_layer(out.layer, out.pool)
        if not (vgg.layers[vgg._index[layer]].block <= 5):
            out = out._replace(pool=None)  # a vector already: the pool changes nothing (as in embed)
        bound.append(out._replace(layer=layer))
    names = [o.name for o in bound]
    if len(set(names)) != len(names) or set(names) & set(TOP_OUTPUTS):
        raise LayerError(f"outputs must have distinct names; got {', '.join(names)}")
    return bound


def input_shape(vgg, resize: str) -> tuple[int, int, int]:
    """(H, W, 3): deployed networks take one fixed input size, so each batch has one shape."""
    if resize == "none":
        raise VGGEmbedError("export and serve need a fixed input size: use --resize squash or center-crop")
    w, h = vgg.spec.input_size
    return h, w, 3


def groups(outputs: list[Output], top: int | None) -> dict:
    """{pool: [canonical layers]}: one `run` per pool; layers that need no pool join any run."""
    by_pool: dict = {}
    for out in outputs:
        by_pool.setdefault(out.pool, []).append(out.layer)
    if top:
        by_pool.setdefault(None, []).append("prob")
    if None in by_pool and len(by_pool) > 1:
        free = by_pool.pop(None)
        first = next(iter(by_pool))
        by_pool[first] += free
    return {pool: list(dict.fromkeys(layers)) for pool, layers in by_pool.items()}


def compute(vgg, batch: np.ndarray, outputs: list[Output], top: int | None, pad_to: int | None
            ) -> dict[str, np.ndarray]:
    """{output name: (N, ...) array} for a preprocessed batch (N, H, W, 3; RGB 0..255); with `top`, the
    three top-K arrays too (labels as an object array of str)."""
    maps: dict = {}
    for pool, layers in groups(outputs, top).items():
        got = vgg.run(batch, layers, pool, pad_to)
        for layer in layers:
            maps[layer, pool] = got[layer]

    def of(layer, pool):
        return maps[(layer, pool)] if pool else maps[next(k for k in maps if k[0] == layer)]

    result = {out.name: of(out.layer, out.pool) for out in outputs}
    if top:
        probs = of("prob", None)
        preds = [vgg.top_k(p, top) for p in probs]
        result["top_indices"] = np.array([[p.index for p in row] for row in preds], np.int64).reshape(len(probs), -1)
        result["top_probabilities"] = np.array([[p.probability for p in row] for row in preds],
                                               np.float32).reshape(len(probs), -1)
        result["top_labels"] = np.array([[p.label for p in row] for row in preds], object).reshape(len(probs), -1)
    return result


def names(outputs: list[Output], top: int | None) -> list[str]:
    return [o.name for o in outputs] + (list(TOP_OUTPUTS) if top else [])

