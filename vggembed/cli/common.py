"""What every command shares: exit codes, error handling, and option groups that
arrive in a command as one value each.

`recipe_options` gathers the options that decide what the vectors mean into a
`Recipe`; `load_options` gathers where and how the network is loaded into a
`Setup`; `run_options` gathers how a run goes into `local.Options`. A command
then hands those values on, instead of long lists of parameters.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from dataclasses import dataclass

import click

from ..errors import VGGEmbedError, display
from ..net.arch import POOLS as _POOLS
from ..net.arch import parse_outputs
from ..store.recipe import PRECISIONS, Recipe

EXIT_SOME_FAILED = 3
ON_INTERRUPT = "vggembed.on_interrupt"  # ctx.meta key: what the interrupted line adds (how to resume)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
POOLS = list(_POOLS)
RESIZES = ["squash", "center-crop", "none"]


def fail(message: str) -> None:
    raise click.ClickException(message)


def gathered(target: str, build, decorators):
    """Add `decorators`' options to a command and pass it `build(ctx, **their values)` as `target`."""

    def deco(f):
        @functools.wraps(f)
        def command(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in names}
            kwargs[target] = build(click.get_current_context(), **values)
            return f(*args, **kwargs)

        command.__click_params__ = list(getattr(f, "__click_params__", []))
        before = len(command.__click_params__)
        for d in reversed(decorators):
            command = d(command)
        names = [p.name for p in command.__click_params__[before:]]
        return command

    return deco


# ------------------------------------------------------------------- recipe
def outputs_option(layers, pool, top):
    """`--layer` values (repeatable, comma lists, NAME or NAME:POOL), `--pool` and `--top` as the Recipe's
    `outputs` and `top`, checked before any weights are loaded (`arch.parse_outputs`); a usage error (exit 2)
    naming the bad value otherwise. The one parser of these options for every command that takes them."""
    try:
        return {"outputs": parse_outputs(layers, pool=pool, top=top), "top": top}
    except VGGEmbedError as e:
        raise click.UsageError(str(e)) from None


def recipe_options(*, vector: bool = False, inputs: bool = False, top: bool = True):
    """The Recipe's options: always the weights and precision; `vector`: layers (with --top unless `top` is
    False, for a command whose --top means something else), pool, dtype, l2; `inputs`: resize and fast
    decoding."""
    decorators = [
        click.option("--weights", type=click.Path(dir_okay=False), envvar="VGGEMBED_WEIGHTS",
                     help="Weight file (.npz or .mat). Default: $VGGEMBED_WEIGHTS, ./weights/, then the cache."),
        click.option("--model", default="vgg16", show_default=True,
                     help="Published weights to look for when --weights is not given (vgg16, vgg19, ...)."),
        click.option("--legacy-transpose", is_flag=True,
                     help="Transpose .mat conv kernels (1,0,2,3) as the VGG19 seed did (wrong for the "
                          "published files; only to reproduce its feature maps)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="float32",
                     show_default=True, help="bf16 only where the CPU has AVX512_BF16/AMX, or on GPUs; int8 on "
                                             'CPUs with VNNI/AMX (pip install "vggembed[int8]").'),
        click.option("--calibration", type=click.Path(exists=True, file_okay=False),
                     help="With --precision int8: calibrate on these images instead of the built-in set."),
    ]
    if vector:
        decorators += [
            click.option("--layer", "layers", multiple=True, metavar="NAME[:POOL]",
                         help="Repeatable, or a comma list; all from one pass. fc2 = fc7 = relu7 (4096-d), fc1 = "
                              "fc6 = relu6, fc8/fc3l logits, probs, or a conv/pool layer with its pool: "
                              "pool5:avg (avg, max, flatten, gem, rmac; pool5_avg, as files name it, is the same). "
                              "Default: fc2."),
            click.option("--pool", type=click.Choice(POOLS),
                         help="The pool of conv/pool layers named without one."),
        ]
        if top:
            decorators.append(click.option("--top", type=int, default=0, metavar="K",
                                           help="Add the top-K ImageNet predictions (top_index, top_prob, "
                                                "top_label)."))
        decorators += [
            click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True),
            click.option("--l2-normalize", is_flag=True, help="Scale each vector to unit length."),
        ]
    if inputs:
        decorators += [
            click.option("--resize", type=click.Choice(RESIZES), default="squash", show_default=True,
                         help="squash to 224x224 (the seeds), center-crop (short side 256, centre 224), or none "
                              "(native size; conv/pool layers only)."),
            click.option("--fast-decode", is_flag=True,
                         help="Decode JPEGs at reduced scale (much faster on large photos; values change slightly)."),
        ]

    def build(ctx, weights, model, calibration, **fields):
        calibration = calibration and os.path.abspath(calibration)  # the same folder for Ray actors
        if vector:
            layers = fields.pop("layers") or ("fc2",)
            fields.update(outputs_option(layers, fields.pop("pool"), fields.pop("top", 0)))
        return Recipe(weights=weights, model=model, calibration=calibration, **fields)

    return gathered("recipe", build, decorators)


# -------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Setup:
    """Where and how the network is loaded: not part of what its vectors mean."""

    labels: str | None = None
    device: str = "auto"
    verbose: bool = False

    def load(self, recipe: Recipe):
        """The network for `recipe`; with -v, how long each start-up phase took."""
        from ..net.load import load_recipe

        t: dict = {}
        vgg = load_recipe(recipe, labels=self.labels, device=self.device, timings=t)
        if self.verbose:
            spec = vgg.spec
            runtime = "" if recipe.precision == "int8" else f"TensorFlow import {t['runtime']:.2f}s, "
            click.echo(f"vggembed: {spec.path} ({spec.arch}, {spec.layout}) on {vgg.device}, {recipe.precision}; "
                       f"start-up: {runtime}weight file {t['weights']:.2f}s, model {t['model']:.2f}s", err=True)
        return vgg


def load_options(f):
    decorators = [
        click.option("--labels", type=click.Path(exists=True, dir_okay=False),
                     help="Class names for weights without them: imagenet_classes.py, synset_words.txt, "
                          "imagenet_class_index.json or one per line."),
        click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True),
    ]
    return gathered("setup", lambda ctx, **kw: Setup(verbose=ctx.obj["verbose"], **kw), decorators)(f)


# ---------------------------------------------------------------------- run
def run_options(f):
    """runner.Options, plus --files-from and -q, which stay the command's own."""
    decorators = [
        click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True),
        click.option("--workers", type=click.IntRange(1), default=min(8, os.cpu_count() or 2),
                     show_default="CPU count, at most 8",
                     help="Decoding threads. With embed --engine ray: the number of model actors (default 1), "
                          "each decoding with threads of its own (its node's CPU count, at most 8)."),
        click.option("--fetch-ahead", type=click.IntRange(1), default=32, show_default=True,
                     help="URLs read at once, ahead of decoding; to keep the model fed, at least its images/s "
                          "times the store's seconds per request."),
        click.option("--max-pixels", type=click.IntRange(1), default=None,
                     help="Refuse larger images (default Pillow's 89.5 million)."),
        click.option("--strict", is_flag=True, help="Stop at the first image that fails."),
    ]

    def build(ctx, max_pixels, **kw):
        from ..engines.local import Options
        from ..images.decode import DEFAULT_MAX_PIXELS

        quiet = ctx.params.get("quiet", False)
        return Options(max_pixels=max_pixels or DEFAULT_MAX_PIXELS, progress=not quiet and sys.stderr.isatty(),
                       **kw)

    f = gathered("opts", build, decorators)(f)
    f = click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")(f)
    f = click.option("-0", "--null", is_flag=True,
                     help="Lists ('-' and --files-from) are NUL-separated, as `find -print0` writes them.")(f)
    f = click.option("--files-from", type=click.Path(exists=True, dir_okay=False),
                     help="A file with one image path per line (after the INPUTs).")(f)
    return f


def sources(inputs, files_from, null):
    """(sources iterator, total or None); see `inputs.for_run`.

    Inputs that name no image at all (an empty folder, shard, list or stdin)
    are an error, before any output is made."""
    from ..images.inputs import for_run

    if not inputs and not files_from:
        fail("no input: give image files, folders, shards, URLs, '-' for paths on stdin, or --files-from LIST")
    items, total = for_run(list(inputs), files_from, null=null)
    first = next(items, None)
    if first is None:
        no_images(inputs, files_from)
    return itertools.chain([first], items), total


def no_images(inputs, files_from):
    given = ["stdin" if i == "-" else i for i in inputs] + ([files_from] if files_from else [])
    fail(f"no images to process: {', '.join(given)} named no image files; nothing was written")


def report(ctx, summary, verb, quiet, tail=""):
    """The one summary line on stderr (with -v, the first batch's timings before it)."""
    if ctx.obj["verbose"] and summary.first_batch_seconds is not None:
        click.echo(f"vggembed: first batch (decode, graph build, run) {summary.first_batch_seconds:.2f}s; waited "
                   f"for decoding {summary.wait_seconds:.2f}s of {summary.seconds:.2f}s", err=True)
    if not quiet:
        click.echo("vggembed: " + summary.line(verb) + tail, err=True)


def finish(ctx, summary, verb, quiet, tail=""):
    """The one summary line on stderr, and the exit code."""
    report(ctx, summary, verb, quiet, tail)
    ctx.exit(EXIT_SOME_FAILED if summary.failed else 0)


def one_line(name: str) -> str:
    """A path or a class name as a table shows it: undecodable bytes as \\xNN, tabs and line breaks as \\t,
    \\n, \\r, so that each row stays one line."""
    return display(name).translate({9: "\\t", 10: "\\n", 13: "\\r"})


# --------------------------------------------------------------------- head
# The options whose value a head's recipe gives when the user leaves them at their default (option, field).
HEAD_FIELDS = (("precision", "precision"), ("resize", "resize"), ("fast_decode", "fast-decode"),
               ("legacy_transpose", "legacy-transpose"), ("calibration", "calibration"),
               ("l2_normalize", "l2-normalize"))


def head_option(f):
    return click.option("--head", "head_path", type=click.Path(exists=True, dir_okay=False),
                        help="A head trained by `vggembed train` (HEAD.npz): rank its classes instead of "
                             "ImageNet's, on features made as it records (weights by MD5, layer, resize, "
                             "precision).")(f)


def head_recipe(ctx, recipe: Recipe, path, top: int) -> Recipe:
    """The recipe that runs the head at `path`: the features it was trained on (its weights, found by MD5 when
    --weights is not given; its resize and precision where the options were left at their defaults), `top`
    ranks its classes (at most its number; 0: all). An option given with another value is a usage error naming
    both."""
    from ..net.download import find_by_md5
    from ..net.head import read_head

    try:
        head = read_head(path)
    except VGGEmbedError as e:
        fail(str(e))
    if ctx.get_parameter_source("labels") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--labels names ImageNet's classes; with --head the head's own classes are "
                               "ranked: leave it out")
    trained = head.recipe
    changes = {}
    for name, option in HEAD_FIELDS:
        mine, theirs = getattr(recipe, name), getattr(trained, name)
        if name == "calibration" and theirs is not None:
            theirs = os.path.abspath(theirs) if os.path.isdir(theirs) else theirs
        if ctx.get_parameter_source(name) in (click.core.ParameterSource.DEFAULT, None):
            changes[name] = theirs
        elif mine != theirs:
            raise click.UsageError(f"--{option} {mine}: {path} was trained on features made with "
                                   f"{option} {theirs}; leave it out (the head's is used) or train a head on these")
    if recipe.weights is None and trained.weights_md5:
        try:
            changes["weights"] = str(find_by_md5(trained, path))
        except VGGEmbedError as e:
            fail(str(e))
    k = len(head.classes)
    return recipe.replace(**changes, head=os.path.abspath(path), top=min(top, k) if top > 0 else k)
