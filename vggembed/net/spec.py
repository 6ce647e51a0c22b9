"""`WeightSpec`: everything a caller needs to use one loaded weight file.

Its own module so that the readers (which build one) and `weights.py` (which
calls the readers) both import it, and the dependency runs one way:
weights -> readers -> spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from . import arch as arch_mod
from .registry import known_by_md5

# Frossard's mean pixel (R, G, B); MatConvNet files carry their own.
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)


@dataclass
class WeightSpec:
    """Everything a caller needs to use one loaded weight file correctly."""

    path: str
    arch: str  # vgg16 | vgg19
    format: str  # npz | mat
    layout: str  # frossard | matconvnet-beta16 | matconvnet
    mean_pixel: tuple[float, float, float]
    channel_order: str = "RGB"
    input_size: tuple[int, int] = (224, 224)
    labels: list[str] | None = None
    labels_source: str | None = None
    has_fc: bool = True
    conv_widths: tuple[int, ...] = ()
    fc_sizes: tuple[int, ...] = ()
    legacy_transpose: bool = False

    @cached_property
    def md5(self) -> str:
        from .cache import cached_md5

        return cached_md5(self.path)

    @property
    def known(self) -> str | None:
        """Name of the published file this is (by MD5), or None."""
        p = known_by_md5(self.md5)
        return p.name if p else None

    @property
    def num_classes(self) -> int | None:
        return self.fc_sizes[-1] if self.has_fc else None

    def output_shape(self, name: str, height: int, width: int) -> tuple:
        """Shape of one image's output at canonical layer `name` for a height x width input."""
        shape, convs = (height, width, 3), iter(self.conv_widths)
        for layer in arch_mod.layers(self.arch):
            if layer.kind == "conv":
                shape = shape[:2] + (next(convs),)
            elif layer.kind == "pool":
                shape = (-(-shape[0] // 2), -(-shape[1] // 2), shape[2])
            elif layer.kind == "fc":
                shape = (self.fc_sizes[arch_mod.FC_NAMES.index(layer.name)],)
            if layer.name == name:
                return shape
        raise KeyError(name)

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"
