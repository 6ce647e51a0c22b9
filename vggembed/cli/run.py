"""embed, merge and classify: images in, vectors or labels out."""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from ..errors import VGGEmbedError, display
from ..store.destination import Destination, is_stream
from .common import (
    CONTEXT,
    EXIT_SOME_FAILED,
    ON_INTERRUPT,
    fail,
    finish,
    head_option,
    head_recipe,
    load_options,
    one_line,
    report,
    no_images,
    outputs_option,
    recipe_options,
    run_options,
    sources,
)
from .process import data_stdout

RESUME_HINT = "the finished batches are kept: run the same command with --resume"


def output_run_options(f):
    """What embed and classify share about their output: --resume, --overwrite, and the engine that writes it
    (--engine ray with --address, --gpus-per-worker, --part-size)."""
    for option in reversed([
        click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="ray: run on a Ray cluster; OUT is then a folder of Parquet parts (see `vggembed merge`)."),
        click.option("--address", help="Ray cluster to join (auto, or ray://HOST:PORT); default: start one here."),
        click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True,
                     help="With --engine ray: GPUs per model actor (--workers is then the number of actors)."),
        click.option("--part-size", type=click.IntRange(1), default=1000, show_default=True,
                     help="With --engine ray: images per Parquet part, the unit of --resume."),
    ]):
        f = option(f)
    return f


# -------------------------------------------------------------------- embed
@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="OUT.npy (one output), OUT.npz, OUT.csv or OUT.parquet (rows in input order; OUT.index.csv "
                   "maps rows to paths); a folder with --engine ray.")
@recipe_options(vector=True, inputs=True)
@output_run_options
@run_options
@load_options
@click.pass_context
def embed(ctx, inputs, output, recipe, resume, overwrite, engine, address, gpus_per_worker, part_size, files_from,
          null, quiet, opts, setup):
    """Embed images into vectors, one row per image, in input order.

    INPUT is an image, a folder (recursive, sorted), a tar shard, a URL (files
    or folders), or '-' for paths on stdin (-0: NUL-separated).
    Images that fail are reported on stderr and in OUT.errors.csv, and left
    out; the run goes on (exit code 3).

    \b
    Examples:
      vggembed embed images/ -o feats.npy
      vggembed embed a.jpg b.png -o feats.csv --layer pool5 --pool avg
      vggembed embed images/ -o feats.parquet --layer fc2 --layer pool5:avg --top 5
      find . -name '*.jpg' | vggembed embed - -o feats.parquet
      find . -type f -print0 | vggembed embed -0 - -o feats.npy
      vggembed embed shard-00000.tar s3://bucket/photos/ -o feats.npy
    """
    if engine != "ray":
        _check_format(output, recipe)
    _run(ctx, inputs, output, recipe, resume, overwrite, engine, address, gpus_per_worker, part_size, files_from,
         null, quiet, opts, setup, "embedded")


def _check_format(output, recipe) -> None:
    from ..store.writer import check_format

    try:
        check_format(output, recipe)
    except VGGEmbedError as e:
        raise click.UsageError(str(e)) from None


def _run(ctx, inputs, output, recipe, resume, overwrite, engine, address, gpus_per_worker, part_size, files_from,
         null, quiet, opts, setup, verb):
    """embed and classify -o FILE: the inputs through the network into the writer, or on Ray into parts; then
    the exit code."""
    failed = produce(ctx, inputs, output, recipe, resume, overwrite, engine, address, gpus_per_worker, part_size,
                     files_from, null, quiet, opts, setup, verb)
    ctx.exit(EXIT_SOME_FAILED if failed else 0)


def produce(ctx, inputs, output, recipe, resume, overwrite, engine, address, gpus_per_worker, part_size, files_from,
            null, quiet, opts, setup, verb) -> int:
    """Write `recipe`'s arrays for the inputs into `output` (locally or on Ray), print the summary line, and
    return how many images failed."""
    from ..engines import local as runner
    from ..store.writer import EmbeddingWriter

    if engine == "ray":
        if ctx.get_parameter_source("workers") == click.core.ParameterSource.DEFAULT:
            opts = dataclasses.replace(opts, workers=1)  # model actors, not decoding threads, on Ray
        if opts.strict:
            raise click.UsageError("--strict stops at the first bad image; --engine ray records them as rows")
        return _embed_ray(ctx, inputs, output, files_from, null, quiet, recipe, opts, gpus_per_worker=gpus_per_worker,
                          address=address, part_size=part_size, resume=resume, overwrite=overwrite, verb=verb)
    ctx.meta[ON_INTERRUPT] = RESUME_HINT
    try:
        paths, total = sources(inputs, files_from, null)
        with EmbeddingWriter(output, resume=resume, overwrite=overwrite) as writer:
            vgg = setup.load(recipe)
            bound = runner.check_outputs(vgg, recipe)
            if writer.complete:
                runner.check_complete(paths, writer, bound)
                if not quiet:
                    click.echo(f"vggembed: {output} is already complete; nothing left to do", err=True)
                return 0
            summary = runner.embed(vgg, paths, writer, recipe, opts, total=total)
    except VGGEmbedError as e:
        fail(str(e))
    report(ctx, summary, verb, quiet, f"; wrote {output} ({writer.describe()})")
    return summary.failed


def _embed_ray(ctx, inputs, output, files_from, null, quiet, recipe, opts, verb="embedded", **kw):
    from ..engines import ray as distributed

    ctx.meta[ON_INTERRUPT] = "finished parts are kept: run the same command with --resume"
    try:
        from ..images.inputs import plan
        from ..images.sources import is_url

        if not inputs and not files_from:
            fail("no input: give image files, folders, shards, URLs, '-' for paths on stdin, or --files-from LIST")
        units = list(plan(list(inputs), files_from, null=null))  # names only; each tar shard stays one unit
        if not units:
            no_images(inputs, files_from)
        # A local OUT is held against other runs; an object store has no such lock.
        with contextlib.nullcontext() if is_url(str(output)) else Destination(output):
            counts = distributed.embed(units, output, recipe, opts, log=lambda line: click.echo(line, err=True),
                                       verbose=ctx.obj["verbose"], **kw)
    except VGGEmbedError as e:
        fail(str(e))
    if not quiet:
        rate = counts.images / counts.seconds if counts.seconds else 0.0
        click.echo(f"vggembed: {verb} {counts.images - counts.failed} of {counts.images} images on Ray "
                   f"in {counts.seconds:.1f}s ({rate:.1f} images/s)"
                   + (f"; {counts.failed} failed" if counts.failed else "")
                   + (f"; {counts.skipped} of {counts.planned} parts already done" if counts.skipped else "")
                   + f"; parts in {output} (vggembed merge {output} -o "
                     f"{'feats.npy' if len(recipe.names) == 1 else 'feats.npz'})", err=True)
    return counts.failed


# ----------------------------------------------------- images, then vectors
# What only says how images are embedded: given with embedding outputs alone, there is nothing for it to do.
EMBEDDING_ONLY = ("weights", "model", "legacy_transpose", "precision", "calibration", "dtype", "l2_normalize",
                  "resize", "fast_decode", "features", "resume", "engine", "address", "gpus_per_worker", "part_size",
                  "batch_size", "workers", "fetch_ahead", "max_pixels", "strict", "null", "device")


def feature_places(stem: str, features: str | None, engine: str) -> tuple[str, str]:
    """Where a command that reads vectors writes the vectors of its image INPUTs and of its --val images:
    `features` or STEM + `features.npy`, and STEM + `val-features.npy` (folders without `.npy` on Ray)."""
    ext = "" if engine == "ray" else ".npy"
    return features or f"{stem}features{ext}", f"{stem}val-features{ext}"


def is_output(name) -> bool:
    """An embedding output rather than images: a file by its suffix or a local Ray folder by its manifest
    (`use.train.is_embedding_output`), or a URL, not named as an image or a shard, that holds a Ray run's
    manifest (one listing)."""
    from ..images.sources import is_image_name, is_shard, is_url
    from ..store.runfolder import MANIFEST, Store
    from ..use.train import is_embedding_output

    name = os.fsdecode(name)
    if is_embedding_output(name):
        return True
    if not is_url(name) or is_shard(name) or is_image_name(name.rstrip("/").rsplit("/", 1)[-1]):
        return False
    try:
        return MANIFEST in Store(name).list()
    except VGGEmbedError:
        return False  # read as images, whose listing says what is wrong


def errors_listing(output) -> str:
    """Where an embedding output lists its failed images: OUT.errors.csv, or the Ray run folder itself."""
    errors = f"{output}.errors.csv"
    return display(errors if os.path.isfile(errors) else str(output))


def embed_first(ctx, inputs, val, places, recipe, resume, overwrite, engine, address, gpus_per_worker, part_size,
                files_from, null, quiet, opts, setup) -> tuple[list, list, int]:
    """The INPUTs and --val of a command that reads vectors: images (folders, files, shards, URLs, lists) are
    embedded first, as `embed` embeds them, into `places` (`feature_places`), which `--resume` continues and
    a later run can read; embedding outputs (`is_output`) are read as they are. Each of the two is images or
    outputs, not both; options that only say how to embed, given on the command line with outputs alone, are a
    usage error naming them. Returns (the INPUTs' outputs, --val's outputs, how many images failed)."""
    from ..images.sources import is_url

    output = {n: is_output(n) for n in [*inputs, *val]}
    missing = [n for n, yes in output.items() if yes and not is_url(os.fsdecode(n)) and not os.path.exists(n)]
    if missing:
        fail(f"{display(os.fsdecode(missing[0]))}: no such file or folder")
    images = [i for i in inputs if not output[i]]
    if (images or files_from) and len(images) != len(inputs):
        raise click.UsageError("give either images (folders, files, shards) or embedding outputs, not both")
    val_images = [v for v in val if not output[v]]
    if val_images and len(val_images) != len(val):
        raise click.UsageError("--val: give either images or embedding outputs, not both")
    if not (images or files_from or val_images):
        given = [p.opts[0] for p in ctx.command.params if p.name in EMBEDDING_ONLY
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            one = len(given) == 1
            raise click.UsageError(f"{', '.join(given)}: {'says' if one else 'say'} how images are embedded, but "
                                   f"{display(os.fsdecode(inputs[0]))} is an embedding output, read as it was made "
                                   f"(its recipe records how); leave {'it' if one else 'them'} out")

    def embed(group, listing, place) -> int:
        if not (resume or overwrite) and os.path.lexists(place):
            fail(f"{display(place)}: holds vectors embedded before; pass --resume to read them (or finish "
                 "embedding them), or --overwrite to embed again")
        failed = produce(ctx, list(group), place, recipe, resume, overwrite and not resume, engine, address,
                         gpus_per_worker, part_size, listing, null, quiet, opts, setup, "embedded")
        if failed:
            from ..store.vectors import open_vectors

            try:
                with open_vectors(place) as vectors:
                    rows = vectors.rows
            except VGGEmbedError:
                rows = 1  # the reader that follows says what is wrong with it
            if not rows:  # every image failed (a mistyped folder, say): said above, line by line
                fail(f"no image could be read ({failed} failed, listed in {errors_listing(place)}); nothing to "
                     f"{'train on' if ctx.command.name == 'train' else ctx.command.name}")
        return failed

    failed, sources, val_sources = 0, list(inputs), list(val)
    if images or files_from:
        failed += embed(inputs, files_from, places[0])
        sources = [places[0]]
    if val_images:
        failed += embed(val, None, places[1])
        val_sources = [places[1]]
    return sources, val_sources, failed


@click.command(context_settings=CONTEXT)
@click.argument("run_dir")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="OUT.npy (one output), OUT.npz, OUT.csv or OUT.parquet, with OUT.index.csv and OUT.errors.csv.")
@click.option("--overwrite", is_flag=True)
def merge(run_dir, output, overwrite):
    """Gather an --engine ray folder (a path or a URL such as s3://bucket/run) into one output,
    rows in the local engine's order.

    \b
    Example:
      vggembed merge feats_parts/ -o feats.npy
    """
    from ..store.runfolder import merge as merge_parts

    try:
        rows, failed = merge_parts(run_dir, output, overwrite=overwrite)
    except VGGEmbedError as e:
        fail(str(e))
    click.echo(f"vggembed: wrote {output} ({rows} rows; {failed} failed images listed in {output}.errors.csv)",
               err=True)


# ----------------------------------------------------------------- classify
@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1)
@click.option("--top", type=int, default=5, show_default=True, metavar="K")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "jsonl"]),
              help="A report on stdout (or -o): table (the default), csv (a row per image and rank), json, jsonl.")
@click.option("-o", "--output", type=click.Path(),
              help="OUT.parquet, OUT.npz or OUT.csv without --format: top_index, top_prob and top_label per "
                   "image, as embed --top writes them (resumable, --engine ray); with --format, the report.")
@head_option
@recipe_options(inputs=True)
@output_run_options
@run_options
@load_options
@click.pass_context
def classify(ctx, inputs, top, fmt, output, head_path, recipe, resume, overwrite, engine, address, gpus_per_worker,
             part_size, files_from, null, quiet, opts, setup):
    """Top ImageNet predictions with their labels, or your own classes with --head.

    For one image the table reads as the VGG16 tutorial's:
    "1. weasel (0.6934)". For several, one row per image and rank:
    path, rank, class index, label, probability.

    With -o OUT.parquet, OUT.npz or OUT.csv (and no --format), the
    predictions are written as `embed --top K` writes them: resumable with
    --resume, and on Ray with --engine ray.

    With --head HEAD.npz (from `vggembed train`), the classes are the head's,
    on features made as it records.

    \b
    Examples:
      vggembed classify laska.png
      vggembed classify photos/ --format csv -o preds.csv
      vggembed classify photos/ -o preds.parquet --resume
      vggembed classify new/ --head head.npz --format csv
    """
    from ..engines import local as runner
    from ..store.writer import FORMATS

    recipe = recipe.replace(**outputs_option((), None, top))
    if head_path is not None:
        recipe = head_recipe(ctx, recipe, head_path, top)
        top = recipe.top
    if engine == "ray" or (output is not None and fmt is None and Path(output).suffix.lower() in FORMATS):
        if engine != "ray":
            _check_format(output, recipe)
        _run(ctx, inputs, output, recipe, resume, overwrite, engine, address, gpus_per_worker, part_size,
             files_from, null, quiet, opts, setup, "classified")
        return
    if resume or overwrite:
        raise click.UsageError("--resume and --overwrite are for -o OUT.parquet, .npz or .csv without --format")
    try:
        paths, total = sources(inputs, files_from, null)
        with _Sink(output) as out:
            vgg = setup.load(recipe)
            if vgg.head is None and vgg.spec.labels is None and vgg.spec.has_fc:
                click.echo(f"vggembed: note: no labels for {vgg.spec.path}; showing class indices "
                           "(pass --labels FILE)", err=True)
            emit = _emitter(out, fmt or "table", single=total == 1)
            summary = runner.classify(vgg, paths, emit, top=top, recipe=recipe, opts=opts, total=total)
            emit.close()
    except VGGEmbedError as e:
        fail(str(e))
    finish(ctx, summary, "classified", quiet)


class _Sink:
    """stdout, or a file held by this run (`Destination`) that appears under its name only when complete
    (a stream such as /dev/stdout or a FIFO is written in place); a failed write is one line naming where."""

    def __init__(self, path):
        self.dest = Destination(path if path else "standard output")
        self.path = Path(path) if path else None

    def __enter__(self):
        if self.path is None:
            return _Guarded(data_stdout(), self.dest)
        self.tmp = self.path if is_stream(self.path) else self.path.with_name(self.path.name + ".partial")
        self.dest.claim()
        try:
            with self.dest.writing():
                self.f = open(self.tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")
        except BaseException:
            self.dest.release()
            raise
        return _Guarded(self.f, self.dest)

    def __exit__(self, exc_type, *_):
        if self.path is None:
            if exc_type is None:
                with self.dest.writing():
                    sys.stdout.flush()
            return
        try:
            # After another error, a failing close (the same full disk) must not hide it.
            with self.dest.writing(), contextlib.suppress(*(OSError,) if exc_type else ()):
                try:
                    self.f.close()
                    if exc_type is None and self.tmp != self.path:
                        os.replace(self.tmp, self.path)
                finally:
                    if self.tmp != self.path:
                        self.tmp.unlink(missing_ok=True)
        finally:
            self.dest.release()


class _Guarded:
    """A text file whose failed writes raise `OutputError` naming the destination."""

    def __init__(self, f, dest: Destination):
        self.f, self.dest = f, dest

    def write(self, text: str) -> int:
        with self.dest.writing():
            return self.f.write(text)

    def flush(self) -> None:
        with self.dest.writing():
            self.f.flush()


def _json_path(source: str) -> dict:
    """A name in JSON, which holds only Unicode: `path`, and where the name is not UTF-8 its exact bytes
    as base64 in `path_bytes` (`path` then shows those bytes as \\xNN), as Parquet's path columns."""
    raw = os.fsencode(source)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path": display(source), "path_bytes": base64.b64encode(raw).decode("ascii")}


def _emitter(out, fmt, single):
    """A callable(source, predictions) that writes one format, streaming, plus close().

    csv keeps names exactly (the bytes, quoted where needed); json and jsonl as
    `_json_path`; the table, which is for reading, shows undecodable bytes as
    \\xNN and tabs and line breaks as \\t, \\n, \\r in paths and class names, so
    each row stays one line."""
    fields = ["path", "rank", "index", "label", "probability"]

    class Emit:
        first = True

        def __call__(self, source, preds):
            rows = [{"path": source, "rank": p.rank, "index": p.index, "label": p.label,
                     "probability": p.probability} for p in preds]
            if fmt == "table" and single:
                for p in preds:
                    out.write(f"{p.rank}. {one_line(p.label)} ({p.probability:.4f})\n")
            elif fmt == "table":
                if self.first:
                    out.write("\t".join(fields) + "\n")
                shown = one_line(source)
                for r in rows:
                    out.write(f"{shown}\t{r['rank']}\t{r['index']}\t{one_line(r['label'])}\t{r['probability']:.4f}\n")
            elif fmt == "csv":
                w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
                if self.first:
                    w.writeheader()
                w.writerows(rows)
            elif fmt == "jsonl":
                out.write(json.dumps({**_json_path(source), "predictions": [_pred(p) for p in preds]}) + "\n")
            else:
                out.write(("[\n" if self.first else ",\n") +
                          json.dumps({**_json_path(source), "predictions": [_pred(p) for p in preds]}))
            self.first = False
            out.flush()

        def close(self):
            if fmt == "json":
                out.write("[]\n" if self.first else "\n]\n")

    return Emit()




def _pred(p):
    return {"rank": p.rank, "index": p.index, "label": p.label, "probability": p.probability}


