"""Decode images in parallel, in order, with bounded memory; group them into batches.

Decoding runs in a thread pool (Pillow releases the GIL while it decodes and
resizes) a bounded window ahead of the model, so the model rarely waits and
memory stays flat whatever the number of images. Every input comes out as an
`Item`, in input order, holding either its array or its error: a bad image
is a record, never an exception, and never shifts the rows after it.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import ImageError
from .sources import name_of


@dataclass
class Item:
    index: int  # position in the input stream
    source: str  # the input's name, as the index records it
    array: np.ndarray | None = None
    error: str | None = None


def decode_one(prepare: Callable[[str], np.ndarray], source) -> tuple[np.ndarray | None, str | None]:
    """(array, None) or (None, error): a bad file is a value, never an exception."""
    try:
        return prepare(source), None
    except ImageError as e:
        return None, e.problem
    except MemoryError:
        return None, "out of memory while decoding"
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the run
        return None, f"{type(e).__name__}: {e}"


def decode_stream(sources: Iterable, prepare: Callable[[str], np.ndarray], *, workers: int = 2,
                  window: int = 64) -> Iterator[Item]:
    """Yield an Item per source, in order, decoding up to `window` ahead.

    Sources are whatever `prepare` takes (names, `sources.Source`s holding
    tar members' bytes, ...); the Items carry only their names, so bytes are
    freed as soon as each image is decoded. The loop pulls sources from
    `sources` only as the window frees, which bounds what a listing that
    reads bytes (a tar shard streamed member by member) holds in memory.
    """

    def work(index, source):
        array, error = decode_one(prepare, source)
        return Item(index, name_of(source), array=array, error=error)

    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="vggembed-decode")
    pending: collections.deque = collections.deque()
    try:
        for index, source in enumerate(sources):
            pending.append(pool.submit(work, index, source))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def chunks(items: Iterable[Item], batch_size: int) -> Iterator[list[Item]]:
    """Consecutive runs of items holding `batch_size` decoded images each
    (the last may hold fewer); failed items travel in the chunk where they
    stand, so a writer sees every input in order."""
    chunk: list[Item] = []
    ok = 0
    for item in items:
        chunk.append(item)
        ok += item.error is None
        if ok == batch_size:
            yield chunk
            chunk, ok = [], 0
    if chunk:
        yield chunk


def stack(chunk: list[Item]) -> np.ndarray | None:
    """The decoded images of a chunk as one float32 batch, or None if all failed."""
    arrays = [item.array for item in chunk if item.error is None]
    if not arrays:
        return None
    return np.stack(arrays).astype(np.float32, copy=False)
