"""The `vggembed` command: a thin layer over the library.

stdout carries data only (predictions, info); messages, progress and the
summary go to stderr. Exit codes:

\b
  0  every image succeeded
  1  an error stopped the run (bad weights, bad output path, --strict)
  2  wrong usage (unknown option, missing argument)
  3  the run completed, but some images failed (see OUT.errors.csv / stderr)
  130 interrupted (Ctrl-C); `embed --resume` continues
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import VGGEmbedError

EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str) -> None:
    raise click.ClickException(message)


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


# ------------------------------------------------------------- shared options
def weight_options(f):
    f = click.option("--weights", "weights", type=click.Path(dir_okay=False), envvar="VGGEMBED_WEIGHTS",
                     help="Weight file (.npz or .mat). Default: $VGGEMBED_WEIGHTS, ./weights/, then the cache.")(f)
    f = click.option("--model", default="vgg16", show_default=True,
                     help="Published weights to look for when --weights is not given (vgg16, vgg19, ...).")(f)
    f = click.option("--labels", type=click.Path(exists=True, dir_okay=False),
                     help="Class names for weights without them: imagenet_classes.py, synset_words.txt, "
                          "imagenet_class_index.json or one per line.")(f)
    f = click.option("--legacy-transpose", is_flag=True,
                     help="Transpose .mat conv kernels (1,0,2,3) as the VGG19 seed did (wrong for the "
                          "published files; only to reproduce its feature maps).")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)(f)
    f = click.option("--precision", type=click.Choice(["float32", "bf16", "fp16"]), default="float32",
                     show_default=True, help="bf16 only where the CPU has AVX512_BF16/AMX, or on GPUs.")(f)
    return f


def run_options(f):
    f = click.option("--files-from", type=click.Path(exists=True, dir_okay=False),
                     help="A file with one image path per line (after the INPUTs).")(f)
    f = click.option("-0", "--null", is_flag=True,
                     help="Lists ('-' and --files-from) are NUL-separated, as `find -print0` writes them.")(f)
    f = click.option("--resize", type=click.Choice(["squash", "center-crop", "none"]), default="squash",
                     show_default=True, help="squash to 224x224 (the seeds), center-crop (short side 256, "
                                             "centre 224), or none (native size; conv/pool layers only).")(f)
    f = click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)(f)
    f = click.option("--workers", type=click.IntRange(1), default=min(8, os.cpu_count() or 2),
                     show_default="CPU count, at most 8", help="Decoding threads.")(f)
    f = click.option("--fast-decode", is_flag=True,
                     help="Decode JPEGs at reduced scale (much faster on large photos; values change slightly).")(f)
    f = click.option("--max-pixels", type=click.IntRange(1), default=None,
                     help="Refuse larger images (default Pillow's 89.5 million).")(f)
    f = click.option("--strict", is_flag=True, help="Stop at the first image that fails.")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")(f)
    return f


def _load(ctx, weights, model, labels, legacy_transpose, device, precision):
    """Load the network; with -v, say how long each start-up phase took."""
    from .model import load

    t = {}
    vgg = load(weights, model=model, labels=labels, legacy_transpose=legacy_transpose, precision=precision,
               device=device, timings=t)
    if ctx.obj["verbose"]:
        spec = vgg.spec
        click.echo(f"vggembed: {spec.path} ({spec.arch}, {spec.layout}) on {vgg.device}, {precision}; start-up: "
                   f"TensorFlow import {t['tensorflow']:.2f}s, weight file {t['weights']:.2f}s, "
                   f"model {t['model']:.2f}s", err=True)
    return vgg


def _options(resize, batch_size, workers, fast_decode, max_pixels, strict, quiet):
    from .images import DEFAULT_MAX_PIXELS
    from .runner import Options

    return Options(resize=resize, batch_size=batch_size, workers=workers, fast_decode=fast_decode,
                   max_pixels=max_pixels or DEFAULT_MAX_PIXELS, strict=strict,
                   progress=not quiet and sys.stderr.isatty())


def _sources(inputs, files_from, null):
    """(sources iterator, total or None)."""
    from .inputs import for_run

    if not inputs and not files_from:
        _fail("no input: give image files, folders, '-' for paths on stdin, or --files-from LIST")
    return for_run(list(inputs), files_from, null=null)


def _finish(ctx, summary, verb, quiet, tail=""):
    """The one summary line on stderr, and the exit code."""
    if ctx.obj["verbose"] and summary.first_batch_seconds is not None:
        click.echo(f"vggembed: first batch (decode, graph build, run) {summary.first_batch_seconds:.2f}s; waited for decoding "
                   f"{summary.wait_seconds:.2f}s of {summary.seconds:.2f}s", err=True)
    if not quiet:
        click.echo("vggembed: " + summary.line(verb) + tail, err=True)
    ctx.exit(EXIT_SOME_FAILED if summary.failed else 0)


# -------------------------------------------------------------------- embed
@main.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="OUT.npy, OUT.csv or OUT.parquet (rows in input order; OUT.index.csv maps rows to paths); "
                   "a folder with --engine ray.")
@click.option("--layer", default="fc2", show_default=True,
              help="fc2 = fc7 = relu7 (4096-d), fc1 = fc6 = relu6, fc8/fc3l logits, probs, or any conv/pool layer.")
@click.option("--pool", type=click.Choice(["avg", "max", "flatten"]), help="Make conv/pool maps into vectors.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--l2-normalize", is_flag=True, help="Scale each vector to unit length.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: run on a Ray cluster; OUT is then a folder of Parquet parts (see `vggembed merge`).")
@click.option("--address", help="Ray cluster to join (auto, or ray://HOST:PORT); default: start one here.")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True,
              help="With --engine ray: GPUs per model actor (--workers is then the number of actors).")
@click.option("--part-size", type=click.IntRange(1), default=1000, show_default=True,
              help="With --engine ray: images per Parquet part, the unit of --resume.")
@run_options
@weight_options
@click.pass_context
def embed(ctx, inputs, output, layer, pool, dtype, l2_normalize, resume, overwrite, engine, address,
          gpus_per_worker, part_size, files_from, null, resize, batch_size, workers, fast_decode, max_pixels, strict,
          quiet, weights, model, labels, legacy_transpose, device, precision):
    """Embed images into vectors, one row per image, in input order.

    INPUT is an image, a folder (recursive, sorted), or '-' for paths on stdin.
    Images that fail are reported on stderr and in OUT.errors.csv, and left
    out; the run goes on (exit code 3).

    \b
    Examples:
      vggembed embed images/ -o feats.npy
      vggembed embed a.jpg b.png -o feats.csv --layer pool5 --pool avg
      find . -name '*.jpg' | vggembed embed - -o feats.parquet
    """
    from . import runner
    from .output import EmbeddingWriter

    if engine == "ray":
        if ctx.get_parameter_source("workers") == click.core.ParameterSource.DEFAULT:
            workers = 1  # model actors, not decoding threads, on Ray
        if strict:
            raise click.UsageError("--strict stops at the first bad image; --engine ray records them as rows")
        _embed_ray(ctx, inputs, output, files_from, null, quiet, weights=weights, model=model, layer=layer, pool=pool,
                   legacy_transpose=legacy_transpose,
                   l2_normalize=l2_normalize, dtype=dtype, resize=resize, batch_size=batch_size, workers=workers,
                   gpus_per_worker=gpus_per_worker, address=address, part_size=part_size, resume=resume,
                   overwrite=overwrite, max_pixels=max_pixels, fast_decode=fast_decode, device=device,
                   precision=precision)
        return
    try:
        writer = EmbeddingWriter(output, dtype=dtype, resume=resume, overwrite=overwrite)
        vgg = _load(ctx, weights, model, labels, legacy_transpose, device, precision)
        vgg.embedding_layer(layer, pool)
        sources, total = _sources(inputs, files_from, null)
        opts = _options(resize, batch_size, workers, fast_decode, max_pixels, strict, quiet)
        summary = runner.embed(vgg, sources, writer, layer=layer, pool=pool, l2_normalize=l2_normalize,
                               opts=opts, total=total)
    except KeyboardInterrupt:
        click.echo("vggembed: interrupted; the finished batches are kept: run the same command with --resume",
                   err=True)
        ctx.exit(EXIT_INTERRUPTED)
    except VGGEmbedError as e:
        _fail(str(e))
    _finish(ctx, summary, "embedded", quiet, f"; wrote {output} ({writer.rows} x {writer.dim} {dtype})")


def _embed_ray(ctx, inputs, output, files_from, null, quiet, *, weights, model, **kw):
    from . import distributed
    from .download import find_weights

    try:
        # the driver needs the whole sorted list for its ids
        paths = [source.name for source in _sources(inputs, files_from, null)[0]]
        counts = distributed.embed(paths, output, weights=str(weights or find_weights(model)),
                                   log=lambda line: click.echo(line, err=True), **kw)
    except KeyboardInterrupt:
        click.echo("vggembed: interrupted; finished parts are kept: run the same command with --resume", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    except VGGEmbedError as e:
        _fail(str(e))
    if not quiet:
        rate = counts["images"] / counts["seconds"] if counts["seconds"] else 0.0
        click.echo(f"vggembed: embedded {counts['images'] - counts['failed']} of {counts['images']} images on Ray "
                   f"in {counts['seconds']:.1f}s ({rate:.1f} images/s)"
                   + (f"; {counts['failed']} failed" if counts["failed"] else "")
                   + (f"; {counts['skipped']} already done" if counts["skipped"] else "")
                   + f"; parts in {output} (vggembed merge {output} -o feats.npy)", err=True)
    ctx.exit(EXIT_SOME_FAILED if counts["failed"] else 0)


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="OUT.npy, OUT.csv or OUT.parquet, with OUT.index.csv and OUT.errors.csv.")
@click.option("--overwrite", is_flag=True)
def merge(run_dir, output, overwrite):
    """Gather an --engine ray folder into one output, rows in the local engine's order.

    \b
    Example:
      vggembed merge feats_parts/ -o feats.npy
    """
    from .distributed import merge as merge_parts

    try:
        rows, failed = merge_parts(run_dir, output, overwrite=overwrite)
    except VGGEmbedError as e:
        _fail(str(e))
    click.echo(f"vggembed: wrote {output} ({rows} rows; {failed} failed images listed in {output}.errors.csv)",
               err=True)


# ----------------------------------------------------------------- classify
@main.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1)
@click.option("--top", type=click.IntRange(1), default=5, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "jsonl"]), default="table",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@run_options
@weight_options
@click.pass_context
def classify(ctx, inputs, top, fmt, output, files_from, null, resize, batch_size, workers, fast_decode, max_pixels,
             strict, quiet, weights, model, labels, legacy_transpose, device, precision):
    """Top ImageNet predictions with their labels.

    For one image the table reads as the VGG16 tutorial's:
    "1. weasel (0.6934)". For several, one row per image and rank:
    path, rank, class index, label, probability.

    \b
    Examples:
      vggembed classify laska.png
      vggembed classify photos/ --format csv -o preds.csv
    """
    from . import runner

    try:
        vgg = _load(ctx, weights, model, labels, legacy_transpose, device, precision)
        if vgg.spec.labels is None and vgg.spec.has_fc:
            click.echo(f"vggembed: note: no labels for {vgg.spec.path}; showing class indices "
                       "(pass --labels FILE)", err=True)
        sources, total = _sources(inputs, files_from, null)
        opts = _options(resize, batch_size, workers, fast_decode, max_pixels, strict, quiet)
        with _Sink(output) as out:
            emit = _emitter(out, fmt, single=total == 1)
            summary = runner.classify(vgg, sources, emit, top=top, opts=opts, total=total)
            emit.close()
    except KeyboardInterrupt:
        click.echo("vggembed: interrupted", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    except VGGEmbedError as e:
        _fail(str(e))
    _finish(ctx, summary, "classified", quiet)


class _Sink:
    """stdout, or a file that appears under its name only when complete."""

    def __init__(self, path):
        self.path = Path(path) if path else None

    def __enter__(self):
        if self.path is None:
            return sys.stdout
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.f = open(self.tmp, "w", newline="", encoding="utf-8")
        return self.f

    def __exit__(self, exc_type, *_):
        if self.path is None:
            sys.stdout.flush()
            return
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _emitter(out, fmt, single):
    """A callable(source, predictions) that writes one format, streaming, plus close()."""
    fields = ["path", "rank", "index", "label", "probability"]

    class Emit:
        first = True

        def __call__(self, source, preds):
            rows = [{"path": source, "rank": p.rank, "index": p.index, "label": p.label,
                     "probability": p.probability} for p in preds]
            if fmt == "table" and single:
                for p in preds:
                    out.write(f"{p.rank}. {p.label} ({p.probability:.4f})\n")
            elif fmt == "table":
                if self.first:
                    out.write("\t".join(fields) + "\n")
                for r in rows:
                    out.write(f"{r['path']}\t{r['rank']}\t{r['index']}\t{r['label']}\t{r['probability']:.4f}\n")
            elif fmt == "csv":
                w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
                if self.first:
                    w.writeheader()
                w.writerows(rows)
            elif fmt == "jsonl":
                out.write(json.dumps({"path": source, "predictions": [_pred(p) for p in preds]}) + "\n")
            else:
                out.write(("[\n" if self.first else ",\n") +
                          json.dumps({"path": source, "predictions": [_pred(p) for p in preds]}))
            self.first = False
            out.flush()

        def close(self):
            if fmt == "json":
                out.write("[]\n" if self.first else "\n]\n")

    return Emit()


def _pred(p):
    return {"rank": p.rank, "index": p.index, "label": p.label, "probability": p.probability}


# --------------------------------------------------------------------- info
@main.command(context_settings=CONTEXT)
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--labels", type=click.Path(exists=True, dir_okay=False))
def info(weights, labels):
    """Describe a weight file: format, layout, layers and shapes, checksum.

    Reads the file with numpy/scipy only; TensorFlow is not started.
    """
    from . import arch
    from .weights import load_weights

    try:
        params, spec = load_weights(weights, labels=labels)
    except VGGEmbedError as e:
        _fail(str(e))
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


# ------------------------------------------------------------------ weights
@main.group(context_settings=CONTEXT)
def weights():
    """List and download the published weight files."""


@weights.command("list")
def weights_list():
    """The published files `fetch` knows, and whether each is on this machine."""
    from .download import search_folders
    from .registry import PUBLISHED

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
    from .download import fetch

    for name in names:
        try:
            path = fetch(name, dest=Path(dest) if dest else None, mirror=mirror,
                         progress=not quiet and sys.stderr.isatty())
        except VGGEmbedError as e:
            _fail(str(e))
        click.echo(str(path))


# ----------------------------------------------------------------- pictures
def _save_png(img, output):
    """Write a PNG under its name only once complete."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    img.save(tmp, format="PNG")
    os.replace(tmp, out)


def _native_image(path, max_side, max_pixels):
    import numpy as np
    from PIL import Image

    from .images import DEFAULT_MAX_PIXELS, load_rgb

    img = load_rgb(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.BILINEAR)
    return np.asarray(img)


@main.command(context_settings=CONTEXT)
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
@weight_options
@click.pass_context
def maps(ctx, image, output, layers, channel, layer, channels, save_npy, panel_width, max_side, max_memory,
         max_pixels, weights, model, labels, legacy_transpose, device, precision):
    """Feature maps of every layer at the image's own size, as one PNG grid.

    Runs fully convolutionally (no resize), one layer at a time, as the VGG19
    tutorial's 4x9 figure; each panel is titled with its layer and shape.

    \b
    Examples:
      vggembed maps cat.jpg -o maps.png --model vgg19
      vggembed maps cat.jpg -o maps.png --layers relu1_1,relu2_1,relu3_1 --channel strongest
      vggembed maps cat.jpg --layer conv3_1 --channels 64 -o grid.png
    """
    from . import pictures

    if channel not in pictures.CHANNEL_MODES and not channel.isdigit():
        raise click.BadParameter("a channel number, mean or strongest", param_hint="--channel")
    try:
        vgg = _load(ctx, weights, model, labels, legacy_transpose, device, precision)
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
        _fail(str(e))
    click.echo(f"vggembed: wrote {output} ({img.width}x{img.height}) from {image} at {w}x{h}", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--layer", default="fc2", show_default=True, help="Any vector layer (or a conv layer with --pool).")
@click.option("--pool", type=click.Choice(["avg", "max", "flatten"]))
@click.option("--resize", type=click.Choice(["squash", "center-crop", "none"]), default="squash", show_default=True)
@weight_options
@click.pass_context
def plot(ctx, image, output, layer, pool, resize, weights, model, labels, legacy_transpose, device, precision):
    """Bar chart of an image's embedding, as the VGG16 tutorial draws fc2.

    \b
    Example:
      vggembed plot laska.png -o fc2.png
    """
    from .pictures import bar_chart

    try:
        vgg = _load(ctx, weights, model, labels, legacy_transpose, device, precision)
        vector = vgg.embed([image], layer, pool=pool, resize=resize, batch_size=1)[0]
        _save_png(bar_chart(vector, f"{len(vector)}-dimensional representation of image"), output)
    except VGGEmbedError as e:
        _fail(str(e))
    click.echo(f"vggembed: wrote {output} ({len(vector)} bars)", err=True)
