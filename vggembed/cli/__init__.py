"""The `vggembed` command: a thin layer over the library.

stdout carries data only (predictions, info); messages, progress and the
summary go to stderr. Exit codes:

\b
  0  every image succeeded
  1  an error stopped the run (bad weights, bad output path, --strict)
  2  wrong usage (unknown option, missing argument)
  3  the run completed, but some images failed (see OUT.errors.csv / stderr)
  130 interrupted (Ctrl-C); `embed --resume` continues

Commands live in one module per group (`run`: embed, merge, classify;
`pictures`: maps, plot; `weights`: info, weights list/fetch); option groups
shared between them are in `common`.
"""

from __future__ import annotations

import os

import click

from .. import __version__
from . import pictures, run, weights
from .common import CONTEXT


@click.group(context_settings=CONTEXT, epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 some images failed, "
                                              "130 interrupted.")
@click.version_option(__version__, "--version", prog_name="vggembed")
@click.option("-v", "--verbose", is_flag=True, help="Show TensorFlow's start-up log and timings by phase.")
@click.pass_context
def main(ctx, verbose):
    """Pretrained VGG16/VGG19 in TensorFlow: embeddings, top-5 labels and feature maps.

    \b
    Examples:
      vggembed weights fetch vgg16
      vggembed embed images/ -o feats.npy
      find photos -name '*.jpg' | vggembed embed - -o feats.parquet --layer fc2
      vggembed classify laska.png
      vggembed info weights/vgg16_weights.npz
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    if verbose:
        os.environ["VGGEMBED_VERBOSE"] = "1"


for command in (run.embed, run.merge, run.classify, weights.info, weights.weights, pictures.maps, pictures.plot):
    main.add_command(command)
