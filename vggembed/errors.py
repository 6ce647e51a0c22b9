"""Exceptions vggembed raises. The CLI turns each into a one-line message."""

import os


def display(name) -> str:
    """A file name as messages, Parquet strings and JSON show it: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def reason(e: BaseException) -> str:
    """A foreign exception (pyarrow's, a file system's) as one line for a message: its type and its text,
    line breaks and runs of spaces as one space, other control characters as \\xNN."""
    text = " ".join(str(e).split())
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class VGGEmbedError(Exception):
    """Base class: a problem the user can act on, described in one line."""


class WeightFileError(VGGEmbedError):
    """A weight file is missing, unreadable or not laid out as expected.

    The message always starts with the file's path.
    """

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class LayerError(VGGEmbedError):
    """An unknown layer name, or a layer the loaded weights cannot compute."""


class ImageError(VGGEmbedError):
    """One image could not be decoded or preprocessed.

    The message always starts with the image's path (or its position).
    """

    def __init__(self, source, problem):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class DownloadError(VGGEmbedError):
    """A weight download failed or its checksum did not match."""
