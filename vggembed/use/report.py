"""Browsable HTML reports: a static folder (index.html + thumbnails) that opens offline by double click.

A report is a `Report` of one or more `View`s (tabs), each a list of
`Section`s (a duplicate group, a cluster, a query with its hits, an audit
issue) holding `Tile`s (one image each), or a small table. `write` turns it
into a folder:

- `index.html`: the page, with every row of the report inline as JSON in a
  `<script type="application/json">` (a page opened from `file://` cannot
  fetch a file beside it). The JSON has every `<`, `>` and `&` escaped, so
  no name can close the script element; names are shown with
  `textContent`, never parsed as HTML; bytes that are not UTF-8 show as
  `\\xNN` (`errors.display`). The page renders one page of rows at a time
  from that data (filtering and sorting run on the data, not the DOM), so a
  report of 100,000 images opens about as fast as one of 100;
- `t/xx/HASH.jpg`: one small JPEG per image, made once in parallel threads
  and `loading="lazy"`; the name is a hash of the image's path, size,
  modification time and the thumbnail size, so a report written over an
  older one (`overwrite=True`) takes the thumbnails whose image has not
  changed from it instead of decoding again. An image that cannot be
  decoded shows a grey placeholder with the reason;
- `report.json`: what made the folder (the marker that lets `overwrite`
  replace it; any other existing folder is refused).

The folder is written under a temporary sibling name and renamed into place
only when complete, so a failed run (a full or read-only disk, an
interrupt) never leaves a half report under the asked name; every OSError
while writing is one `OutputError` line (`store.destination`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import html
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ..errors import ImageError, VGGEmbedError, display, reason
from ..images.sources import is_url
from ..store.destination import Destination, OutputError

THUMB = 160  # pixels, the longer side of a thumbnail
QUALITY = 80  # JPEG quality of thumbnails
MARKER = "report.json"
FORMAT = 1  # of report.json; thumbnails of another format are not reused
TILES_SHOWN = 24  # tiles of a section shown before its "show all" button (set in the page)


@dataclass
class Tile:
    """One image: its path as recorded (None: nothing to show, e.g. a query given as a vector)."""

    path: str | None
    value: float | None = None  # a score, cosine or distance, shown under the thumbnail
    label: str | None = None
    note: str | None = None  # one more line (a suggested label, "query")


@dataclass
class Section:
    """One row of a view: a group, a cluster, a query and its hits, an issue."""

    title: str
    tiles: list[Tile]
    score: float | None = None  # what the score filter and sorting use
    label: str | None = None
    detail: str | None = None  # a line under the title


@dataclass
class View:
    """A tab of the report: sections, or a table (header, rows) when `table` is given."""

    name: str
    sections: list[Section] = field(default_factory=list)
    what: str = "rows"  # what a section is, plural ("groups", "clusters", "queries")
    value: str = "score"  # what a tile's value is ("cosine to the first", "distance")
    score: str = "score"  # what a section's score is, for the filter and sorting
    sorts: tuple[str, ...] = ("order", "score-desc", "score-asc", "size-desc")
    narrow: bool = False  # a name or label filter shows only the matching tiles of a section (clusters)
    note: str = ""
    table: tuple[list[str], list[list]] | None = None


@dataclass
class Report:
    title: str
    views: list[View]
    summary: str = ""
    kind: str = "report"


@dataclass
class Written:
    """What `write` did: images in the report, thumbnails made, reused from the old report, failed."""

    out: Path
    images: int
    made: int
    reused: int
    failed: int


# ------------------------------------------------------------------- text
def text(s) -> str | None:
    """Any name or label as text JSON can hold: bytes that are not UTF-8 (surrogate escapes) as \\xNN."""
    if s is None:
        return None
    s = str(s)
    try:
        return display(s)
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def script_json(data) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' (so never '</script>' or '<!--')."""
    s = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _number(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return round(v, 6) if v == v and abs(v) != float("inf") else None


# ------------------------------------------------------------ thumbnails
@dataclass
class _Image:
    path: str
    key: str  # the thumbnail's file stem ("" while not known)
    local: Path | None  # the file on this machine (None for a URL)
    error: str | None = None


def _key(path: str, size: int) -> tuple[str, Path | None]:
    """The thumbnail's name: a hash of where the image is, its size and mtime (a changed file gets a new one)."""
    h = hashlib.sha1(f"{FORMAT}:{size}:".encode())
    if is_url(path) and not path.startswith("file://"):
        h.update(path.encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:20], None
    local = Path(path[len("file://"):] if path.startswith("file://") else path)
    try:
        local = local.absolute()
        st = os.stat(local)
        h.update(os.fsencode(local) + f":{st.st_size}:{st.st_mtime_ns}".encode())
    except (OSError, ValueError):
        h.update(os.fsencode(str(local)) + b":missing")
    return h.hexdigest()[:20], local


def _rel(key: str) -> str:
    return f"t/{key[:2]}/{key}.jpg"


def _make_thumb(img: _Image, tmp: Path, old: Path | None, size: int) -> str:
    """Write one thumbnail into tmp; 'reused', 'made' or 'failed' (img.error set). Reading problems are the
    image's; OSErrors while writing propagate (the report's own failure)."""
    from PIL import Image

    from ..images.decode import load_rgb

    target = tmp / _rel(img.key)
    if old is not None:
        before = old / _rel(img.key)
        if before.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(before, target)
            except OSError:
                shutil.copyfile(before, target)
            return "reused"
    try:
        picture = load_rgb(img.path, draft=(size, size))
        picture.thumbnail((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        picture.save(buf, "JPEG", quality=QUALITY, optimize=True)
    except ImageError as e:
        img.error = e.problem
        return "failed"
    except (OSError, ValueError, MemoryError) as e:  # a decoder's own failure on a strange file
        img.error = reason(e)
        return "failed"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buf.getvalue())
    return "made"


def _href(path: str, local: Path | None) -> str | None:
    """Where a thumbnail links: the image itself (a file:// URI, or an http(s) URL; no other scheme)."""
    if local is not None:
        return local.as_uri() if local.is_absolute() else None
    return path if path.startswith(("http://", "https://")) else None


# ----------------------------------------------------------------- write
def _is_report(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text("utf-8")).get("vggembed_report") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write(report: Report, out, *, overwrite: bool = False, thumb: int = THUMB, workers: int | None = None
          ) -> Written:
    """Write `report` as the folder `out` (index.html, thumbnails, report.json).

    An existing `out` is replaced only with `overwrite` and only if it is a
    report (any other folder or file is refused); its thumbnails of unchanged
    images are reused. Raises `OutputError` (one line) for any problem of the
    place, before or while writing.
    """
    out = Path(out)
    check_target(out, overwrite)
    tmp = out.with_name(out.name + ".partial")
    with Destination(out) as dest, dest.writing():
        if tmp.exists():
            shutil.rmtree(tmp)  # a leftover of a run that was killed
        tmp.mkdir()
        try:
            written = _fill(report, tmp, out if out.is_dir() else None, thumb, workers)
            _swap(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
            raise
    written.out = out
    return written


def _swap(tmp: Path, out: Path) -> None:
    """Rename the finished folder onto `out` (the old one, if any, moved aside and removed)."""
    if out.exists():
        aside = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, aside)
        os.replace(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _fill(report: Report, tmp: Path, old: Path | None, size: int, workers: int | None) -> Written:
    images: dict[str, _Image] = {}
    for view in report.views:
        for s in view.sections:
            for t in s.tiles:
                if t.path is not None and t.path not in images:
                    images[t.path] = _Image(t.path, *_key(t.path, size))
    counts = {"made": 0, "reused": 0, "failed": 0}
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    todo = list(images.values())
    with cf.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_make_thumb, img, tmp, old, size) for img in todo]
        try:
            for f in cf.as_completed(futures):
                counts[f.result()] += 1
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    write_page(report, images, tmp)
    (tmp / MARKER).write_text(json.dumps({"vggembed_report": FORMAT, "kind": report.kind, "thumb": size,
                                          "images": len(images), "failed": counts["failed"]}) + "\n", "utf-8")
    return Written(tmp, len(images), counts["made"], counts["reused"], counts["failed"])


def write_page(report: Report, images: dict[str, _Image], folder: Path) -> None:
    """index.html of `report` into `folder`; `images` maps each tile's path to its thumbnail (or error)."""
    page = PAGE.replace("%TITLE%", html.escape(text(report.title) or "")).replace(
        "%DATA%", script_json(_data(report, images)))
    (folder / "index.html").write_text(page, "utf-8")


def _data(report: Report, images: dict[str, _Image]) -> dict:
    """The page's data: files once each (folder table + base name), views of sections of members."""
    dirs: dict[str, int] = {}
    dir_rows: list[list] = []
    files: dict[str, int] = {}
    file_rows: list[list] = []

    def file_index(path: str) -> int:
        if path in files:
            return files[path]
        img = images[path]
        name = text(path)
        cut = name.rfind("/") + 1
        folder, base = name[:cut], name[cut:]
        href = _href(path, img.local)
        uri_dir = None
        if href is not None and href.startswith("file://"):
            uri_dir = href[: href.rfind("/") + 1]
        if folder not in dirs:
            dirs[folder] = len(dir_rows)
            dir_rows.append([folder, uri_dir])
        d = dirs[folder]
        row: list = [d, base, img.key if img.error is None else "", img.error]
        # the page links dir URI + encodeURIComponent(base); give the link when that would differ
        if href is not None and (dir_rows[d][1] is None or dir_rows[d][1] + quote(base, safe="!*'()") != href):
            row.append(href)
        files[path] = len(file_rows)
        file_rows.append(row)
        return files[path]

    views = []
    for view in report.views:
        v: dict = {"name": text(view.name), "what": view.what, "value": view.value, "score": view.score,
                   "sorts": list(view.sorts), "narrow": view.narrow, "note": text(view.note)}
        if view.table is not None:
            header, rows = view.table
            v["table"] = [[text(h) for h in header],
                          [[c if isinstance(c, (int, float)) and not isinstance(c, bool) else text(c) for c in r]
                           for r in rows]]
        else:
            sections = []
            for s in view.sections:
                members = []
                for t in s.tiles:
                    m = [file_index(t.path) if t.path is not None else None, _number(t.value), text(t.label),
                         text(t.note)]
                    while len(m) > 1 and m[-1] is None:
                        m.pop()
                    members.append(m)
                sec: dict = {"t": text(s.title), "m": members}
                if _number(s.score) is not None:
                    sec["s"] = _number(s.score)
                if s.label is not None:
                    sec["l"] = text(s.label)
                if s.detail:
                    sec["d"] = text(s.detail)
                sections.append(sec)
            v["sections"] = sections
            v["labels"] = any("l" in sec or any(len(m) > 2 and m[2] is not None for m in sec["m"])
                              for sec in sections)
        views.append(v)
    return {"title": text(report.title), "summary": text(report.summary), "dirs": dir_rows, "files": file_rows,
            "views": views, "tiles": TILES_SHOWN}


# ------------------------------------------------------- the three kinds
def dedup_report(groups, *, source: str, threshold: float, images: int) -> Report:
    """One section per near-duplicate group; a section's score is its lowest cosine to the first member."""
    sections = [Section(f"group {g[0].group}: {len(g)} images", [Tile(m.path, m.score) for m in g],
                        score=min(m.score for m in g)) for g in groups]
    redundant = sum(len(g) - 1 for g in groups)
    return Report(f"Near-duplicates in {text(source)}", [View(
        "Near-duplicate groups", sections, what="groups", value="cosine to the first", score="lowest cosine",
        note="Each group: images whose cosine to another member is at or above the threshold; the score under "
             "a picture is its cosine to the group's first member.")],
        summary=f"{len(groups)} groups of near-duplicates (cosine >= {threshold:g}) among {images} images; "
                f"{redundant} redundant", kind="dedup")


def cluster_report(assignments, *, source: str, k: int) -> Report:
    """One section per cluster, members nearest its centre first; the score is the cluster's size."""
    by_cluster: dict[int, list] = {}
    for a in assignments:
        by_cluster.setdefault(a.cluster, []).append(a)
    sections = []
    for c in sorted(by_cluster):
        members = sorted(by_cluster[c], key=lambda a: (a.distance, a.row))
        sections.append(Section(f"cluster {c}: {len(members)} images", [Tile(a.path, a.distance) for a in members],
                                score=len(members)))
    return Report(f"Clusters of {text(source)}", [View(
        "Clusters", sections, what="clusters", value="distance to the centre", score="size",
        sorts=("order", "size-desc", "size-asc"), narrow=True,
        note="Members nearest the cluster's centre first; the number under a picture is its distance to the "
             "centre (unit-length vectors).")],
        summary=f"{len(assignments)} images in {k} clusters", kind="cluster")


def search_report(hits, failed, *, source: str, query_paths: dict[str, str | None]) -> Report:
    """One section per query: the query's image, then its hits with their cosine; the score is the best hit's."""
    by_query: dict[str, list] = {q: [] for q in query_paths}
    for h in hits:
        by_query.setdefault(h.query, []).append(h)
    sections = []
    for q, found in by_query.items():
        tiles = [Tile(query_paths.get(q, q), None, note="query")] + [Tile(h.path, h.score, note=f"#{h.rank}")
                                                                    for h in found]
        sections.append(Section(f"{text(q)}: {len(found)} hits", tiles,
                                score=found[0].score if found else None))
    for q, problem in failed:
        sections.append(Section(f"{text(q)}: failed", [Tile(q, note="query")], detail=text(problem)))
    return Report(f"Search in {text(source)}", [View(
        "Queries", sections, what="queries", value="cosine", score="best cosine",
        note="Each query's image first, then its hits, best first.")],
        summary=f"{len(hits)} hits for {len(query_paths)} queries"
                + (f"; {len(failed)} query images failed" if failed else ""), kind="search")


def check_target(out, overwrite: bool) -> None:
    """Refuse early (before any work) a report folder that cannot be written: exists without overwrite,
    or is not a report."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(out, "exists; pass --overwrite to replace it")
        if not out.is_dir() or not _is_report(out):
            raise OutputError(out, "exists and is not a vggembed report; will not replace it")


__all__ = ["Report", "View", "Section", "Tile", "Written", "write", "dedup_report", "cluster_report",
           "search_report", "check_target", "VGGEmbedError"]


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>%TITLE%</title>
<style>
:root { --tile: 160px; --fg: #1d1d1f; --muted: #5f6368; --line: #dadce0; --bg: #fff; --miss: #8a8a8a; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { position: sticky; top: 0; z-index: 2; background: var(--bg); border-bottom: 1px solid var(--line);
         padding: 8px 16px; }
h1 { font-size: 18px; margin: 0 0 2px; overflow-wrap: anywhere; }
#summary, #note, #count { color: var(--muted); margin: 2px 0; }
#tabs button { margin: 4px 4px 4px 0; }
#tabs button[aria-selected="true"] { font-weight: bold; border-color: var(--fg); }
#controls { display: flex; flex-wrap: wrap; gap: 6px 12px; align-items: center; margin: 6px 0 2px; }
#controls input, #controls select, button { font: inherit; padding: 4px 8px; border: 1px solid var(--line);
         border-radius: 6px; background: #fff; color: inherit; }
#q { min-width: 14em; flex: 1 1 14em; }
#min { width: 6em; }
main { padding: 4px 16px 16px; }
section { border-bottom: 1px solid var(--line); padding: 10px 0; }
h2 { font-size: 15px; margin: 0 0 6px; overflow-wrap: anywhere; white-space: pre-wrap; }
.detail { color: var(--muted); margin: 0 0 6px; overflow-wrap: anywhere; white-space: pre-wrap; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: var(--tile); }
.box { width: var(--tile); height: var(--tile); display: flex; align-items: center; justify-content: center;
       background: #f3f3f3; border-radius: 4px; overflow: hidden; }
.box img { max-width: 100%; max-height: 100%; display: block; }
.missing { background: var(--miss); color: #fff; font-size: 12px; padding: 6px; overflow-wrap: anywhere;
           overflow: auto; align-items: flex-start; justify-content: flex-start; white-space: pre-wrap; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
figcaption .v { font-variant-numeric: tabular-nums; font-weight: 600; }
figcaption .n { color: var(--muted); display: block; white-space: pre-wrap; max-height: 3.6em; overflow: hidden; }
figcaption .l { display: inline-block; background: #e8f0fe; border-radius: 4px; padding: 0 4px; margin-top: 2px; }
figcaption .o { display: inline-block; background: #fce8e6; border-radius: 4px; padding: 0 4px; margin-top: 2px; }
.more { margin-top: 8px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#pager { display: flex; gap: 8px; align-items: center; justify-content: center; padding: 12px; }
@media (max-width: 600px) {
  :root { --tile: calc((100vw - 32px - 20px) / 3); }
  header { position: static; padding: 8px; }
  main { padding: 4px 8px 8px; }
  .grid { gap: 8px 10px; }
  h1 { font-size: 16px; }
}
</style>
</head>
<body>
<header>
<h1 id="title"></h1>
<p id="summary"></p>
<nav id="tabs" role="tablist"></nav>
<p id="note"></p>
<div id="controls">
<input id="q" type="search" placeholder="Filter by name" aria-label="Filter by name">
<input id="label" type="search" placeholder="Label" aria-label="Filter by label">
<label id="minbox">score &ge; <input id="min" type="number" step="any" aria-label="Lowest score"></label>
<select id="sort" aria-label="Sort"></select>
</div>
<p id="count"></p>
</header>
<main id="rows"></main>
<nav id="pager"><button id="prev" type="button">&lsaquo; Previous</button><span id="page"></span>
<button id="next" type="button">Next &rsaquo;</button></nav>
<script type="application/json" id="data">%DATA%</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const PER = 50, MORE = 200;
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, txt) => { const e = document.createElement(tag); if (cls) e.className = cls;
    if (txt !== undefined && txt !== null) e.textContent = txt; return e; };
  const SORTS = {"order": "input order", "score-desc": "score, highest first", "score-asc": "score, lowest first",
                 "size-desc": "largest first", "size-asc": "smallest first"};
  const fmt = (v) => v === null || v === undefined ? "" : (Number.isInteger(v) ? String(v) : v.toFixed(4));
  const name = (i) => D.dirs[D.files[i][0]][0] + D.files[i][1];
  const low = (s) => (s || "").toLowerCase();
  let vi = 0, page = 0, shown = [], keep = null, applied = 0;

  function href(i) {
    const f = D.files[i];
    if (f.length > 4) return f[4];
    const d = D.dirs[f[0]][1];
    return d === null ? null : d + encodeURIComponent(f[1]);
  }

  function tile(m, v) {
    const fig = el("figure");
    const i = m[0];
    const f = (i === null || i === undefined) ? null : D.files[i];
    let box;
    if (f && f[2]) {
      const img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = name(i);
      img.src = "t/" + f[2].slice(0, 2) + "/" + f[2] + ".jpg";
      const link = href(i);
      box = el(link ? "a" : "div", "box");
      if (link) { box.href = link; box.title = name(i); }
      box.append(img);
    } else {
      box = el("div", "box missing", f ? (f[3] || "no image") : "no image");
      if (f) box.title = name(i) + ": " + (f[3] || "no image");
    }
    fig.append(box);
    const cap = el("figcaption");
    if (m[3]) cap.append(el("span", "v o", m[3]), " ");
    if (m[1] !== null && m[1] !== undefined) { const s = el("span", "v", fmt(m[1])); s.title = v.value; cap.append(s); }
    if (f) { const n = el("span", "n", f[1]); n.title = name(i); cap.append(n); }
    if (m[2]) cap.append(el("span", "l", m[2]));
    fig.append(cap);
    return fig;
  }

  function addTiles(grid, members, from, to, v) {
    const frag = document.createDocumentFragment();
    for (let j = from; j < Math.min(to, members.length); j++) frag.append(tile(members[j], v));
    grid.append(frag);
  }

  function section(s, v) {
    const sec = el("section");
    sec.append(el("h2", null, s.t));
    if (s.d) sec.append(el("p", "detail", s.d));
    const members = (keep && v.narrow) ? s.m.filter(keep) : s.m;
    const grid = el("div", "grid");
    sec.append(grid);
    let n = Math.min(D.tiles, members.length);
    addTiles(grid, members, 0, n, v);
    if (members.length > n) {
      const b = el("button", "more", "");
      const label = () => { b.textContent = "Show " + Math.min(MORE, members.length - n) + " more of "
                                           + members.length; };
      label();
      b.type = "button";
      b.addEventListener("click", () => { addTiles(grid, members, n, n + MORE, v); n += MORE;
        if (n >= members.length) b.remove(); else label(); });
      sec.append(b);
    }
    return sec;
  }

  function table(t) {
    const tb = el("table"), head = el("tr");
    for (const h of t[0]) head.append(el("th", null, h));
    tb.append(head);
    for (const r of t[1]) {
      const tr = el("tr");
      for (const c of r) tr.append(el("td", typeof c === "number" ? "num" : null, typeof c === "number" ? fmt(c) : c));
      tb.append(tr);
    }
    return tb;
  }

  function keys(v) {
    if (v._names) return;
    v._names = v.sections.map((s) => low(s.t) + "\n" + s.m.map((m) => m[0] === null || m[0] === undefined ? ""
                                                         : low(name(m[0]))).join("\n"));
    v._labels = v.sections.map((s) => low(s.l) + "\n" + s.m.map((m) => low(m[2]) + "\n" + low(m[3])).join("\n"));
  }

  function apply() {
    const v = D.views[vi];
    if (v.table) { shown = []; render(); return; }
    const q = low($("q").value.trim()), lab = low($("label").value.trim());
    const minText = $("min").value.trim(), min = minText === "" ? null : Number(minText);
    const sort = $("sort").value;
    let idx = v.sections.map((_, i) => i);
    keep = null;
    if (q || lab) {
      keys(v);
      idx = idx.filter((i) => (!q || v._names[i].includes(q)) && (!lab || v._labels[i].includes(lab)));
      keep = (m) => (!q || (m[0] !== null && m[0] !== undefined && low(name(m[0])).includes(q)))
                    && (!lab || low(m[2]).includes(lab) || low(m[3]).includes(lab));
    }
    if (min !== null && !Number.isNaN(min)) idx = idx.filter((i) => v.sections[i].s !== undefined
                                                                   && v.sections[i].s >= min);
    const sc = (i) => v.sections[i].s === undefined ? -Infinity : v.sections[i].s;
    if (sort === "score-desc") idx.sort((a, b) => sc(b) - sc(a) || a - b);
    else if (sort === "score-asc") idx.sort((a, b) => sc(a) - sc(b) || a - b);
    else if (sort === "size-desc") idx.sort((a, b) => v.sections[b].m.length - v.sections[a].m.length || a - b);
    else if (sort === "size-asc") idx.sort((a, b) => v.sections[a].m.length - v.sections[b].m.length || a - b);
    shown = idx;
    page = 0;
    render();
    document.body.dataset.applied = String(++applied);  // for tests: the filter has been applied
  }

  function render() {
    const v = D.views[vi], main = $("rows");
    main.textContent = "";
    $("note").textContent = v.note || "";
    const isTable = !!v.table;
    $("controls").hidden = isTable;
    $("pager").hidden = isTable;
    if (isTable) { main.append(table(v.table)); $("count").textContent = v.table[1].length + " rows"; return; }
    const pages = Math.max(1, Math.ceil(shown.length / PER));
    page = Math.min(page, pages - 1);
    const from = page * PER, to = Math.min(shown.length, from + PER);
    const frag = document.createDocumentFragment();
    for (let j = from; j < to; j++) frag.append(section(v.sections[shown[j]], v));
    main.append(frag);
    const total = v.sections.length;
    $("count").textContent = (shown.length ? "Showing " + (from + 1) + "\u2013" + to + " of "
      + shown.length.toLocaleString("en") + " " : "No ") + v.what
      + (shown.length < total ? " (filtered from " + total.toLocaleString("en") + ")" : "");
    $("page").textContent = "page " + (page + 1) + " of " + pages;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    $("pager").hidden = pages === 1;
  }

  function show(i) {
    vi = i;
    const v = D.views[i];
    for (const [j, b] of Array.from($("tabs").children).entries()) b.setAttribute("aria-selected", String(j === i));
    const sel = $("sort");
    sel.textContent = "";
    for (const s of v.sorts || ["order"]) { const o = el("option", null, SORTS[s] || s); o.value = s; sel.append(o); }
    $("minbox").firstChild.textContent = (v.score || "score") + " \u2265 ";
    $("minbox").hidden = !!v.sorts && !v.sorts.some((s) => s.startsWith("score"));
    $("label").hidden = !v.labels;
    apply();
  }

  $("title").textContent = D.title;
  document.title = D.title;
  $("summary").textContent = D.summary || "";
  if (D.views.length > 1) D.views.forEach((v, i) => { const b = el("button", null, v.name); b.type = "button";
    b.setAttribute("role", "tab"); b.addEventListener("click", () => show(i)); $("tabs").append(b); });
  let timer = null;
  const later = () => { clearTimeout(timer); timer = setTimeout(apply, 150); };
  for (const id of ["q", "label", "min"]) $(id).addEventListener("input", later);
  $("sort").addEventListener("change", apply);
  $("prev").addEventListener("click", () => { page--; render(); window.scrollTo(0, 0); });
  $("next").addEventListener("click", () => { page++; render(); window.scrollTo(0, 0); });
  show(0);
  document.body.dataset.ready = "1";
  performance.mark("vggembed-ready");  // the first page of rows is in the document
})();
</script>
</body>
</html>
"""
