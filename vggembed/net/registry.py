"""The published weight files vggembed knows: where they live and their checksums."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Published:
    """One public weight file, plus the files that belong beside it."""

    name: str  # what `vggembed weights fetch NAME` takes
    filename: str
    url: str
    arch: str
    md5s: tuple[str, ...] = ()  # every MD5 known for this file; empty: unknown
    size: int | None = None  # bytes, where known
    extras: tuple[tuple[str, str], ...] = field(default=())  # (filename, url)
    note: str = ""


FROSSARD = "https://www.cs.toronto.edu/~frossard/vgg16/"
MATCONVNET = "http://www.vlfeat.org/matconvnet/models/"

PUBLISHED = {
    p.name: p
    for p in [
        Published(
            "vgg16",
            "vgg16_weights.npz",
            FROSSARD + "vgg16_weights.npz",
            "vgg16",
            extras=(("imagenet_classes.py", FROSSARD + "imagenet_classes.py"),),
            note="Davi Frossard's conversion of the Caffe VGG16 model, about 528 MB",
        ),
        Published(
            "vgg19",
            "imagenet-vgg-verydeep-19.mat",
            MATCONVNET + "imagenet-vgg-verydeep-19.mat",
            "vgg19",
            md5s=("106118b7cf60435e6d8e04f6a6dc3657",),
            note="MatConvNet VGG19, newer layout (layers/meta), about 550 MB",
        ),
        Published(
            "vgg19-beta16",
            "imagenet-vgg-verydeep-19-beta16.mat",
            MATCONVNET + "beta16/imagenet-vgg-verydeep-19.mat",
            "vgg19",
            md5s=("8ee3263992981a1d26e73b3ca028a123",),
            note="MatConvNet VGG19, older layout (layers/classes/normalization), about 550 MB",
        ),
        Published(
            "vgg16-mat",
            "imagenet-vgg-verydeep-16.mat",
            MATCONVNET + "imagenet-vgg-verydeep-16.mat",
            "vgg16",
            note="MatConvNet VGG16, newer layout, about 530 MB",
        ),
    ]
}

# Which file a command uses when the user names only an architecture.
DEFAULT_FOR_ARCH = {"vgg16": "vgg16", "vgg19": "vgg19"}


def known_by_md5(md5: str) -> Published | None:
    """The published file with this MD5, if any."""
    for p in PUBLISHED.values():
        if md5 in p.md5s:
            return p
    return None


def file_md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
