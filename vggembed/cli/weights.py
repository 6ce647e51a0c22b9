"""info and weights list/fetch: what a weight file is, and getting the published ones."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import VGGEmbedError
from .common import CONTEXT, fail, one_line
from .process import data_stdout


# --------------------------------------------------------------------- info
@click.command(context_settings=CONTEXT)
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--labels", type=click.Path(exists=True, dir_okay=False))
def info(weights, labels):
    """Describe a weight file: format, layout, layers and shapes, checksum;
    or a head from `vggembed train`: its classes, C, figures and the features
    it reads.

    Reads the file with numpy/scipy only; TensorFlow is not started.
    """
    from ..net import arch
    from ..net.weights import load_weights

    data_stdout()
    if _is_head(weights):
        _head_info(weights)
        return
    try:
        params, spec = load_weights(weights, labels=labels)
    except VGGEmbedError as e:
        fail(str(e))
    h, w = spec.input_size[1], spec.input_size[0]
    count = sum(a.size + b.size for a, b in params.values())
    known = spec.known
    lines = [
        f"file          {spec.path}",
        f"format        {spec.format} ({spec.layout})",
        f"architecture  {spec.arch}{'' if spec.has_fc else ' (conv layers only: no fc6-fc8)'}",
        f"input         {w}x{h} {spec.channel_order}, mean pixel "
        + " ".join(f"{v:.3f}" for v in spec.mean_pixel),
        f"parameters    {count:,}",
        "labels        " + (f"{len(spec.labels)} from {spec.labels_source}" if spec.labels else "none"),
        f"md5           {spec.md5}  " + (f"(published file: {known})" if known else "(not a known published file)"),
        f"layers        output shape at {w}x{h}:",
    ]
    del params
    names = [n for n in arch.layer_names(spec.arch) if spec.has_fc or not arch.is_head(n)]
    aliases = {v: k for k, v in arch.ALIASES.items()}
    for name in names:
        alias = f" (= {aliases[name]})" if name in aliases else ""
        lines.append(f"  {name + alias:<16} {spec.output_shape(name, h, w)}")
    click.echo("\n".join(lines))


def _is_head(path) -> bool:
    """A zip holding a head's keys. Only a regular file is opened (a FIFO would block the open)."""
    import os
    import stat
    import zipfile

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with zipfile.ZipFile(path) as z:
            return "format.npy" in z.namelist() and "coef.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _head_info(path) -> None:
    from ..net.head import read_head

    try:
        head = read_head(path)
    except VGGEmbedError as e:
        fail(str(e))
    r, m, o = head.recipe, head.metrics, head.output
    figures = f"top-1 {m['top1']:.4f}" + (f", top-5 {m['top5']:.4f}" if "top5" in m else "") + \
        f", balanced accuracy {m['balanced_accuracy']:.4f} ({m.get('evaluation', '?')}, {m['rows']} images)" \
        if "top1" in m else "none recorded"
    shown = ", ".join(one_line(c) if c.strip() and "," not in c and c == c.strip() else repr(one_line(c))
                      for c in head.classes[:20]) + (f", ... ({len(head.classes)})"
                                                                if len(head.classes) > 20 else "")
    click.echo("\n".join([
        f"file          {path}",
        f"head          {head.kind}, {head.dim} -> {len(head.classes)} classes, C = {head.C:.6g}"
        + (f", {m['class_weight']} class weights" if m.get("class_weight") else ""),
        f"classes       {shown}",
        f"figures       {figures}",
        f"features      {o.name} ({o.layer}{':' + o.pool if o.pool else ''}) of {r.weights} "
        f"(MD5 {r.weights_md5}, {r.arch}), resize {r.resize}, precision {r.precision}"
        + (", l2-normalized" if r.l2_normalize else "") + (", fast decode" if r.fast_decode else ""),
        f"made by       vggembed {r.vggembed_version}",
        f"md5           {head.md5}",
    ]))


# ------------------------------------------------------------------ weights
@click.group(context_settings=CONTEXT)
def weights():
    """List and download the published weight files."""


@weights.command("list")
def weights_list():
    """The published files `fetch` knows, and whether each is on this machine."""
    from ..net.download import search_folders
    from ..net.registry import PUBLISHED

    data_stdout()

    for p in PUBLISHED.values():
        here = any((folder / p.filename).exists() for folder in search_folders())
        click.echo(f"{p.name:<14} {'present' if here else 'absent':<8} {p.filename:<38} {p.note}")


@weights.command("fetch", context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True)
@click.option("--dest", type=click.Path(file_okay=False), help="Folder (default: $VGGEMBED_HOME or ~/.cache/vggembed).")
@click.option("--mirror", help="Base URL holding the same file names (default $VGGEMBED_MIRROR).")
@click.option("-q", "--quiet", is_flag=True)
def weights_fetch(names, dest, mirror, quiet):
    """Download published weights, resuming a cut transfer and checking size and MD5.

    \b
    Examples:
      vggembed weights fetch vgg16
      vggembed weights fetch vgg19 --dest weights/
    """
    from ..net.download import fetch

    for name in names:
        try:
            path = fetch(name, dest=Path(dest) if dest else None, mirror=mirror,
                         progress=not quiet and sys.stderr.isatty())
        except VGGEmbedError as e:
            fail(str(e))
        click.echo(str(path))


