"""`vggembed audit`: outliers, near-duplicates, and with labels likely mislabels, leaks and class counts."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import VGGEmbedError, display
from ..use import DEFAULT_THRESHOLD
from .common import CONTEXT, EXIT_SOME_FAILED, Setup, fail, recipe_options, run_options
from .run import embed_first, errors_listing, feature_places, output_run_options


@click.command(context_settings=CONTEXT)
@click.argument("inputs", metavar="INPUT...", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the CSVs and the HTML report (OUT/report/index.html).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="Labels: a CSV of path,label (UTF-8; a header line naming path and label may come first, "
                   "other columns are ignored) or a Parquet file with path (or path_bytes) and label columns.")
@click.option("--folders", is_flag=True,
              help="Labels from class folders: each image's class is the first folder under the folder given "
                   "(photos/cat/a.jpg is cat), or for an embedding output under the folder its recorded paths "
                   "share, or under --root.")
@click.option("--root", metavar="DIR", help="With --folders: the folder whose subfolders are the classes.")
@click.option("--split", "split_column", metavar="COLUMN",
              help="A column of the --labels file naming each image's split (train, val, ...): near-duplicates "
                   "across splits are reported as leaks.")
@click.option("--val", multiple=True, metavar="INPUT",
              help="The validation images, or their embedding output (repeatable): the INPUTs are the training "
                   "split, and near-duplicates across the two are leaks.")
@click.option("-k", "k", type=click.IntRange(1, 100), default=10, show_default=True,
              help="Nearest neighbours per image.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=DEFAULT_THRESHOLD, show_default=True,
              help="Cosine at or above which two images are near-duplicates.")
@click.option("--probabilities", type=click.Choice(["auto", "head", "knn"]), default="auto", show_default=True,
              help="Where the label issues' out-of-fold class probabilities come from: head, the softmax head "
                   "vggembed train fits (its folds and C sweep; the labelled vectors in memory); knn, the "
                   "nearest neighbours' labels weighted by closeness (no extra pass); auto: head up to 50M "
                   "labelled values (rows x dimensions, e.g. 12,000 4096-d vectors), else knn.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the head's folds.")
@click.option("--top", type=click.IntRange(1), default=200, show_default=True,
              help="Rows of each ranking shown in the HTML report (the CSVs hold every row).")
@click.option("--features", type=click.Path(),
              help="Where image INPUTs' vectors are written (default OUT/features.npy, and OUT/val-features.npy "
                   "for --val images; folders with --engine ray): audit them again without embedding.")
@recipe_options(vector=True, inputs=True, top=False)
@output_run_options
@run_options
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.pass_context
def audit(ctx, inputs, output, labels, folders, root, split_column, val, k, threshold, probabilities, seed, top,
          features, recipe, resume, overwrite, engine, address, gpus_per_worker, part_size, files_from, null, quiet,
          opts, device):
    """Look at a collection: outliers and near-duplicates; with labels, likely mislabels and leaks.

    INPUT is images (a folder of class folders, image files with --labels,
    tar shards, URLs), embedded first as `embed` would (into OUT/features.npy,
    resumable with --resume), or an embedding output (.npy, .npz, .parquet,
    .csv or an --engine ray folder) read as it was made; several are audited
    as one collection. Writes CSVs into OUT (outliers, duplicates; with labels
    also label_issues, class_outliers, cross_class_duplicates, classes,
    confused_classes, and leaks with --split or --val) and a browsable report,
    OUT/report/index.html. Each CSV row names the image, its score, its given
    and suggested label and its nearest neighbours.

    \b
    Examples:
      vggembed audit photos/ --folders -o audit/
      vggembed audit photos/train --val photos/val --folders -o audit/
      vggembed audit feats.npy -o audit/
      vggembed audit feats.parquet --labels labels.csv --split split -o audit/
    """
    from ..store.vectors import open_vectors
    from ..use import audit as au
    from ..use.train import read_label_table

    if labels and folders:
        raise click.UsageError("give --labels FILE or --folders, not both")
    if root and not folders:
        raise click.UsageError("--root goes with --folders")
    if split_column and not labels:
        raise click.UsageError("--split names a column of the --labels file; give --labels")
    if split_column and val:
        raise click.UsageError("give the split as a --split column or as --val inputs, not both")
    if len(recipe.outputs) != 1:
        raise click.UsageError("an audit reads one set of vectors: give one --layer")
    if not inputs and not files_from:
        fail("no input: give images (a folder of class folders, files, shards, URLs) or an embedding output")
    log = (lambda line: None) if quiet else (lambda line: click.echo(f"vggembed: {line}", err=True))
    table = None
    try:
        au.check_target(output, overwrite)  # before any embedding
        if labels:
            table = read_label_table(labels, split_column)
    except VGGEmbedError as e:
        fail(str(e))
    setup = Setup(device=device, verbose=ctx.obj["verbose"])
    sources, val_sources, failed = embed_first(
        ctx, inputs, val, feature_places(os.path.join(output, ""), features, engine), recipe, resume, overwrite,
        engine, address, gpus_per_worker, part_size, files_from, null, quiet, opts, setup)
    layer = recipe.outputs[0].name if ctx.get_parameter_source("layers") != click.core.ParameterSource.DEFAULT \
        else None
    # --folders: images given as one folder have their classes in its subfolders; outputs, where their paths meet
    roots = [root or _folder_of(inputs, files_from, sources)] * len(sources) + \
        [root or _folder_of(val, None, val_sources)] * len(val_sources)
    opened = []
    try:
        for name in sources + val_sources:
            opened.append(open_vectors(name, layer=layer))
        lost = [v for v in opened if v.failed]
        if lost:
            count = sum(v.failed for v in lost)
            log(f"note: {count} image{'s' * (count != 1)} failed when embedded and {'are' if count != 1 else 'is'} "
                f"not audited (listed in {', '.join(errors_listing(v.source) for v in lost)})")
        rows = au.Rows(opened)
        paths = rows.paths
        given = split = None
        if val_sources:
            train_rows = sum(v.rows for v in opened[: len(sources)])
            split = ["train"] * train_rows + ["val"] * (rows.rows - train_rows)
        if table is not None:
            given, from_file = au.given_labels(paths, table)
            split = from_file if split_column else split
            unmatched = sum(lab is None for lab in given)
            if unmatched == len(given):
                raise VGGEmbedError(f"{display(labels)}: names none of the {len(given)} images of the INPUT (its "
                                    "paths must be the recorded ones, or the same files)")
            if unmatched:
                log(f"note: {unmatched} of {len(given)} images have no label in {display(labels)}")
        elif folders:
            given = [lab for v, top_folder in zip(opened, roots)
                     for lab in au.folder_labels(v.paths, top_folder, display(str(v.source)))]
        result = au.audit(rows, labels=given, split=split, k=k, threshold=threshold, probabilities=probabilities,
                          seed=seed, log=log)
        named = list(inputs) + ([files_from] if files_from else []) + list(val)
        written, report = au.write(result, output, source=", ".join(map(os.fsdecode, named)), overwrite=overwrite,
                                   top=top)
    except VGGEmbedError as e:
        fail(str(e))
    finally:
        for v in opened:
            v.close()
    issues = sum(1 for x in result.issues if x.suggested != x.given)
    parts = [f"{len(result.groups)} near-duplicate groups"]
    if result.given is not None:
        parts.append(f"{issues} likely label issues")
    if "leaks.csv" in written:
        parts.append(f"{len(au.tables(result)['leaks.csv'][1])} leaked pairs across the split")
    log(f"audited {rows.rows} images: {'; '.join(parts)}; wrote {len(written)} CSVs and "
        f"{Path(output) / 'report' / 'index.html'} ({report.made} thumbnails made, {report.reused} reused"
        + (f", {report.failed} unreadable" if report.failed else "") + ")")
    ctx.exit(EXIT_SOME_FAILED if failed else 0)


def _folder_of(given, listing, read) -> str | None:
    """The folder whose subfolders are the classes, where the images were given as one folder (local or a URL)
    and embedded; None (found from the recorded paths) otherwise."""
    from ..images.sources import is_image_name, is_shard, is_url

    if listing or len(given) != 1 or list(read) == list(given):
        return None
    name = os.fsdecode(given[0])
    if is_url(name):
        return None if is_shard(name) or is_image_name(name.rsplit("/", 1)[-1]) else name.rstrip("/")
    return str(Path(name)) if os.path.isdir(name) else None  # as the listing names its images
