"""Open a local file for reading without ever blocking on something that is not a file.

`open()` on a FIFO waits for a writer forever, a character device can
stream without end, and a socket cannot be opened at all. Every local file
vggembed reads (images, weight files, label files, shards) goes through
`open_regular`, which looks at what the path is before opening it, opens it
non-blocking, and checks the opened descriptor again (the path may have
been swapped in between), so only a regular file is ever read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import BinaryIO

from ..errors import VGGEmbedError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotAFileError(VGGEmbedError):
    """A path that cannot be read as a regular file: missing, a folder, a FIFO,
    a socket, a device, or not readable.

    `problem` is the message without the path ("is a FIFO (named pipe), not
    an image file"), for callers that re-raise it as their own error kind.
    """

    def __init__(self, path, problem: str):
        self.path = os.fsdecode(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def open_regular(path: str | bytes | os.PathLike, what: str = "file") -> BinaryIO:
    """Open `path` for binary reading if, and only if, it is a regular file.

    Symbolic links are followed. Never blocks: the path's kind is checked
    before opening, the open is non-blocking, and the opened descriptor is
    checked again.

    Args:
        path: the file.
        what: what the caller expected, for the message ("image file",
            "weight file", "label file").

    Returns:
        A buffered binary file object (close it, or use it in `with`).

    Raises:
        NotAFileError: naming the path and what it is instead ("is a FIFO
            (named pipe), not a weight file", "no such file", ...).
    """
    try:
        _check(path, os.stat(path).st_mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise NotAFileError(path, _os_problem(e)) from None
    try:
        _check(path, os.fstat(fd).st_mode, what)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check(path, mode: int, what: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise NotAFileError(path, f"is {kind}, not {_article(what)}")


def _article(what: str) -> str:
    return ("an " if what[:1] in "aeiou" else "a ") + what


def _os_problem(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "no such file"
    if e.errno == errno.EACCES:
        return "permission denied"
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links (a link loop?)"
    if e.errno == errno.ENOTDIR:
        return "a part of the path is not a folder"
    return e.strerror or str(e)
