"""vggembed: pretrained VGG16/VGG19 weights in TensorFlow, as embeddings and labels.

The public API is read lazily (PEP 562), so `import vggembed` and `vggembed --help` cost no numpy or TensorFlow
start-up; each name comes from the room it lives in (see ARCHITECTURE.md).
"""

from .errors import ImageError, LayerError, VGGEmbedError, WeightFileError
from .store.recipe import __version__

_LAZY = {
    "VGG": "vggembed.net.model", "Prediction": "vggembed.net.model", "WeightSpec": "vggembed.net.spec",
    "load": "vggembed.net.load", "load_weights": "vggembed.net.weights", "load_head": "vggembed.net.load",
    "Head": "vggembed.net.head", "train": "vggembed.use.train",
    "extract": "vggembed.use.extract", "Extracted": "vggembed.use.extract",
    "search": "vggembed.use.explore", "dedup": "vggembed.use.explore", "cluster": "vggembed.use.explore",
}

__all__ = ["VGG", "Prediction", "WeightSpec", "load", "load_weights", "load_head", "Head", "train", "extract", "Extracted", "search", "dedup", "cluster",
           "VGGEmbedError", "WeightFileError", "LayerError", "ImageError", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vggembed' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
