"""Contact sheets for search hits, near-duplicate groups and clusters, drawn with Pillow.

A sheet is rows of tiles. Each tile is a thumbnail fitted into a square box
(aspect kept, centred on white) with two label lines under it: what it is
(rank and score, group, cluster and distance) and the file's name.
Thumbnails go through the same decoder as embedding (`decode.load_rgb`:
EXIF rotation, CMYK, 16-bit); a missing or unreadable file becomes a grey
tile with its name and the reason, never an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..errors import ImageError, display
from ..images.decode import load_rgb
from .pictures import _font

GAP = 6
LINE = 14  # one label line
LABEL_HEIGHT = 2 * LINE + 2
MISSING = (128, 128, 128)
MAX_ROWS = 100  # rows drawn at most; a sheet of every group of a large collection would be unviewable


@dataclass(frozen=True)
class Tile:
    path: str | None  # None: nothing to show (a query given as a vector)
    caption: str
    name: str | None = None  # defaults to the path's file name


def sheet_geometry(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """Pixel size of a sheet of `rows` x `cols` tiles of `tile` pixels."""
    return GAP + cols * (tile + GAP), GAP + rows * (tile + LABEL_HEIGHT + GAP)


def tile_box(row: int, col: int, tile: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the picture box of one tile; its label lies below."""
    x, y = GAP + col * (tile + GAP), GAP + row * (tile + LABEL_HEIGHT + GAP)
    return x, y, x + tile, y + tile


def contact_sheet(rows: list[list[Tile]], tile: int = 128) -> Image.Image:
    """Draw rows of tiles (rows may differ in length; the sheet is as wide as the longest)."""
    cols = max((len(r) for r in rows), default=0)
    sheet = Image.new("RGB", sheet_geometry(len(rows), max(cols, 1), tile), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            left, top, right, bottom = tile_box(r, c, tile)
            thumb, problem = _thumbnail(t.path, tile)
            if thumb is None:
                draw.rectangle([left, top, right - 1, bottom - 1], fill=MISSING)
                draw.text((left + 4, top + 4), _fit(draw, problem, font, tile - 8), fill="white", font=font)
            else:
                sheet.paste(thumb, (left + (tile - thumb.width) // 2, top + (tile - thumb.height) // 2))
            name = t.name if t.name is not None else display(os.path.basename(t.path or "") or (t.path or ""))
            draw.text((left, bottom + 1), _fit(draw, t.caption, font, tile), fill="black", font=font)
            draw.text((left, bottom + 1 + LINE), _fit(draw, name, font, tile), fill=(60, 60, 60), font=font)
    return sheet


def _thumbnail(path: str | None, tile: int) -> tuple[Image.Image | None, str]:
    if path is None:
        return None, "no image"
    try:
        img = load_rgb(path, draft=(tile, tile))
    except ImageError as e:
        return None, e.problem
    img.thumbnail((tile, tile), Image.BILINEAR)
    return img, ""


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """The text, cut at the front with '...' until it fits `width` pixels (a name's end says most)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


# ------------------------------------------------------------ the three kinds
def search_rows(hits, query_paths: dict[str, str | None] | None = None) -> list[list[Tile]]:
    """One row per query: the query, then its hits with rank and score.

    Args:
        hits: `explore.Hit`s in query order.
        query_paths: the image to show for a query name (default: the name itself is its path).
    """
    query_paths = query_paths or {}
    rows: dict[str, list[Tile]] = {}
    for h in hits:
        if h.query not in rows:
            rows[h.query] = [Tile(query_paths.get(h.query, h.query), "query")]
        rows[h.query].append(Tile(h.path, f"#{h.rank}  {h.score:.4f}"))
    for q, p in query_paths.items():
        rows.setdefault(q, [Tile(p, "query")])  # a query without hits still has its row
    return list(rows.values())


def dedup_rows(groups, max_cols: int = 8) -> list[list[Tile]]:
    """One row per group: its first `max_cols` members with their score to the first."""
    return [[Tile(m.path, f"g{m.group}  {m.score:.4f}") for m in g[:max_cols]] for g in groups]


def cluster_rows(assignments, per_cluster: int = 8) -> list[list[Tile]]:
    """One row per cluster: the members nearest its centre (ties: earlier row first)."""
    by_cluster: dict[int, list] = {}
    for a in assignments:
        by_cluster.setdefault(a.cluster, []).append(a)
    rows = []
    for c in sorted(by_cluster):
        nearest = sorted(by_cluster[c], key=lambda a: (a.distance, a.row))[:per_cluster]
        rows.append([Tile(a.path, f"c{c}  d={a.distance:.3f}") for a in nearest])
    return rows


def save(rows: list[list[Tile]], out, tile: int = 128, max_rows: int = MAX_ROWS) -> int:
    """Draw at most `max_rows` rows into `out` (format from its extension); returns the rows drawn."""
    rows = rows[:max_rows]
    contact_sheet(rows, tile).save(out)
    return len(rows)
