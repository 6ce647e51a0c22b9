"""Pictures of what VGG sees, drawn with Pillow alone (no matplotlib needed).

- `layer_grid`: one panel per layer, fully convolutional at the image's own
  size, in the VGG19 tutorial's 4x9 grid; each panel titled with its layer
  name and shape.
- `channel_montage`: many channels of one layer.
- `bar_chart`: the VGG16 tutorial's bar chart of a vector.

The network is walked one layer at a time and each map is reduced to a small
panel as soon as it is made, so a 1440x2560 photo never holds more than the
current layer's tensor (conv1_1 alone is 0.94 GB there).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import VGGEmbedError
from ..net import arch as arch_mod
from ..store.destination import Destination

CHANNEL_MODES = ("mean", "strongest")  # or a channel number
TITLE_HEIGHT = 18
GAP = 6


def seed_layers(model) -> list[str]:
    """`all`: every conv, relu and pool layer up to the last ReLU, as the VGG19
    tutorial draws them (36 for VGG19, 30 for VGG16)."""
    names = [n for n in model.layer_names if not arch_mod.is_head(n)]
    return names[: names.index("pool5")]


def estimate_bytes(model, height: int, width: int) -> int:
    """Peak memory of a layer-by-layer walk: the largest layer's input plus output."""
    sizes = [int(np.prod(model.output_shape(n, height, width))) * 4 for n in seed_layers(model)]
    return 2 * max(sizes) + height * width * 3 * 4


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(model, source, height, width, max_memory: int | None) -> None:
    """Refuse, with the figures, an image whose feature maps would not fit."""
    need = estimate_bytes(model, height, width)
    limit = max_memory if max_memory is not None else int(0.8 * available_bytes())
    if need > limit:
        raise VGGEmbedError(
            f"{source}: {width}x{height} needs about {need / 2**30:.1f} GiB for its largest feature maps, over the "
            f"limit of {limit / 2**30:.1f} GiB (80% of available memory); raise it with --max-memory GIB or "
            "shrink the image with --max-side PIXELS")


def _reduce(t: np.ndarray, channel) -> np.ndarray:
    """(H, W, C) -> (H, W): one channel, the mean, or the strongest channel."""
    if channel == "mean":
        return t.mean(axis=-1)
    if channel == "strongest":
        return t[..., int(np.argmax(t.mean(axis=(0, 1))))]
    if not 0 <= int(channel) < t.shape[-1]:
        raise VGGEmbedError(f"channel {channel} is out of range: the layer has {t.shape[-1]} channels")
    return t[..., int(channel)]


def _panel(m: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A grey panel of `size` from a 2-D map, scaled min..max (the seed's matshow)."""
    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(m)
    img = Image.fromarray(scaled.astype(np.uint8), "L")
    return img.resize(size, Image.NEAREST if img.width < size[0] else Image.BILINEAR)


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _grid(panels: list[tuple[str, Image.Image]], cols: int, background=255) -> Image.Image:
    """Titled panels in rows of `cols`."""
    pw, ph = panels[0][1].size
    rows = math.ceil(len(panels) / cols)
    cell_w, cell_h = pw + GAP, ph + TITLE_HEIGHT + GAP
    sheet = Image.new("L", (cols * cell_w + GAP, rows * cell_h + GAP), background)
    draw, font = ImageDraw.Draw(sheet), _font()
    for i, (title, panel) in enumerate(panels):
        x, y = GAP + (i % cols) * cell_w, GAP + (i // cols) * cell_h
        draw.text((x, y + 2), title, fill=0, font=font)
        sheet.paste(panel, (x, y + TITLE_HEIGHT))
    return sheet


def grid_geometry(count: int, cols: int, panel: tuple[int, int]) -> tuple[int, int]:
    """Pixel size of a `_grid` of `count` panels (for callers and tests)."""
    rows = math.ceil(count / cols)
    return cols * (panel[0] + GAP) + GAP, rows * (panel[1] + TITLE_HEIGHT + GAP) + GAP


def panel_size(height: int, width: int, panel_width: int) -> tuple[int, int]:
    return panel_width, max(1, round(panel_width * height / width))


def layer_grid(model, image: np.ndarray, layers: list[str], *, channel="0", panel_width: int = 240,
               cols: int = 9, save_npy: Path | None = None) -> Image.Image:
    """Feature maps of `layers` for one preprocessed image (H, W, 3), as a titled grid.

    With `save_npy`, each layer's full tensor (1, H, W, C) float32 is written
    to `save_npy/<layer>.npy` as it is computed.
    """
    wanted = [model.resolve(n) for n in layers]
    head = [n for n in wanted if arch_mod.is_head(n)]
    if head:
        raise VGGEmbedError(f"maps draws conv, relu and pool layers; {head[0]} is fully connected")
    h, w = image.shape[:2]
    size = panel_size(h, w, panel_width)
    if save_npy is not None:
        folder = Destination(save_npy)
        with folder.writing():
            save_npy.mkdir(parents=True, exist_ok=True)
    last = max(wanted, key=lambda n: model.layer_names.index(n))
    panels = {}
    for name, tensor in model.walk(image[None].astype(np.float32), last):
        if name not in wanted:
            continue
        t = tensor.numpy()
        if save_npy is not None:
            with folder.writing():
                np.save(save_npy / f"{name}.npy", t)
        panels[name] = (f"{name} {t.shape[1]}x{t.shape[2]}x{t.shape[3]}", _panel(_reduce(t[0], channel), size))
        del t
    return _grid([panels[n] for n in wanted], min(cols, len(wanted)))


def channel_montage(model, image: np.ndarray, layer: str, channels: int = 64, panel_width: int = 128
                    ) -> Image.Image:
    """The first `channels` channels of one layer, each its own titled panel."""
    name = model.resolve(layer)
    if arch_mod.is_head(name):
        raise VGGEmbedError(f"{layer} is fully connected: it has no channels to draw")
    *_, (_, tensor) = model.walk(image[None].astype(np.float32), name)
    t = tensor.numpy()[0]
    n = min(channels, t.shape[-1])
    size = panel_size(t.shape[0], t.shape[1], panel_width)
    panels = [(f"{name} #{c}", _panel(t[..., c], size)) for c in range(n)]
    return _grid(panels, math.ceil(math.sqrt(n)))


def bar_chart(vector: np.ndarray, title: str, size=(1200, 500)) -> Image.Image:
    """One bar per dimension, zero line at the bottom of non-negative data."""
    w, h = size
    margin, top = 50, 40
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), _font()
    draw.text(((w - draw.textlength(title, font=font)) / 2, 12), title, fill="black", font=font)
    lo, hi = min(0.0, float(vector.min())), max(0.0, float(vector.max()))
    span = hi - lo or 1.0
    plot_w, plot_h = w - 2 * margin, h - top - margin

    def y(v):
        return top + plot_h * (hi - v) / span

    draw.line([(margin, y(0)), (w - margin, y(0))], fill="grey")
    draw.line([(margin, top), (margin, top + plot_h)], fill="black")
    for value in (lo, hi):
        draw.text((4, y(value) - 6), f"{value:.3g}", fill="black", font=font)
    n = len(vector)
    draw.text((margin, h - margin + 8), "0", fill="black", font=font)
    draw.text((w - margin - 20, h - margin + 8), str(n - 1), fill="black", font=font)
    for i, v in enumerate(vector):
        if v == 0:
            continue
        x = margin + plot_w * i / n
        draw.rectangle([x, min(y(0), y(v)), x + max(plot_w / n - 1, 0), max(y(0), y(v))], fill="#1f77b4")
    return img
