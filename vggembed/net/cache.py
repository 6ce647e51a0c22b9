"""The per-user cache ($VGGEMBED_HOME): where it is, and what is remembered there per weight file version
(its MD5; for a `.mat`, whether scipy's parser survives it, see `readers/mat.py`).

Everything here is keyed by a file's path, size, mtime and inode, so a
changed file is simply looked at again; an entry that cannot be read or
written is recomputed or skipped, never an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from .registry import file_md5


def cache_dir() -> Path:
    """$VGGEMBED_HOME, else $XDG_CACHE_HOME/vggembed, else ~/.cache/vggembed.

    As the XDG spec says, a relative $XDG_CACHE_HOME is ignored.
    """
    if os.environ.get("VGGEMBED_HOME"):
        return Path(os.environ["VGGEMBED_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "vggembed"


def _entry(kind: str, path) -> Path:
    import hashlib

    return cache_dir() / kind / hashlib.sha1(os.fsencode(os.path.realpath(path))).hexdigest()


def _version(st: os.stat_result) -> str:
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def recall(kind: str, path, st: os.stat_result) -> str | None:
    """What was remembered under `kind` for this version of the file (`st`: its stat), else None."""
    try:
        recorded, value = _entry(kind, path).read_text().rsplit(" ", 1)
    except (OSError, ValueError):
        return None
    return value if recorded == _version(st) and value else None


def remember(kind: str, path, st: os.stat_result, value: str) -> None:
    """Remember `value` (one word) under `kind` for this version of the file; skipped if the cache is not writable."""
    entry = _entry(kind, path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{_version(st)} {value}")
        os.replace(tmp, entry)
    except OSError:
        pass


def cached_md5(path) -> str:
    """The MD5 of a file, remembered in the cache by path, size, mtime and inode.

    Every embedding output records its weight file's MD5; hashing 528 MB
    takes about a second, so a run pays it once per file version. A stale or
    unreadable entry is recomputed; a cache that cannot be written is skipped.
    """
    st = os.stat(path)
    md5 = recall("md5", path, st)
    if md5 is not None and len(md5) == 32:
        return md5
    md5 = file_md5(path)
    remember("md5", path, st, md5)
    return md5
