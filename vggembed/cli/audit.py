"""`vggembed audit`: outliers, near-duplicates, and with labels likely mislabels, leaks and class counts."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import VGGEmbedError, display
from ..use import DEFAULT_THRESHOLD
from .common import CONTEXT, fail
from .search import IndexPath, layer_option, overwrite_option


@click.command(context_settings=CONTEXT)
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True, type=IndexPath())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the CSVs and the HTML report (OUT/report/index.html).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="Labels: a CSV of path,label (UTF-8; a header line naming path and label may come first, "
                   "other columns are ignored) or a Parquet file with path and label columns.")
@click.option("--folders", is_flag=True,
              help="Labels from class folders: each image's class is the first folder under the folder its "
                   "INPUT was embedded from (the folder the recorded paths share), or under --root.")
@click.option("--root", metavar="DIR", help="With --folders: the folder whose subfolders are the classes.")
@click.option("--split", "split_column", metavar="COLUMN",
              help="A column of the --labels file naming each image's split (train, val, ...): near-duplicates "
                   "across splits are reported as leaks.")
@click.option("--val", multiple=True, type=IndexPath(),
              help="An embedding output of the validation images (repeatable): the INPUTs are the training "
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
@layer_option
@overwrite_option
def audit(inputs, output, labels, folders, root, split_column, val, k, threshold, probabilities, seed, top, layer,
          overwrite):
    """Look at a collection: outliers and near-duplicates; with labels, likely mislabels and leaks.

    INPUT is an embedding output (.npy, .npz, .parquet, .csv or an --engine
    ray folder); several are audited as one collection. Writes CSVs into OUT
    (outliers, duplicates; with labels also label_issues, class_outliers,
    cross_class_duplicates, classes, confused_classes, and leaks with --split
    or --val) and a browsable report, OUT/report/index.html. Each CSV row
    names the image, its score, its given and suggested label and its
    nearest neighbours.

    \b
    Examples:
      vggembed audit feats.npy -o audit/
      vggembed audit feats.npy --folders -o audit/
      vggembed audit feats.parquet --labels labels.csv --split split -o audit/
      vggembed audit train.npy --val val.npy --folders -o audit/
    """
    from ..store.vectors import open_vectors
    from ..use import audit as au

    if labels and folders:
        raise click.UsageError("give --labels FILE or --folders, not both")
    if root and not folders:
        raise click.UsageError("--root goes with --folders")
    if split_column and not labels:
        raise click.UsageError("--split names a column of the --labels file; give --labels")
    if split_column and val:
        raise click.UsageError("give the split as a --split column or as --val outputs, not both")
    opened = []
    try:
        au.check_target(output, overwrite)
        for name in list(inputs) + list(val):
            opened.append(open_vectors(name, layer=layer))
        rows = au.Rows(opened)
        paths = rows.paths
        given = split = None
        if val:
            train_rows = sum(v.rows for v in opened[: len(inputs)])
            split = ["train"] * train_rows + ["val"] * (rows.rows - train_rows)
        if labels:
            given, from_file = au.match_labels(paths, au.read_label_file(labels, split_column))
            split = from_file if split_column else split
            unmatched = sum(lab is None for lab in given)
            if unmatched == len(given):
                raise VGGEmbedError(f"{display(labels)}: names none of the {len(given)} images of the INPUT (its "
                                    "paths must be the recorded ones, or the same files)")
            if unmatched:
                click.echo(f"vggembed: note: {unmatched} of {len(given)} images have no label in "
                           f"{display(labels)}", err=True)
        elif folders:
            given = [lab for v in opened for lab in au.folder_labels(v.paths, root, display(str(v.source)))]
        result = au.audit(rows, labels=given, split=split, k=k, threshold=threshold, probabilities=probabilities,
                          seed=seed, log=lambda line: click.echo(f"vggembed: {line}", err=True))
        written, report = au.write(result, output, source=", ".join(map(str, list(inputs) + list(val))),
                                   overwrite=overwrite, top=top)
    except VGGEmbedError as e:
        fail(str(e))
    finally:
        for v in opened:
            v.close()
    issues = sum(1 for x in result.issues if x.suggested != x.given)
    leaks = [p for p in ("leaks.csv",) if p in written]
    parts = [f"{len(result.groups)} near-duplicate groups"]
    if result.given is not None:
        parts.append(f"{issues} likely label issues")
    if leaks:
        t = au.tables(result)["leaks.csv"][1]
        parts.append(f"{len(t)} leaked pairs across the split")
    click.echo(f"vggembed: audited {rows.rows} images: {'; '.join(parts)}; wrote {len(written)} CSVs and "
               f"{Path(output) / 'report' / 'index.html'} ({report.made} thumbnails made, {report.reused} reused"
               + (f", {report.failed} unreadable" if report.failed else "") + ")", err=True)
