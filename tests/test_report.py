"""HTML reports (`--html` of dedup, cluster, search) opened in a real browser: thumbnails, planted duplicate
groups, hostile names, filters, paging, and a report folder that is never left half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from vggembed.cli import main
from vggembed.errors import display
from vggembed.use import report

from .browser import Page, browser  # noqa: F401 (a fixture)
from .conftest import HANG

LAYER = ["--layer", "pool4", "--pool", "flatten"]  # tells near-duplicates from other photos with tiny weights
THRESHOLD = "0.8"
# names a page must show exactly and never run: quotes, markup that would close the data's <script>, a line
# break, bytes that are not UTF-8 (shown as \xNN)
HOSTILE_DIR = b"x<"
HOSTILE = [b"a \"quoted\" 'name'.png", b"script><img src=x onerror=window.pwned=1>.png", b"line\nbreak.png",
           b"caf\xe9.png"]


def run(*args):
    return CliRunner().invoke(main, [os.fsdecode(a) if isinstance(a, (bytes, Path)) else str(a) for a in args],
                              catch_exceptions=False)


@pytest.fixture(scope="module")
def collection(tmp_path_factory, photos, tiny16):
    """Real photos with planted near-duplicates; grace_hopper's copy is broken after embedding (no thumbnail)."""
    root = tmp_path_factory.mktemp("report")
    folder = root / "photos"
    folder.mkdir()
    by_stem = {p.stem: Image.open(p).convert("RGB") for p in photos}
    for stem, img in by_stem.items():
        img.save(folder / f"{stem}.png")
    small = by_stem["chelsea"].resize((by_stem["chelsea"].width * 6 // 10, by_stem["chelsea"].height * 6 // 10))
    small.save(folder / "chelsea-small.jpg", quality=85)
    by_stem["coffee"].save(folder / "coffee-copy.jpg", quality=80)
    by_stem["grace_hopper"].save(folder / "grace_hopper-copy.jpg", quality=80)
    odd = os.fsencode(folder) + b"/" + HOSTILE_DIR
    os.mkdir(odd)
    for name in HOSTILE:
        shutil.copy(folder / "astronaut.png", odd + b"/" + name)
    index = root / "feats.npy"
    made = run("embed", folder, "-o", index, "--weights", tiny16, *LAYER)
    assert made.exit_code == 0, made.output
    (folder / "grace_hopper-copy.jpg").write_bytes(b"\xff\xd8 cut short")
    return root


def expected_groups(collection) -> list[set[str]]:
    folder = os.fsencode(collection / "photos")
    astronaut = {os.fsdecode(folder + b"/astronaut.png")} | {os.fsdecode(folder + b"/" + HOSTILE_DIR + b"/" + n)
                                                              for n in HOSTILE}
    return [{display(n) for n in group} for group in [
        astronaut,
        {str(collection / "photos" / n) for n in ("chelsea-small.jpg", "chelsea.png")},
        {str(collection / "photos" / n) for n in ("coffee-copy.jpg", "coffee.png")},
        {str(collection / "photos" / n) for n in ("grace_hopper-copy.jpg", "grace_hopper.png")}]]


def test_dedup_report_shows_the_planted_groups_with_every_thumbnail(collection, browser, tmp_path):
    out = tmp_path / "dedup"
    result = run("dedup", collection / "feats.npy", "--threshold", THRESHOLD, "--html", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'index.html'}: 11 images, 10 thumbnails made; 1 could not be read" in result.stderr
    page = Page(browser, out)
    shown = page.sections()
    assert sorted(map(set, (s["names"] for s in shown)), key=sorted) == sorted(expected_groups(collection),
                                                                                key=sorted)
    assert [s["title"] for s in shown] == ["group 1: 5 images", "group 2: 2 images", "group 3: 2 images",
                                           "group 4: 2 images"]
    thumbs = page.thumbnails()
    assert len(thumbs) == 10 and all(width > 0 for _, width in thumbs), thumbs
    # the broken copy: a placeholder with the decoder's reason, in its group
    (grace,) = [s for s in shown if any("grace_hopper.png" in n for n in s["names"])]
    assert len(grace["missing"]) == 1 and "grace_hopper-copy.jpg" not in grace["missing"][0]
    assert "JPEG" in grace["missing"][0] or "image" in grace["missing"][0]
    # hostile names are shown as they are (non-UTF-8 bytes as \xNN) and nothing in them ran
    assert page.page.evaluate("window.pwned") is None
    assert page.page.evaluate("document.querySelectorAll('main img[src=x]').length") == 0
    assert page.errors == []
    page.screenshot("report-dedup")

    page.filter(q="coffee")
    assert [set(s["names"]) for s in page.sections()] == [expected_groups(collection)[2]]
    assert page.count() == "Showing 1\u20131 of 1 groups (filtered from 4)"
    page.filter(q="no image is called this")
    assert page.sections() == [] and page.count() == "No groups (filtered from 4)"
    page.filter(q="", min="0.9999")  # groups whose every member has cosine >= 0.9999 to the first: byte copies
    assert [len(s["names"]) for s in page.sections()] == [5]
    page.filter(min="")
    page.page.select_option("#sort", "size-desc")
    assert [len(s["names"]) for s in page.sections()][0] == 5
    assert page.errors == []


def test_cluster_and_search_reports(collection, browser, tmp_path):
    clusters = run("cluster", collection / "feats.npy", "-k", 4, "--html", tmp_path / "clusters")
    assert clusters.exit_code == 0, clusters.output
    page = Page(browser, tmp_path / "clusters")
    shown = page.sections()
    assert sum(len(s["names"]) for s in shown) == 11 and len(shown) == 4
    assert sum(w > 0 for _, w in page.thumbnails()) == 10
    page.screenshot("report-cluster")
    page.filter(q="chelsea")  # a cluster's filter shows only the matching members
    assert sorted(n.rsplit("/", 1)[1] for s in page.sections() for n in s["names"]) == ["chelsea-small.jpg",
                                                                                         "chelsea.png"]
    assert page.errors == []

    hits = run("search", collection / "feats.npy", "--rows", "0,3", "-k", 2, "--html", tmp_path / "search")
    assert hits.exit_code == 0, hits.output
    page = Page(browser, tmp_path / "search", width=390, height=844)  # a phone
    shown = page.sections()
    assert [len(s["names"]) for s in shown] == [3, 3]  # the query's own image, then two hits
    assert all(w > 0 for _, w in page.thumbnails())
    assert page.page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    assert page.errors == []
    page.screenshot("report-search")


def test_an_existing_report_needs_overwrite_and_its_thumbnails_are_reused(collection, tmp_path, photos):
    out = tmp_path / "r"
    args = ["dedup", collection / "feats.npy", "--threshold", THRESHOLD, "--html", out]
    assert run(*args).exit_code == 0
    again = run(*args)
    assert again.exit_code == 1
    assert again.output.strip().splitlines()[-1] == f"Error: {out}: exists; pass --overwrite to replace it"
    chelsea = collection / "photos" / "chelsea.png"
    stat = chelsea.stat()
    Image.open(photos[0]).convert("RGB").rotate(90, expand=True).save(chelsea)  # changed: its thumbnail is remade
    try:
        replaced = run(*args, "--overwrite")
    finally:
        Image.open(photos[0]).convert("RGB").save(chelsea)
        os.utime(chelsea, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert replaced.exit_code == 0, replaced.output
    assert "11 images, 1 thumbnails made, 9 reused; 1 could not be read" in replaced.stderr
    assert not list(tmp_path.glob("r.*"))  # no temporary folder left beside it
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused = run("dedup", collection / "feats.npy", "--html", other, "--overwrite")
    assert refused.exit_code == 1 and "is not a vggembed report; will not replace it" in refused.output
    assert (other / "notes.txt").read_text() == "keep me"


def limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, 8 << 10))  # a full disk at 8 KB a file: EFBIG


def test_a_failed_write_is_one_line_and_leaves_no_report(collection, tmp_path):
    out = tmp_path / "r"
    failed = subprocess.run([sys.executable, "-m", "vggembed", "dedup", str(collection / "feats.npy"),
                             "--threshold", THRESHOLD, "--html", str(out)], capture_output=True, timeout=HANG,
                            preexec_fn=limit_file_size)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.decode().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "file size limit" in errors[0] and "Traceback" not in failed.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no report, no .partial, no lock
    under_file = run("dedup", collection / "feats.npy", "--html", collection / "feats.npy" / "r")
    assert under_file.exit_code == 1 and "is a file, not a folder" in under_file.output


def test_large_reports_are_paged_and_sections_grow_on_demand(browser, tmp_path, photos):
    sections = [report.Section(f"issue {i}", [report.Tile(str(photos[i % 4]), 1 - i / 1000, label=f"class {i % 3}")],
                               score=1 - i / 1000) for i in range(120)]
    sections.append(report.Section("a big one", [report.Tile(str(photos[j % 4]), j) for j in range(30)]))
    done = report.write(report.Report("Paging", [report.View("Issues", sections, what="issues")]), tmp_path / "p")
    assert (done.images, done.made, done.failed) == (4, 4, 0)
    data = (tmp_path / "p" / "index.html").read_text()
    assert data.count('loading = "lazy"') == 1 and "http" not in data.replace("http-equiv", "")  # offline
    page = Page(browser, tmp_path / "p")
    assert len(page.sections()) == 50 and page.count() == "Showing 1\u201350 of 121 issues"
    page.page.click("#next")
    page.page.click("#next")
    shown = page.sections()
    assert [s["title"] for s in shown][-1] == "a big one" and len(shown[-1]["names"]) == 24
    page.page.click("main section:last-child button.more")
    assert len(page.sections()[-1]["names"]) == 30
    page.filter(label="class 2")
    assert page.count() == "Showing 1\u201340 of 40 issues (filtered from 121)"
    assert {lab for s in page.sections() for lab in s["labels"]} == {"class 2"}
    assert page.errors == []


def test_the_data_can_never_close_its_script_element():
    hostile = ["</script><script>alert(1)</script>", "<!--", "a&b", "\u2028", "caf\udce9"]
    encoded = report.script_json({"n": [report.text(h) for h in hostile]})
    assert "<" not in encoded and ">" not in encoded and "&" not in encoded
    assert json.loads(encoded)["n"] == hostile[:4] + ["caf\\xe9"]
