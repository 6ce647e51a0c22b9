"""How an HTML report's size and opening time grow with the collection: 100 images against 100,000.

Builds dedup reports (`vggembed.use.report`) of synthetic near-duplicate
groups (2 to 5 members, every image a distinct path, so the inline data is
as large as a real report's), whose thumbnails are the real thumbnails of a
few photos (made once by the report writer; every image points at one of
them, so the page loads real JPEGs without decoding 100,000 files). Then
opens each in headless Chromium (Debian's `chromium`, driven by
playwright), a fresh browser context per load, and prints side by side:

- page size: index.html, everything the browser reads before thumbnails;
- write: seconds to build the report data and write index.html (thumbnails
  apart);
- first paint / first contentful paint, and rows ready (the first page of
  rows in the document: the page's `vggembed-ready` mark), from navigation
  start, median of --repeat loads;
- filter: time from typing a name filter to its rows shown (median);
- thumbnails: mean size of a thumbnail made from the sample photos, and that
  times the number of images (a real report's thumbnail folder).

    python benchmarks/report.py                       # 100, 10,000 and 100,000 images
    python benchmarks/report.py --sizes 100,1000 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vggembed.use import report  # noqa: E402
from vggembed.use.explore import Member  # noqa: E402


def sample_photos() -> list[Path]:
    import matplotlib
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return [data / n for n in ("chelsea.png", "coffee.png", "astronaut.png", "camera.png", "rocket.jpg",
                               "motorcycle_left.png", "hubble_deep_field.jpg", "immunohistochemistry.png")
            if (data / n).exists()] + [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


def groups_of(n: int) -> list[list[Member]]:
    """Near-duplicate groups of 2..5 members totalling n images, each image its own path."""
    out, i, g = [], 0, 1
    while i < n:
        size = min(2 + (g % 4), n - i)
        if size < 2 and out:  # a last image joins the last group
            out[-1].append(Member(out[-1][0].group, f"/data/photos/{g - 1:06d}/img-{i:07d}.jpg", 0.97, i))
            break
        out.append([Member(g, f"/data/photos/{g:06d}/img-{i + j:07d}.jpg", 1.0 if j == 0 else 0.97 - 0.01 * j,
                           i + j) for j in range(size)])
        i += size
        g += 1
    return out


def build(n: int, thumbs: Path, keys: list[str], where: Path) -> tuple[Path, float]:
    """A dedup report of n images in `where`, its thumbnails copied from `thumbs`; (folder, seconds)."""
    folder = where / f"report-{n}"
    shutil.copytree(thumbs / "t", folder / "t")
    start = time.perf_counter()
    groups = groups_of(n)
    rep = report.dedup_report(groups, source="feats.npy", threshold=0.95, images=n)
    images = {m.path: report._Image(m.path, keys[m.row % len(keys)], Path(m.path)) for g in groups for m in g}
    report.write_page(rep, images, folder)
    return folder, time.perf_counter() - start


OPEN = """() => {
  const paint = Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name, e.startTime]));
  const ready = performance.getEntriesByName('vggembed-ready')[0];
  return [paint['first-paint'], paint['first-contentful-paint'], ready ? ready.startTime : null];
}"""

FILTER = """async (q) => {
  const box = document.getElementById('q');
  const before = Number(document.body.dataset.applied);
  const t0 = performance.now();
  box.value = q;
  box.dispatchEvent(new Event('input'));
  while (Number(document.body.dataset.applied) === before) await new Promise(r => setTimeout(r, 5));
  await new Promise(r => requestAnimationFrame(() => r()));
  return performance.now() - t0 - 150;  // less the page's 150 ms wait for the next key
}"""


def measure(browser, folder: Path, repeat: int) -> dict:
    fp, fcp, ready, filt = [], [], [], []
    for _ in range(repeat):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto((folder / "index.html").as_uri(), wait_until="load", timeout=600_000)
        page.wait_for_selector("body[data-ready]", timeout=600_000)
        page.wait_for_timeout(300)  # paint entries are recorded after the frame
        a, b, c = page.evaluate(OPEN)
        fp.append(a)
        fcp.append(b)
        ready.append(c)
        filt.append(page.evaluate(FILTER, "img-00000"))
        context.close()
    return {"fp": statistics.median(fp), "fcp": statistics.median(fcp), "ready": statistics.median(ready),
            "filter": statistics.median(filt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,10000,100000", help="images per report, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="loads per report (median)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="vggembed-report-") as tmp:
        tmp = Path(tmp)
        photos = sample_photos()
        # the real thumbnails of the sample photos, made by the report writer
        sample = report.Report("sample", [report.View("v", [report.Section("s", [report.Tile(str(p)) for p in
                                                                                  photos])])])
        start = time.perf_counter()
        made = report.write(sample, tmp / "sample")
        thumb_seconds = time.perf_counter() - start
        files = sorted((tmp / "sample" / "t").rglob("*.jpg"))
        keys = [f.stem for f in files]
        mean_thumb = sum(f.stat().st_size for f in files) / len(files)
        print(f"thumbnails: {made.made} made from {len(photos)} sample photos in {thumb_seconds:.2f} s "
              f"({os.cpu_count()} CPUs), mean {mean_thumb / 1024:.1f} KiB at {report.THUMB} px", flush=True)
        rows = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            for n in sizes:
                folder, seconds = build(n, tmp / "sample", keys, tmp)
                size = (folder / "index.html").stat().st_size
                m = measure(browser, folder, args.repeat)
                rows.append((n, len(groups_of(n)), size, seconds, m, n * mean_thumb))
                shutil.rmtree(folder)
            browser.close()
    print()
    print(f"{'images':>8} {'groups':>7} {'page size':>10} {'write s':>8} {'first paint':>12} {'FCP':>8} "
          f"{'rows ready':>11} {'filter':>8} {'thumbnails':>11}")
    for n, groups, size, seconds, m, thumbs in rows:
        print(f"{n:>8} {groups:>7} {size / 2**20:>8.2f}MB {seconds:>8.2f} {m['fp']:>10.0f}ms {m['fcp']:>6.0f}ms "
              f"{m['ready']:>9.0f}ms {m['filter']:>6.0f}ms {thumbs / 2**20:>9.1f}MB")


if __name__ == "__main__":
    main()
