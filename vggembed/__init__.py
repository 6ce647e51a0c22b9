"""vggembed: pretrained VGG16/VGG19 weights in TensorFlow, as embeddings and labels."""

__version__ = "0.1.0"

from .errors import ImageError, LayerError, VGGEmbedError, WeightFileError  # noqa: E402
from .explore import cluster, dedup, search  # noqa: E402
from .model import VGG, Prediction, load  # noqa: E402
from .spec import WeightSpec  # noqa: E402
from .weights import load_weights  # noqa: E402

__all__ = ["VGG", "Prediction", "WeightSpec", "load", "load_weights", "search", "dedup", "cluster",
           "VGGEmbedError", "WeightFileError", "LayerError", "ImageError"]
