"""The `vggembed` command: a thin layer over the library.

stdout carries data only (predictions, info); messages, progress and the
summary go to stderr. Exit codes:

\b
  0  every image succeeded
  1  an error stopped the run (bad weights, bad output path, --strict)
  2  wrong usage (unknown option, missing argument)
  3  the run completed, but some images failed (see OUT.errors.csv / stderr)
  130 interrupted (Ctrl-C); `embed --resume` continues
  141 the reader of stdout went away (`... | head -1`)
  143 stopped by SIGTERM (129: SIGHUP); `embed --resume` continues

Commands live in one module per group (`run`: embed, merge, classify;
`search`: search, dedup, cluster; `audit`: audit; `pictures`: maps, plot; `weights`: info,
weights list/fetch; `deploy`: export, serve); option groups shared between them are in `common`; the
process around them (streams, signals, exit codes) in `process`.
"""

from __future__ import annotations

import errno
import os
import signal

import click

from ..store.recipe import __version__
from . import audit, deploy, pictures, process, run, search, train, weights
from .common import CONTEXT, ON_INTERRUPT


class Main(click.Group):
    """The command group, with the process set up once around every command (see `process`)."""

    def main(self, *args, **kwargs):
        process.prepare_streams()
        saved = {sig: signal.getsignal(sig) for sig in process.STOP_SIGNALS}
        process.handle_signals()
        try:
            return super().main(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            hint = ctx.meta.get(ON_INTERRUPT)
            click.echo(process.interrupted_line(e) + (f"; {hint}" if hint else ""), err=True)
            ctx.exit(process.exit_code(e))
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            process.quiet_broken_pipe()
            ctx.exit(process.EXIT_BROKEN_PIPE)


@click.group(cls=Main, context_settings=CONTEXT,
             epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 some images failed, 130 interrupted, 141 stdout "
                    "closed by its reader, 143 terminated (SIGTERM).")
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
      vggembed train photos/ -o head.npz
      vggembed search feats.npy cat.jpg -k 5
      vggembed info weights/vgg16_weights.npz
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    if verbose:
        os.environ["VGGEMBED_VERBOSE"] = "1"


for command in (run.embed, run.merge, run.classify, train.train, search.search, search.dedup, search.cluster,
                audit.audit, weights.info, weights.weights, pictures.maps, pictures.plot, deploy.export, deploy.serve):
    main.add_command(command)
