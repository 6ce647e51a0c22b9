"""The per-user cache ($VGGEMBED_HOME): where it is, and what is remembered there per weight file version.

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


def cached_md5(path) -> str:
    """The MD5 of a file, remembered in the cache by path, size, mtime and inode.

    Every embedding output records its weight file's MD5; hashing 528 MB
    takes about a second, so a run pays it once per file version. A stale or
    unreadable entry is recomputed; a cache that cannot be written is skipped.
    """
    import hashlib

    st = os.stat(path)
    key = f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"
    real = os.fsencode(os.path.realpath(path))
    entry = cache_dir() / "md5" / hashlib.sha1(real).hexdigest()
    try:
        recorded, md5 = entry.read_text().rsplit(" ", 1)
        if recorded == key and len(md5) == 32:
            return md5
    except (OSError, ValueError):
        pass
    md5 = file_md5(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{key} {md5}")
        os.replace(tmp, entry)
    except OSError:
        pass
    return md5
