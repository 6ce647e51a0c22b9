"""Turn command-line inputs (files, folders, shards, URLs, `-`, --files-from) into one ordered stream of sources.

Folders, local or remote, are walked recursively and their images sorted by
relative POSIX path, so the same folder always gives the same row order.
Hidden files and folders (a leading dot, such as macOS `._x.jpg` forks) are
skipped. Lists (stdin, --files-from) are streamed in their own order, one
path per line, or NUL-separated with `null=True` (`find -print0`); they are
read as bytes, so a name that is not valid UTF-8 keeps its exact bytes
(`os.fsdecode`). A tar shard (`.tar`, `.tar.gz`, `.tgz`) named as an input
or in a list stands for its image members, in member order.

Listing happens in two steps so that an engine can plan work without
reading images: `plan` yields every input with shards left whole, and
`open_shards` replaces each shard by its members (`expand` does both).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import VGGEmbedError
from . import sources
from .sources import Source, is_image_name, is_shard, is_url

BOM = b"\xef\xbb\xbf"
MAX_RECORD = 1 << 20  # no path or URL is this long; a longer one means a wrong separator


def expand(inputs: Iterable[str], files_from: str | None = None, stdin=None, *, null: bool = False
           ) -> Iterator[Source]:
    """Every image named by `inputs`, in order, shards opened into their members.

    A path that does not exist is passed on as it is: the decoder reports it
    as a failed image, so one typo never stops a run or shifts rows.
    """
    return open_shards(plan(inputs, files_from, stdin, null=null))


def for_run(inputs: list[str], files_from: str | None = None, *, null: bool = False, stdin=None
            ) -> tuple[Iterator[Source], int | None]:
    """(sources, their count) for a run; the count is None where it would cost reading everything first.

    Lists are read up front (names only) so that a progress bar knows its
    total, except stdin, which may be an endless pipe, and tar shards, whose
    members are known only by reading them.
    """
    if "-" in inputs:
        return expand(inputs, files_from, stdin, null=null), None
    units = list(plan(inputs, files_from, null=null))
    if any(is_unopened_shard(u) for u in units):
        return open_shards(units), None
    return iter(units), len(units)


def plan(inputs: Iterable[str], files_from: str | None = None, stdin=None, *, null: bool = False
         ) -> Iterator[Source]:
    """Every input in order, with each tar shard left as one `Source` (nothing is read but listings).

    Args:
        inputs: files, folders, shards, URLs, or `-` for a list on stdin.
        files_from: a file listing more inputs (after `inputs`).
        stdin: the stream `-` reads (default: the process's stdin).
        null: lists are NUL-separated instead of one name per line.
    """
    for item in inputs:
        if item == "-":
            yield from _entries(_records(_binary(stdin if stdin is not None else sys.stdin), null))
        else:
            yield from _argument(item)
    if files_from is not None:
        # Plain open: a list may well come from a pipe (`--files-from <(find ...)`).
        with open(files_from, "rb") as f:
            yield from _entries(_records(f, null))


def open_shards(units: Iterable[Source]) -> Iterator[Source]:
    """The units of `plan`, each shard replaced by its image members (or its error)."""
    for unit in units:
        if is_unopened_shard(unit):
            yield from sources.iter_shard(unit.name)
        else:
            yield unit


def is_unopened_shard(unit: Source) -> bool:
    return unit.error is None and unit.data is None and is_shard(unit.name)


def _argument(item: str) -> Iterator[Source]:
    if is_url(item):
        sources.check_protocol(item)
        if _url_is_folder(item):
            yield from url_folder_images(item)
        else:
            yield Source(sources.redact(item))
    elif os.path.isdir(item):
        yield from folder_images(Path(item))
    else:
        yield Source(item)


def _entries(names: Iterable[str]) -> Iterator[Source]:
    """List entries name files, shards or URLs (a folder in a list is not walked: `find` lists folders too)."""
    checked: set[str] = set()
    for name in names:
        if is_url(name):
            protocol = name.split("://", 1)[0].lower()
            if protocol not in checked:
                sources.check_protocol(name)
                checked.add(protocol)
            name = sources.redact(name)
        yield Source(name)


def _binary(stream):
    if stream is None:
        raise VGGEmbedError("'-' reads paths from stdin, but stdin is closed")
    return getattr(stream, "buffer", stream)


def _records(f, null: bool) -> Iterator[str]:
    """Names in a list, streamed: split on NUL or newline, a leading UTF-8 BOM dropped.

    Lines lose a trailing CR and blank lines are skipped; NUL-separated names
    are taken exactly (only empty ones are skipped).
    """
    sep = b"\0" if null else b"\n"
    read = getattr(f, "read1", f.read)  # what has arrived, so a slow `find` still streams
    buf = b""
    bom_checked = False
    while True:
        chunk = read(1 << 16)
        if isinstance(chunk, str):  # a text stream without a binary buffer
            chunk = chunk.encode("utf-8", "surrogateescape")
        buf += chunk
        if not bom_checked and (not chunk or len(buf) >= len(BOM) or not BOM.startswith(buf)):
            if buf.startswith(BOM):
                buf = buf[len(BOM):]
            bom_checked = True
        if not chunk:
            yield from _names(buf.split(sep), null)
            return
        if bom_checked:
            *records, buf = buf.split(sep)
            yield from _names(records, null)
        if len(buf) > MAX_RECORD:
            raise VGGEmbedError(f"a name in the list is longer than {MAX_RECORD // 2**20} MiB: not a list of paths"
                                + ("" if null else " (NUL-separated lists need -0)"))


def _names(records: list[bytes], null: bool) -> Iterator[str]:
    for r in records:
        if not null:
            if b"\0" in r:
                raise VGGEmbedError("a line of the list holds a NUL byte: for NUL-separated names "
                                    "(find -print0) pass -0")
            r = r.rstrip(b"\r")
            if not r.strip():
                continue
        elif not r:
            continue
        yield os.fsdecode(r)


def folder_images(folder: Path) -> list[Source]:
    """Image files below `folder`, sorted by their path relative to it.

    Walked without recursion (a tree thousands of levels deep is fine) and
    without following links to folders (a link loop cannot trap it). A
    folder that cannot be listed (no permission, a path longer than the
    system allows) becomes one failed input named after it, in its place in
    the order, so its images are never silently missing.
    """
    base = str(folder)
    found: list[tuple[str, Source]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(base, rel) if rel else base
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            found.append((rel, Source(path, error=f"cannot list this folder: {_listing_problem(e)}")))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            sub = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()
                link = entry.is_symlink()
            except OSError:
                is_dir = link = False
            if is_dir:
                if not link:
                    stack.append(sub)
            elif is_image_name(entry.name):
                found.append((sub, Source(os.path.join(base, sub))))
    found.sort(key=lambda pair: pair[0])
    return [source for _, source in found]


def _listing_problem(e: OSError) -> str:
    if e.errno == errno.ENAMETOOLONG:
        return "path longer than the system can open (PATH_MAX); move the images to a shallower folder"
    if e.errno == errno.EACCES:
        return "permission denied"
    return e.strerror or str(e)


def _url_is_folder(url: str) -> bool:
    """A trailing slash marks a folder; so does an object-store prefix. An
    HTTP URL without one is a file: HTTP has no folders to ask about."""
    if url.endswith("/"):
        return True
    if url.split("://", 1)[0].lower() in ("http", "https") or is_shard(url):
        return False
    try:
        fs, path = sources.filesystem(url)
        return bool(sources.retrying(url, lambda: fs.isdir(path)))
    except VGGEmbedError:
        return False  # reading it will say what is wrong, as that input's failure


def url_folder_images(url: str) -> list[Source]:
    """Images below a remote folder, sorted as `folder_images` sorts a local one.

    A listing that fails (no such bucket, access denied, after retries for
    transient errors) becomes one failed input named after the folder.
    """
    shown = sources.redact(url)
    try:
        fs, root = sources.filesystem(url)
        found = sources.retrying(shown, lambda: fs.find(root, withdirs=False, detail=False))
    except VGGEmbedError as e:
        return [Source(shown, error=f"cannot list this folder: {getattr(e, 'problem', e)}")]
    prefix = root.rstrip("/") + "/"
    base = shown.rstrip("/") + "/"
    rels = sorted(p[len(prefix):] for p in found if p.startswith(prefix))
    return [Source(base + rel) for rel in rels if is_image_name(rel)]
