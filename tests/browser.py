"""Opening HTML reports in a real browser: Debian's chromium, driven by Playwright (never `playwright install`).

A test that needs the browser takes the `browser` fixture; without chromium
or the playwright package it is skipped, saying which is missing (`.ci/run`
installs both). With VGGEMBED_SCREENSHOTS=DIR set, `screenshot` saves the
page as DIR/NAME.png (the docs' pictures: VGGEMBED_SCREENSHOTS=docs/img);
otherwise it writes nothing, so tests leave the tree clean.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import HANG

CHROMIUM = next((p for p in (os.environ.get("VGGEMBED_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium: apt-get install chromium (as .ci/run does), or set VGGEMBED_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install 'vggembed[test]'")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=HANG * 1000)
        yield b
        b.close()


class Page:
    """A report opened from file://, with its console errors and uncaught exceptions collected."""

    def __init__(self, browser, folder: Path, width: int = 1280, height: int = 900):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.set_default_timeout(HANG * 1000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto((folder / "index.html").absolute().as_uri())
        self.page.wait_for_selector("body[data-ready]")

    def thumbnails(self) -> list[tuple[str, int]]:
        """(alt, naturalWidth) of every thumbnail on the page, each scrolled to (they load lazily) and waited for."""
        self.page.evaluate("() => { for (const i of document.images) i.scrollIntoView(); window.scrollTo(0, 0); }")
        for i in range(self.page.evaluate("document.images.length")):
            self.page.evaluate(f"document.images[{i}].scrollIntoView()")
            self.page.wait_for_function(f"document.images[{i}].complete")
        return self.page.evaluate("Array.from(document.images).map(i => [i.alt, i.naturalWidth])")

    def sections(self) -> list[dict]:
        """Each shown section: title, the full names of its tiles (title of the name line), placeholders' text."""
        return self.page.evaluate("""Array.from(document.querySelectorAll('main section')).map(s => ({
            title: s.querySelector('h2').textContent,
            names: Array.from(s.querySelectorAll('figcaption .n')).map(n => n.title),
            labels: Array.from(s.querySelectorAll('figcaption .l')).map(n => n.textContent),
            missing: Array.from(s.querySelectorAll('.missing')).map(n => n.textContent)}))""")

    def filter(self, **fields) -> None:
        """Type into the filter boxes (q, label, min) and wait for the page to apply them."""
        for box, value in fields.items():
            before = int(self.page.evaluate("document.body.dataset.applied"))
            self.page.fill(f"#{box}", str(value))
            # the page applies a filter 150 ms after the last key, and counts how often it did
            self.page.wait_for_function("n => Number(document.body.dataset.applied) > n", arg=before)

    def count(self) -> str:
        return self.page.text_content("#count")

    def screenshot(self, name: str) -> None:
        where = os.environ.get("VGGEMBED_SCREENSHOTS")
        if where:
            Path(where).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.page.close()
