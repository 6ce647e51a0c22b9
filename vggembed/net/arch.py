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
