"""An output's place on disk: owned by one run at a time, and every OS failure there said in one line.

Every local writer (`writer.EmbeddingWriter`, `classify -o`, the pictures)
holds a `Destination` while it writes; the `--engine ray` driver claims one
for a local run folder (its `OUT.lock` beside the folder), while the parts
in it are written through `runfolder.Store`:

- `claim()` takes an exclusive `flock` on `OUT.lock` beside the output and
  writes this process's PID into it. A second run on the same output fails
  at once, naming the output and the holder's PID. The OS drops the lock when
  the holder exits however it exits (SIGKILL included), so a killed run never
  leaves a stale lock; the lock file is removed on a normal `release()` and a
  leftover one from a killed run is simply taken over.
- `writing()` turns any `OSError` raised while writing there (read-only file
  system, a part of the path that is a file, no permission, disk full, file
  too large, quota) into one `OutputError` naming the output and the cause;
  on a full disk a resumable output says to free space and `--resume`.

Locks are advisory and per host: two runs on different machines sharing an
NFS folder may not see each other's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from ..errors import VGGEmbedError

# Full disk, quota or file size limit: the run can go on once there is room.
NO_ROOM = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
           errno.EFBIG: "raise the file size limit (ulimit -f)"}


def is_stream(path) -> bool:
    """An existing path that is neither a regular file nor a folder (`/dev/stdout`, a FIFO, a device).

    Such an output is written in place, unlocked: staging it beside and renaming
    over it would replace the device or pipe with a plain file (as root, in /dev)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class OutputError(VGGEmbedError):
    """An output cannot be written where asked (or is busy): the message names it and why."""

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputBusy(OutputError):
    """Another process holds the output's lock."""


def cause(e: OSError, out: Path) -> str:
    """What an OSError met while writing `out` means, in words (naming the part of the path at fault)."""
    if e.errno in (errno.ENOTDIR, errno.EEXIST):  # mkdir of a folder that is a file: EEXIST
        for parent in out.parents:
            if parent.exists() and not parent.is_dir():
                return f"cannot write here: {parent} is a file, not a folder"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EFBIG:
        return "file too large for this file system or the process's file size limit"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    text = (e.strerror or str(e)).lower()
    if e.filename is not None and Path(os.fsdecode(e.filename)).parent != out.parent:
        text += f" ({os.fsdecode(e.filename)})"  # a parent folder, not the output's own files
    return f"cannot write here: {text}"


class Destination:
    """One output path (a file, or a folder for --engine ray), held by this process while it writes.

    Args:
        out: the output path.
        resumable: a full disk leaves the output resumable (`--resume`); say so.
    """

    def __init__(self, out, *, resumable: bool = False):
        self.out = Path(out)
        self.lock_path = self.out.with_name(self.out.name + ".lock")
        self.resumable = resumable
        self._fd: int | None = None

    @contextlib.contextmanager
    def writing(self):
        """Raise any OSError inside as one OutputError naming the output."""
        try:
            yield
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise  # the reader of a pipe went away: not a problem of the place (see cli.process)
            problem = cause(e, self.out)
            if e.errno in NO_ROOM and self.resumable:
                problem += (f"; the finished batches are kept: {NO_ROOM[e.errno]} and run the same command "
                            "with --resume")
            raise OutputError(self.out, problem) from None

    def claim(self) -> "Destination":
        """Create the output's folder and take its lock, or fail at once if another process has it."""
        if is_stream(self.out):
            return self
        with self.writing():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 32).decode("ascii", "replace").strip()
                    os.close(fd)
                    raise OutputBusy(self.out, "another vggembed run "
                                     + (f"(PID {holder}) " if holder.isdigit() else "")
                                     + "is writing this output; wait for it to end or stop it") from None
                except BaseException:
                    os.close(fd)
                    raise
                # The holder before us may have removed the file after we opened it: then our
                # lock is on a name nobody else sees; take the current file instead.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                self.release()
                raise
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (removing first, so a waiting run takes a fresh file)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.lock_path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "Destination":
        return self.claim()

    def __exit__(self, *_) -> None:
        self.release()


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".tmp"):
    """Yield a temporary name beside `path`; rename it onto `path` if the block succeeds, else remove it.
    A stream (`is_stream`) is yielded as it is, to be written in place."""
    if is_stream(path):
        yield path
        return
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
