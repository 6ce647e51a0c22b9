"""Turn command-line inputs (files, folders, `-`, --files-from) into one ordered stream of paths.

Folders are walked recursively and their images sorted by relative POSIX
path, so the same folder always gives the same row order. Hidden files and
folders (a leading dot, such as macOS `._x.jpg` forks) are skipped. Lists
(stdin, --files-from) are streamed in their own order, one path per line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .ico .tga".split()
)


def folder_images(folder: Path) -> list[str]:
    """Image files below `folder`, sorted by their path relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                full = os.path.join(root, f)
                found.append((Path(os.path.relpath(full, folder)).as_posix(), full))
    return [full for _, full in sorted(found)]


def _lines(stream) -> Iterator[str]:
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def expand(inputs: Iterable[str], files_from: str | None = None, stdin=None) -> Iterator[str]:
    """Every image path named by `inputs`, in order.

    A path that does not exist is passed on as it is: the decoder reports it
    as a failed image, so one typo never stops a run or shifts rows.
    """
    for item in inputs:
        if item == "-":
            yield from _lines(stdin if stdin is not None else sys.stdin)
        elif os.path.isdir(item):
            yield from folder_images(Path(item))
        else:
            yield item
    if files_from is not None:
        with open(files_from, encoding="utf-8", errors="surrogateescape") as f:  # names' exact bytes
            yield from _lines(f)
