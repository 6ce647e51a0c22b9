"""VGG architectures as data, and the names of every layer they produce.

Only the number of convolutions per block differs between VGG16 (config D)
and VGG19 (config E); channel widths and fc sizes come from the weight file,
so tiny VGG-shaped test files run the same code as the published ones.
"""

from __future__ import annotations

from dataclasses import dataclass

# Convolutions per block, as in Simonyan & Zisserman's table 1.
CONFIGS = {
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}

FC_NAMES = ("fc6", "fc7", "fc8")

# Frossard's / Keras' names for the same tensors. fc1/fc2 are post-ReLU.
ALIASES = {
    "fc1": "relu6",
    "fc2": "relu7",
    "fc3l": "fc8",
    "probs": "prob",
}

# As an *embedding* name, Caffe's fc6/fc7 mean the post-ReLU blob, because
# Caffe runs its ReLU in place: `embed(layer="fc7")` equals `layer="fc2"`.
EMBEDDING_ALIASES = {**ALIASES, "fc6": "relu6", "fc7": "relu7"}


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # conv | relu | pool | fc | softmax
    block: int  # 1..5 for the conv part, 6.. for the head
    param: str | None = None  # key of the parameters this layer uses


def conv_names(arch: str) -> list[str]:
    """Names of the convolutions of `arch`, in order: conv1_1, conv1_2, ..."""
    return [f"conv{b}_{i}" for b, n in enumerate(CONFIGS[arch], 1) for i in range(1, n + 1)]


def layers(arch: str) -> list[Layer]:
    """Every layer of `arch` in execution order, with its canonical name."""
    out: list[Layer] = []
    for b, n in enumerate(CONFIGS[arch], 1):
        for i in range(1, n + 1):
            out.append(Layer(f"conv{b}_{i}", "conv", b, f"conv{b}_{i}"))
            out.append(Layer(f"relu{b}_{i}", "relu", b))
        out.append(Layer(f"pool{b}", "pool", b))
    out += [
        Layer("fc6", "fc", 6, "fc6"),
        Layer("relu6", "relu", 6),
        Layer("fc7", "fc", 7, "fc7"),
        Layer("relu7", "relu", 7),
        Layer("fc8", "fc", 8, "fc8"),
        Layer("prob", "softmax", 8),
    ]
    return out


def layer_names(arch: str) -> list[str]:
    return [layer.name for layer in layers(arch)]


def is_head(name: str) -> bool:
    """True for canonical layers after pool5, which need the fixed training input size."""
    return name in ("fc6", "relu6", "fc7", "relu7", "fc8", "prob")


def resolve(arch: str, name: str, *, embedding: bool = False) -> str:
    """Map a user's layer name (canonical or alias) to its canonical name.

    Raises:
        LayerError: the name is not a layer of `arch`.
    """
    from ..errors import LayerError

    canonical = (EMBEDDING_ALIASES if embedding else ALIASES).get(name, name)
    names = layer_names(arch)
    if canonical not in names:
        known = ", ".join(names + sorted(ALIASES))
        raise LayerError(f"{arch} has no layer {name!r}; known layers: {known}")
    return canonical


# How a conv/pool map becomes a vector: avg, max, flatten, and the retrieval descriptors gem and rmac (`pooling`).
POOLS = ("avg", "max", "flatten", "gem", "rmac")
MAX_TOP = 1000  # ImageNet's classes


def parse_outputs(layers=(), *, pool: str | None = None, top: int = 0):
    """The outputs that `--layer` values name, checked before any weights are read.

    Args:
        layers: strings, each `NAME` or `NAME:POOL`, or several of them separated by commas
            (`"fc2,pool5:avg"`); layer names as `resolve` takes them (fc2, fc7, relu7, pool5, conv5_3, ...).
            An output's name as files record it (`pool5_avg`) is its `NAME:POOL`.
        pool: the pool of conv/pool layers named without one (the `--pool` option); fc layers ignore it.
        top: K of `--top K`, 0 to 1000; checked here too.

    Returns:
        the outputs in the order given, as (canonical layer, pool, name) tuples (`("relu7", None, "fc2")`,
        `("pool5", "avg", "pool5_avg")`): a `Recipe` takes them as its `outputs` (`store.recipe.Output`).

    Raises:
        LayerError: an unknown layer or pool, a pool on an fc layer, a conv/pool layer without one, the same
            output named twice, or `top` outside 0..1000; one line each.
    """
    from ..errors import LayerError

    if isinstance(layers, str):
        layers = [layers]
    if top < 0:
        raise LayerError(f"--top {top}: must be 0 or more")
    if top > MAX_TOP:
        raise LayerError(f"--top {top}: at most {MAX_TOP} (the ImageNet classes)")
    if pool is not None and pool not in POOLS:
        raise LayerError(f"unknown pool {pool!r}; pools: {', '.join(POOLS)}")
    known = layer_names("vgg19")  # every name of either architecture; the weights' own is checked at load
    outputs: list = []
    seen: dict = {}
    for value in layers:
        for spec in str(value).split(","):
            spec = spec.strip()
            if not spec:
                raise LayerError(f"--layer {value!r}: an empty layer name")
            name, _, given = spec.partition(":")
            base, _, suffix = name.rpartition("_")
            if not given and name not in known and suffix in POOLS and EMBEDDING_ALIASES.get(base, base) in known:
                name, given = base, suffix  # an output's name as files record it: pool5_avg is pool5:avg
            canonical = EMBEDDING_ALIASES.get(name, name)
            if canonical not in known:
                raise LayerError(f"--layer {spec}: no such layer; layers: fc1 (= fc6), fc2 (= fc7), fc8, prob, "
                                 "conv1_1 .. conv5_4, pool1 .. pool5 (and their relu names)")
            if is_head(canonical):
                if given:
                    raise LayerError(f"--layer {spec}: {name} is a vector already; pools are for conv/pool layers")
                chosen = None
            else:
                chosen = given or pool
                if not chosen:
                    raise LayerError(f"--layer {spec}: {name} gives a 3-D map per image; name a pool, as in "
                                     f"{name}:avg ({', '.join(POOLS)})")
                if chosen not in POOLS:
                    raise LayerError(f"--layer {spec}: unknown pool {chosen!r}; pools: {', '.join(POOLS)}")
            out = (canonical, chosen, name + (f"_{chosen}" if chosen else ""))
            key = (canonical, chosen)
            if key in seen:
                raise LayerError(f"--layer {spec}: the same output as {seen[key]}; name each output once")
            seen[key] = spec
            outputs.append(out)
    return tuple(outputs)
