"""maps and plot: pictures of what the network sees."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import VGGEmbedError
from ..store.destination import Destination, replacing
from .common import CONTEXT, POOLS, RESIZES, fail, load_options, recipe_options


# ----------------------------------------------------------------- pictures
def _save_png(img, output):
    """Write a PNG under its name only once complete, holding the output against other runs meanwhile."""
    out = Path(output)
    with Destination(out) as dest, dest.writing(), replacing(out, ".partial") as tmp:
        img.save(tmp, format="PNG")


def _native_image(path, max_side, max_pixels):
    import numpy as np
    from PIL import Image

    from ..images.decode import DEFAULT_MAX_PIXELS, load_rgb

    img = load_rgb(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.BILINEAR)
    return np.asarray(img)


@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--layers", default="all", show_default=True,
              help="'all' (every conv/relu/pool layer up to the last ReLU: 36 for VGG19) or a comma list.")
@click.option("--channel", default="0", show_default=True, help="Channel per panel: a number, mean or strongest.")
@click.option("--layer", help="Instead of one panel per layer: a montage of this layer's channels.")
@click.option("--channels", type=click.IntRange(1), default=64, show_default=True, help="Channels in the montage.")
@click.option("--save-npy", type=click.Path(file_okay=False), help="Also write each layer's tensor to DIR/<layer>.npy.")
@click.option("--panel-width", type=click.IntRange(16), default=240, show_default=True)
@click.option("--max-side", type=click.IntRange(16), help="Shrink the image so its longer side is at most this.")
@click.option("--max-memory", type=float, help="GiB the feature maps may take (default 80% of available memory).")
@click.option("--max-pixels", type=click.IntRange(1), default=None)
@recipe_options()
@load_options
def maps(image, output, layers, channel, layer, channels, save_npy, panel_width, max_side, max_memory,
         max_pixels, recipe, setup):
    """Feature maps of every layer at the image's own size, as one PNG grid.

    Runs fully convolutionally (no resize), one layer at a time, as the VGG19
    tutorial's 4x9 figure; each panel is titled with its layer and shape.

    \b
    Examples:
      vggembed maps cat.jpg -o maps.png --model vgg19
      vggembed maps cat.jpg -o maps.png --layers relu1_1,relu2_1,relu3_1 --channel strongest
      vggembed maps cat.jpg --layer conv3_1 --channels 64 -o grid.png
    """
    from ..use import pictures

    if channel not in pictures.CHANNEL_MODES and not channel.isdigit():
        raise click.BadParameter("a channel number, mean or strongest", param_hint="--channel")
    try:
        vgg = setup.load(recipe)
        arr = _native_image(image, max_side, max_pixels)
        h, w = arr.shape[:2]
        pictures.check_memory(vgg, image, h, w, None if max_memory is None else int(max_memory * 2**30))
        if layer:
            img = pictures.channel_montage(vgg, arr, layer, channels, panel_width=min(panel_width, 128))
        else:
            names = pictures.seed_layers(vgg) if layers == "all" else [n.strip() for n in layers.split(",") if n]
            img = pictures.layer_grid(vgg, arr, names, channel=channel, panel_width=panel_width,
                                      save_npy=Path(save_npy) if save_npy else None)
        _save_png(img, output)
    except VGGEmbedError as e:
        fail(str(e))
    click.echo(f"vggembed: wrote {output} ({img.width}x{img.height}) from {image} at {w}x{h}", err=True)


@click.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--layer", default="fc2", show_default=True, help="Any vector layer (or a conv layer with --pool).")
@click.option("--pool", type=click.Choice(POOLS))
@click.option("--resize", type=click.Choice(RESIZES), default="squash", show_default=True)
@recipe_options()
@load_options
def plot(image, output, layer, pool, resize, recipe, setup):
    """Bar chart of an image's embedding, as the VGG16 tutorial draws fc2.

    \b
    Example:
      vggembed plot laska.png -o fc2.png
    """
    from ..use.pictures import bar_chart

    try:
        vgg = setup.load(recipe)
        vector = vgg.embed([image], layer, pool=pool, resize=resize, batch_size=1)[0]
        _save_png(bar_chart(vector, f"{len(vector)}-dimensional representation of image"), output)
    except VGGEmbedError as e:
        fail(str(e))
    click.echo(f"vggembed: wrote {output} ({len(vector)} bars)", err=True)
