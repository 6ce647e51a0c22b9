"""`vggembed search`, `dedup` and `cluster`: answers from any embedding output (INDEX)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import click

from ..errors import VGGEmbedError, display
from ..store.destination import Destination, replacing
from ..use import DEFAULT_THRESHOLD
from .common import CONTEXT, EXIT_SOME_FAILED, fail
from .process import data_stdout


def _write_csv(output, header: list[str], rows) -> None:
    """CSV to stdout (data only) or to OUTPUT; names keep their exact bytes."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    _write(output, buf.getvalue())


def _write(output, text: str) -> None:
    """Text to stdout, or to OUTPUT, which appears under its name only when complete."""
    data = text.encode("utf-8", "surrogateescape")
    if output is None:
        stdout = data_stdout()
        stdout.flush()
        stdout.buffer.write(data)
        stdout.buffer.flush()
        return
    out = Path(output)
    with Destination(out) as dest, dest.writing(), replacing(out, ".partial") as tmp:
        tmp.write_bytes(data)


def _sheet(rows, sheet, tile, what: str) -> None:
    from ..use.sheets import MAX_ROWS, save

    out = Path(sheet)
    with Destination(out) as dest, dest.writing(), replacing(out, ".partial" + out.suffix) as tmp:
        drawn = save(rows, tmp, tile=tile)
    more = f" (the first {MAX_ROWS} of {len(rows)} {what})" if len(rows) > drawn else ""
    click.echo(f"vggembed: drew {out}: {drawn} {what}{more}", err=True)


def _check_html(html, overwrite) -> None:
    """Refuse an --html folder that cannot be written before any work is done."""
    if html:
        from ..use.report import check_target

        try:
            check_target(html, overwrite)
        except VGGEmbedError as e:
            fail(str(e))


def _html(report, html, overwrite) -> None:
    from ..use.report import write

    done = write(report, html, overwrite=overwrite)
    reused = f", {done.reused} reused" if done.reused else ""
    failed = f"; {done.failed} could not be read (shown as placeholders)" if done.failed else ""
    click.echo(f"vggembed: wrote {Path(html) / 'index.html'}: {done.images} images, {done.made} thumbnails made"
               f"{reused}{failed}", err=True)


def _note_recipe(vectors) -> None:
    if vectors.recipe is None:
        click.echo(f"vggembed: note: {display(str(vectors.source))} records no recipe (written before vggembed "
                   "recorded one): query images are embedded with --weights and the embed defaults (fc2, squash, "
                   "float32)", err=True)


def _parse_rows(value: str | None) -> list[int]:
    if not value:
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected row numbers like 0,12,40; received {value!r}", param_hint="--rows") \
            from None


class IndexPath(click.Path):
    """INDEX: an output file or folder that exists, or the URL of an --engine ray folder (read when opened)."""

    def __init__(self):
        super().__init__(exists=True)

    def convert(self, value, param, ctx):
        from ..images.sources import is_url

        return value if is_url(os.fsdecode(value)) else super().convert(value, param, ctx)


sheet_option = click.option("--sheet", type=click.Path(dir_okay=False),
                            help="Also draw a contact sheet (PNG) of the results.")
tile_option = click.option("--tile", type=click.IntRange(32, 512), default=128, show_default=True,
                           help="Thumbnail size on the sheet, pixels.")
output_option = click.option("-o", "--output", type=click.Path(dir_okay=False),
                             help="Write the CSV here instead of stdout.")
html_option = click.option("--html", "html", type=click.Path(file_okay=False),
                           help="Also write a browsable report: a folder with index.html and thumbnails that opens "
                                "offline (see docs/report.md).")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the --html report folder if it exists.")
layer_option = click.option("--layer", metavar="NAME",
                            help="Which vectors of an INDEX that holds several (embed --layer fc2 --layer "
                                 "pool5:avg): fc2, pool5_avg, ...; default the only one, or the first.")


# ------------------------------------------------------------------ search
@click.command(context_settings=CONTEXT)
@click.argument("index", type=IndexPath())
@click.argument("queries", nargs=-1)
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True, help="Hits per query.")
@click.option("--min-score", type=click.FloatRange(-1, 1), help="Leave out hits with a lower cosine.")
@click.option("--rows", "rows", help="Rows of INDEX as queries, e.g. 0,12 (their own row is left out).")
@click.option("--weights", type=click.Path(dir_okay=False),
              help="Weights for query images (default: the file whose MD5 INDEX records, in $VGGEMBED_WEIGHTS, "
                   "./weights/ or the cache). Other weights are refused.")
@click.option("--approximate", is_flag=True,
              help='Approximate search with a faiss PCA + IVF index, saved as INDEX.faiss (built anew for an INDEX '
                   'at a URL) (pip install "vggembed[ann]").')
@click.option("--nprobe", type=click.IntRange(1), default=32, show_default=True,
              help="With --approximate: lists visited per query (more: slower, better recall).")
@layer_option
@output_option
@sheet_option
@tile_option
@html_option
@overwrite_option
@click.pass_context
def search(ctx, index, queries, k, min_score, rows, weights, approximate, nprobe, layer, output, sheet, tile, html,
           overwrite):
    """The indexed images most similar to each query, by cosine.

    INDEX is a .npy, .npz, .parquet or .csv output, or an --engine ray folder (a
    path or a URL). QUERY is an image file or folder, embedded on the fly
    exactly as INDEX was made. Output (CSV): query, rank, path, score; best first, ties by row.
    A query image that cannot be decoded is reported and skipped (exit 3).

    \b
    Examples:
      vggembed search feats.npy cat.jpg -k 5
      vggembed search feats.parquet queries/ -o hits.csv --sheet hits.png
      vggembed search feats.npy --rows 0,12 --min-score 0.9
      vggembed search feats.npy queries/ --html hits-report/
    """
    from ..store.vectors import open_vectors
    from ..use.explore import search as run_search

    row_list = _parse_rows(rows)
    if not queries and not row_list:
        raise click.UsageError("no query: give query images or folders, or --rows N,M")
    _check_html(html, overwrite)
    try:
        with open_vectors(index, layer=layer) as vectors:
            if queries and weights is not None:
                _note_recipe(vectors)
            result = run_search(vectors, list(queries), rows=row_list, k=k, min_score=min_score, weights=weights,
                                approximate=approximate, nprobe=nprobe)
            _write_csv(output, ["query", "rank", "path", "score"],
                       ([h.query, h.rank, h.path, f"{h.score:.6f}"] for h in result.hits))
            if sheet:
                from ..use.sheets import search_rows

                names = list(dict.fromkeys([vectors.paths[r] for r in row_list] + [h.query for h in result.hits]))
                _sheet(search_rows(result.hits, {n: n for n in names}), sheet, tile, "queries")
            if html:
                from ..use.report import search_report

                names = list(dict.fromkeys([vectors.paths[r] for r in row_list] + [h.query for h in result.hits]))
                _html(search_report(result.hits, result.failed, source=str(index), query_paths={n: n for n in names}),
                      html, overwrite)
    except VGGEmbedError as e:
        fail(str(e))
    queried = len({h.query for h in result.hits})
    click.echo(f"vggembed: {len(result.hits)} hits for {queried} queries"
               + (f"; {len(result.failed)} query images failed" if result.failed else ""), err=True)
    ctx.exit(EXIT_SOME_FAILED if result.failed else 0)


# ------------------------------------------------------------------- dedup
@click.command(context_settings=CONTEXT)
@click.argument("index", type=IndexPath())
@click.option("--threshold", type=click.FloatRange(-1, 1), default=DEFAULT_THRESHOLD, show_default=True,
              help="Cosine at or above which two images are near-duplicates.")
@click.option("--list-redundant", is_flag=True,
              help="Print only every member but the first of each group, one path a line (for xargs).")
@click.option("--precision", type=click.Choice(["float32", "bf16"]), default="float32", show_default=True,
              help="bf16: find candidates in bfloat16 (TensorFlow; CPUs with native bf16), re-checked in float32: "
                   "the same groups, faster.")
@layer_option
@output_option
@sheet_option
@tile_option
@html_option
@overwrite_option
@click.pass_context
def dedup(ctx, index, threshold, list_redundant, precision, layer, output, sheet, tile, html, overwrite):
    """Groups of near-duplicate images: every pair with cosine >= threshold, joined.

    INDEX is a .npy, .npz, .parquet or .csv output, or an --engine ray folder (a
    path or a URL).
    Output (CSV): group, path, score (cosine to the group's first member,
    in input order). --list-redundant prints the paths a clean-up would
    remove instead: every member but the first.

    \b
    Examples:
      vggembed dedup feats.npy -o groups.csv --sheet groups.png
      vggembed dedup feats.npy --list-redundant | xargs -d '\\n' rm --
      vggembed dedup feats.npy --html groups-report/
    """
    from ..store.vectors import open_vectors
    from ..use.explore import dedup as run_dedup

    _check_html(html, overwrite)
    try:
        with open_vectors(index, layer=layer) as vectors:
            groups = run_dedup(vectors, threshold, precision=precision)
    except VGGEmbedError as e:
        fail(str(e))
    if list_redundant:
        _write(output, "".join(m.path + "\n" for g in groups for m in g[1:]))
    else:
        _write_csv(output, ["group", "path", "score"], ([m.group, m.path, f"{m.score:.6f}"] for g in groups for m in g))
    if sheet:
        from ..use.sheets import dedup_rows

        _sheet(dedup_rows(groups), sheet, tile, "groups")
    if html:
        from ..use.report import dedup_report

        try:
            _html(dedup_report(groups, source=str(index), threshold=threshold, images=vectors.rows), html, overwrite)
        except VGGEmbedError as e:
            fail(str(e))
    redundant = sum(len(g) - 1 for g in groups)
    click.echo(f"vggembed: {len(groups)} groups of near-duplicates (cosine >= {threshold:g}) among "
               f"{vectors.rows} images; {redundant} redundant", err=True)


# ----------------------------------------------------------------- cluster
@click.command(context_settings=CONTEXT)
@click.argument("index", type=IndexPath())
@click.option("-k", "k", type=click.IntRange(1), required=True, help="Number of clusters.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same clusters.")
@layer_option
@output_option
@sheet_option
@tile_option
@html_option
@overwrite_option
@click.pass_context
def cluster(ctx, index, k, seed, layer, output, sheet, tile, html, overwrite):
    """k-means clusters of the (unit-length) vectors.

    INDEX is a .npy, .npz, .parquet or .csv output, or an --engine ray folder (a
    path or a URL).
    Output (CSV), one line per image in input order: path, cluster,
    distance to the cluster's centre. Needs scikit-learn
    (pip install "vggembed[cluster]").

    \b
    Example:
      vggembed cluster feats.npy -k 20 -o clusters.csv --sheet clusters.png
      vggembed cluster feats.npy -k 20 --html clusters-report/
    """
    from ..store.vectors import open_vectors
    from ..use.explore import cluster as run_cluster

    _check_html(html, overwrite)
    try:
        with open_vectors(index, layer=layer) as vectors:
            found = run_cluster(vectors, k, seed=seed)
    except VGGEmbedError as e:
        fail(str(e))
    _write_csv(output, ["path", "cluster", "distance"], ([a.path, a.cluster, f"{a.distance:.6f}"] for a in found))
    if sheet:
        from ..use.sheets import cluster_rows

        _sheet(cluster_rows(found), sheet, tile, "clusters")
    if html:
        from ..use.report import cluster_report

        try:
            _html(cluster_report(found, source=str(index), k=k), html, overwrite)
        except VGGEmbedError as e:
            fail(str(e))
    sizes = sorted((sum(1 for a in found if a.cluster == c) for c in range(k)), reverse=True)
    click.echo(f"vggembed: {len(found)} images in {k} clusters (largest {sizes[0]}, smallest {sizes[-1]})", err=True)
