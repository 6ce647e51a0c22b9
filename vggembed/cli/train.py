"""train: a head on your own classes, from folders of photos or an embedding output."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import click

from ..errors import VGGEmbedError, display
from ..store.destination import Destination
from .common import CONTEXT, EXIT_SOME_FAILED, Setup, fail, recipe_options, run_options
from .run import embed_first, feature_places, output_run_options

# What `train -o HEAD.npz` writes beside the head: suffix -> what it holds.
SIDE_FILES = {
    ".metrics.json": "the evaluation (also inside HEAD.npz)",
    ".oof.npz": "the probabilities the figures come from: paths, given, proba, fold, classes",
    ".oof.csv": "path, fold, given, predicted, p_given, p_predicted per evaluated image",
    ".confusion.csv": "the confusion matrix (rows: given class, columns: predicted)",
    ".confusion.png": "the confusion matrix as a picture",
}


def _finite(value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def side_paths(head: Path) -> dict[str, Path]:
    stem = head.with_suffix("") if head.suffix.lower() == ".npz" else head
    return {suffix: stem.with_name(stem.name + suffix) for suffix in SIDE_FILES}


@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="HEAD.npz; beside it HEAD.metrics.json, HEAD.oof.npz, HEAD.oof.csv, HEAD.confusion.csv and "
                   "HEAD.confusion.png.")
@click.option("--labels", "label_table", type=click.Path(exists=True, dir_okay=False),
              help="A table of labels: CSV path,label (UTF-8) or Parquet with path and label columns. Default: "
                   "folders (photos/cat/a.jpg is cat).")
@click.option("--val", multiple=True, metavar="INPUT",
              help="Repeatable: a validation set (images or an embedding output), labelled as the inputs; "
                   "evaluated instead of the k folds.")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True, help="k of the stratified k-fold.")
@click.option("--C", "C", type=click.FloatRange(0, min_open=True), callback=lambda ctx, param, value: _finite(value),
              help="The inverse L2 strength (scikit-learn's C). Default: chosen by a sweep on fold 1.")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True,
              help="balanced: each class weighs as much in the loss as any other, however few its images "
                   "(scikit-learn's class_weight='balanced'), for classes as uneven as ok and defect.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="The folds' shuffle.")
@click.option("--features", type=click.Path(),
              help="Where image inputs' vectors are written (default HEAD.features.npy, HEAD.val-features.npy for "
                   "--val; a folder with --engine ray): train again from it without embedding.")
@recipe_options(vector=True, inputs=True)
@output_run_options
@run_options
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.pass_context
def train(ctx, inputs, output, label_table, val, folds, C, class_weight, seed, features, recipe, resume, overwrite, engine,
          address, gpus_per_worker, part_size, files_from, null, quiet, opts, device):
    """Train a classifier head on your own classes and evaluate it.

    INPUT is a folder whose subfolders are the classes (photos/cat/,
    photos/dog/), image files with --labels, or an embedding output (.npy,
    .npz, .parquet, .csv, a Ray folder) with its recorded recipe. Images are
    embedded on the way (resumable with --resume), as `embed` would.

    The head is a multinomial logistic regression on standardised features
    of one layer (--layer, default fc2). C is chosen on fold 1 by a sweep
    unless --C is given; the figures printed are out-of-fold (--folds) or on
    --val. Use the head with `classify --head`, `export --head`, `serve --head`.

    \b
    Examples:
      vggembed train photos/ -o head.npz
      vggembed train feats.npy --labels labels.csv -o head.npz --C 0.01
      vggembed train photos/train -o head.npz --val photos/val
    """
    out = Path(output)
    if out.suffix.lower() != ".npz":
        raise click.UsageError(f"-o {output}: a head is written as HEAD.npz")
    if len(recipe.outputs) != 1 or recipe.top:
        raise click.UsageError("a head reads one output: give one --layer, and no --top")
    if not inputs and not files_from:
        fail("no input: give folders of class folders, image files with --labels, or an embedding output")
    targets = [out, *side_paths(out).values()]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        fail(f"{existing[0]}: exists; pass --overwrite to replace it")
    if features and os.path.abspath(features) in {os.path.abspath(t) for t in targets}:
        raise click.UsageError(f"--features {features}: the head or a file beside it is written there; give "
                               "another path")
    # Held from the start: a place that cannot be written, or another run writing it, is said before any work.
    dest = Destination(out)
    try:
        dest.claim()
    except VGGEmbedError as e:
        fail(str(e))
    try:
        _train(ctx, inputs, out, label_table, val, folds, C, class_weight, seed, features, recipe, resume,
               overwrite, engine, address, gpus_per_worker, part_size, files_from, null, quiet, opts, device, dest)
    finally:
        dest.release()


def _train(ctx, inputs, out, label_table, val, folds, C, class_weight, seed, features, recipe, resume, overwrite,
           engine, address, gpus_per_worker, part_size, files_from, null, quiet, opts, device, dest) -> None:
    from ..use import evaluate
    from ..use.train import fit_head, read_label_table

    log = (lambda line: None) if quiet else (lambda line: click.echo(f"vggembed: {line}", err=True))
    table = None
    if label_table:
        try:
            table = read_label_table(label_table)
        except VGGEmbedError as e:
            fail(str(e))
    setup = Setup(device=device, verbose=ctx.obj["verbose"])
    # Images are embedded first, into files that --resume continues and a later train can read.
    sources, val_sources, failed = embed_first(
        ctx, inputs, val, feature_places(f"{out.with_suffix('')}.", features, engine), recipe, resume, overwrite,
        engine, address, gpus_per_worker, part_size, files_from, null, quiet, opts, setup)
    layer = recipe.outputs[0].name if ctx.get_parameter_source("layers") != click.core.ParameterSource.DEFAULT \
        else None
    try:
        with _opened(sources, layer) as rows, _opened(val_sources, layer) as val_rows:
            head = fit_head(rows, table, val_rows, folds=folds, C=C, seed=seed,
                            class_weight=None if class_weight == "none" else class_weight, log=log)
        _write(out, head, overwrite, dest)
    except VGGEmbedError as e:
        fail(str(e))
    m = head.metrics
    title = (f"{m['evaluation']} figures of {display(str(out))} (C = {head.C:.4g}, {len(head.classes)} classes"
             f"{', balanced' if m.get('class_weight') else ''}, {head.recipe.outputs[0].name})")
    click.echo(evaluate.table(m, title))
    if not quiet:
        click.echo(f"vggembed: wrote {out} and beside it {', '.join(p.name for p in side_paths(out).values())}",
                   err=True)
    ctx.exit(EXIT_SOME_FAILED if failed else 0)


@contextlib.contextmanager
def _opened(sources, layer):
    from ..store.vectors import open_vectors
    from ..use.train import Rows

    opened = []
    try:
        for s in sources:
            opened.append(open_vectors(s, layer=layer))
        yield [Rows.of(v) for v in opened]
    finally:
        for v in opened:
            v.close()


def _write(out: Path, head, overwrite: bool, dest: Destination) -> None:
    """HEAD.npz and its side files, each written whole beside its place and renamed into it; HEAD.npz last,
    so a head that exists was written completely with its evaluation."""
    import csv
    import io

    import numpy as np

    from ..use import evaluate

    ev = head.evaluation
    sides = side_paths(out)
    with dest.writing():
        for p in [out, *sides.values()]:
            if p.exists() and not overwrite:
                raise VGGEmbedError(f"{p}: exists; pass --overwrite to replace it")

        def put(path: Path, write) -> None:
            tmp = path.with_name(path.name + ".partial")
            try:
                with open(tmp, "wb") as f:
                    write(f)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        put(sides[".metrics.json"], lambda f: f.write((json.dumps(head.metrics, indent=1) + "\n").encode()))
        paths = np.array(ev.paths, dtype=str)
        put(sides[".oof.npz"], lambda f: np.savez(f, paths=paths, given=ev.given, proba=ev.proba, fold=ev.fold,
                                                  classes=np.array(ev.classes, dtype=str)))
        predicted = np.argmax(ev.proba, axis=1)
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["path", "fold", "given", "predicted", "p_given", "p_predicted"])
        rows = np.arange(len(ev.paths))
        p_given, p_predicted = ev.proba[rows, ev.given], ev.proba[rows, predicted]
        for i in rows.tolist():
            w.writerow([ev.paths[i], int(ev.fold[i]) + 1 if ev.fold[i] >= 0 else "", ev.classes[ev.given[i]],
                        ev.classes[predicted[i]], f"{p_given[i]:.6g}", f"{p_predicted[i]:.6g}"])
        put(sides[".oof.csv"], lambda f: f.write(text.getvalue().encode("utf-8", "surrogateescape")))
        put(sides[".confusion.csv"],
            lambda f: f.write(evaluate.confusion_csv(head.metrics, ev.classes).encode("utf-8", "surrogateescape")))
        picture = evaluate.confusion_picture(head.metrics, ev.classes,
                                             f"{out.name}: {head.metrics['evaluation']} confusion (rows: given, "
                                             f"columns: predicted)")
        put(sides[".confusion.png"], lambda f: picture.save(f, format="PNG"))
        put(out, head.write)
        head.path = str(out)
