"""Where an image's bytes come from: a local file, a member of a tar shard, or a URL.

A `Source` is what the rest of the pipeline sees: a name (what the index
records, exactly as given) and, where the listing already has them, the
bytes. Everything that reads image bytes goes through `resolve`, so
there is one place that decides how each kind is read:

- a local path is opened with `safeio.open_regular` (never a FIFO, socket
  or device) and handed to Pillow as a file;
- a tar shard (`.tar`, `.tar.gz`, `.tgz`) is streamed by `iter_shard`
  (never extracted, never seeked), each image member becoming a Source named
  `SHARD/MEMBER` whose bytes the listing already read;
- a URL (`http://`, `https://`, `s3://`, `gs://`, `az://`, `hf://`, ... any
  protocol fsspec knows) is read through fsspec, in one request where the
  protocol allows, on fsspec's IO loop: retried with backoff for transient
  failures (timeouts, resets, 5xx, throttling), within one deadline for the
  whole read and a minimum rate for its body (`remote_settings`), and
  abandoned at once when the run stops. Every failure is that image's row,
  said in words (`_describe`), never the run's end. docs/remote.md lists
  the settings and what each failure says.

No input is read past `MAX_IMAGE_BYTES` (1 GiB): a local file, URL or tar
member larger than an image may be is a failed row, found by its size
before reading where the size is known, else after reading one byte past.

Credentials come from each protocol's usual places (environment, config
files, ~/.netrc). A URL with a password in it is recorded with the password
replaced by `***` and is refused when read, so no credential reaches an
output or a log line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import email.utils
import errno
import http
import io
import os
import random
import re
import socket
import tarfile
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..errors import ImageError, VGGEmbedError
from .safeio import NotAFileError, open_regular

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .ico .tga".split()
)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# An image's bytes are read into memory (or mapped) whole: refuse any input, a local
# file, a URL or a tar member, larger than any image Pillow would accept (89.5 million
# pixels, uncompressed 16-bit RGBA) before reading it, or when reading gets past it.
MAX_IMAGE_BYTES = 1 << 30
REMOTE_EXTRA = 'pip install "vggembed[remote]"'

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Source:
    """One input as the pipeline carries it.

    Attributes:
        name: what the index records, exactly as given (a tar member is
            `SHARD/MEMBER`; a URL's password, if any, is `***`).
        data: the encoded bytes when already read (tar members, prefetched
            URLs); otherwise they are read by name when decoded.
        error: a failure found while listing (an unreadable folder, a
            damaged shard): the input becomes a failed row with this reason.
    """

    name: str
    data: bytes | None = None
    error: str | None = None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:  # never the bytes: a repr may reach a log
        extra = f", {len(self.data)} bytes" if self.data is not None else ""
        extra += f", error={self.error!r}" if self.error is not None else ""
        return f"Source({self.name!r}{extra})"


def name_of(source) -> str:
    """The name an input is recorded under (a path, a URL, `SHARD/MEMBER`)."""
    if isinstance(source, Source):
        return source.name
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    return "<image>"


def is_url(name: str) -> bool:
    """`scheme://...` with a scheme of two or more letters."""
    return bool(_URL.match(name))


def _is_remote(name: str) -> bool:
    """A URL read through fsspec; `file://` is a local path, opened as one (never a FIFO)."""
    return is_url(name) and not name.startswith("file://")


def is_shard(name: str) -> bool:
    """Named like a tar shard (.tar, .tar.gz, .tgz, any case), local or URL."""
    return name.lower().endswith(SHARD_SUFFIXES)


def is_image_name(relative: str) -> bool:
    """An image by its extension, with no hidden part (a leading dot, such as
    macOS `._x.jpg` forks) in its relative path."""
    parts = relative.split("/")
    if any(p.startswith(".") and p not in (".", "..") for p in parts):
        return False
    return os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS


def redact(url: str) -> str:
    """The URL with any password replaced by `***` (a user name is kept)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


# ------------------------------------------------------------------- reading
def resolve(source) -> bytes | str | os.PathLike:
    """What an input stands for when read: its bytes (a tar member, a URL's
    content, read here with retries) or a local path, for `open_regular`.

    Raises:
        ImageError: a listing error carried by the Source, or a failed remote read.
    """
    name = name_of(source)
    if isinstance(source, Source):
        if source.error is not None:
            raise ImageError(name, source.error)
        if source.data is not None:
            return source.data
        source = name
    if _is_remote(name):
        return read_bytes(name)
    return source.removeprefix("file://") if isinstance(source, str) else source


def read_bytes(name: str) -> bytes:
    """The content of a URL, read as `remote_settings` say: retried while the
    failure is transient, within one deadline for the whole read (all its
    attempts and waits), refused when its body comes slower than the minimum
    rate or grows past `MAX_IMAGE_BYTES` (having read no more than that).

    The read runs on fsspec's IO loop; this thread only waits for it, so an
    interrupt here (Ctrl-C, SIGTERM) abandons it at once and closes its
    connection.

    Raises:
        ImageError: naming the URL and why it cannot be read.
    """
    fs, path = filesystem(name)
    return _wait(_read(name, fs, path))


def too_large(size: int | None) -> str:
    """Why an input of `size` bytes (None: not known, only that it is over the limit) is refused."""
    limit = f"{MAX_IMAGE_BYTES >> 20} MiB"
    return f"{size} bytes: larger than an image may be ({limit})" if size is not None else \
        f"more than {limit}: larger than an image may be"


async def _read(name: str, fs, path: str) -> bytes:
    """One image's bytes, in one request where the protocol allows it: a GET
    for HTTP and S3 (streamed, so the size, the rate and the limit are checked
    as it comes), a ranged read of at most one byte past the limit for other
    asynchronous fsspec protocols, and `_read_file` on a thread for the rest."""
    settings = remote_settings()
    protocol = name.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        async def attempt(progress):
            session = await fs.set_session()
            async with session.get(fs.encode_url(path), **fs.kwargs) as r:
                _check_status(r.status, r.reason, r.headers)
                return await _body(name, r.content.read, r.content_length, progress, settings)
    elif hasattr(fs, "_call_s3"):  # s3fs: one GetObject (s3fs's own open and cat_file ask HEAD first)
        async def attempt(progress):
            bucket, key, version = fs.split_path(path)
            r = await fs._call_s3("get_object", Bucket=bucket, Key=key, **({"VersionId": version} if version else {}))
            try:
                return await _body(name, r["Body"].read, r.get("ContentLength"), progress, settings)
            finally:
                r["Body"].close()
    elif getattr(fs, "async_impl", False):
        async def attempt(progress):
            data = await fs._cat_file(path, start=0, end=MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise ImageError(name, too_large(None))
            return data
    else:
        async def attempt(progress):
            return await _in_thread(lambda: _read_file(name, fs, path))
    return await _retry(name, attempt, settings, settings["deadline"])


def _read_file(name: str, fs, path: str) -> bytes:
    """Any protocol: its size, then at most one byte past the limit."""
    with fs.open(path, "rb") as f:
        size = getattr(f, "size", None)
        if isinstance(size, int) and size > MAX_IMAGE_BYTES:
            raise ImageError(name, too_large(size))
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(name, too_large(None))
    return data


class _Progress:
    """What one attempt has received so far: for the rate check and for saying why it failed."""

    def __init__(self):
        self.started = time.monotonic()
        self.body: float | None = None  # when the body began (the answer's headers came)
        self.received = 0
        self.expected: int | None = None  # the declared size (Content-Length)

    def bytes(self) -> str:
        return f"{self.received}" + (f" of {self.expected}" if self.expected is not None else "") + " bytes"


async def _body(name: str, read, size: int | None, progress: _Progress, settings: dict) -> bytes:
    """A body read chunk by chunk with `read(n)` (b"" at its end): refused at a
    declared `size` over the limit, once it grows past the limit, or once it
    has come for RATE_WINDOW seconds or more at under the minimum rate."""
    progress.body, progress.expected = time.monotonic(), size
    if size is not None and size > MAX_IMAGE_BYTES:
        raise ImageError(name, too_large(size))
    parts = []
    while chunk := await read(1 << 20):
        progress.received += len(chunk)
        if progress.received > MAX_IMAGE_BYTES:
            raise ImageError(name, too_large(None))
        parts.append(chunk)
        elapsed = time.monotonic() - progress.body
        if elapsed >= RATE_WINDOW and progress.received < settings["min_rate"] * elapsed:
            raise _Failure(f"too slow: {progress.bytes()} in {elapsed:.0f} s, under the minimum of "
                           f"{settings['min_rate']:g} bytes/s ($VGGEMBED_MIN_RATE)")
    return b"".join(parts)


def _wait(coro):
    """Run `coro` on fsspec's IO loop and wait for its result in this thread.

    The wait is where an interrupt lands (Ctrl-C, or SIGTERM raised as one in
    the main thread), so the read never holds a run that is stopping: leaving
    here for any reason cancels it, which closes its connection.
    """
    from fsspec.asyn import get_loop

    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result()
    finally:
        future.cancel()


async def _in_thread(fn: Callable[[], _T]) -> _T:
    """fn() on a daemon thread of its own: a blocking call (a synchronous
    fsspec protocol) that a deadline or an interrupt can abandon without
    anything waiting for it, not even the interpreter's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value):
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run():
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
            loop.call_soon_threadsafe(settle, False, e)
        else:
            loop.call_soon_threadsafe(settle, True, value)

    threading.Thread(target=run, name="vggembed-read", daemon=True).start()
    return await future


def _open_local(name: str, what: str) -> BinaryIO:
    try:
        return open_regular(name.removeprefix("file://"), what)
    except NotAFileError as e:
        problem = e.problem
        if problem == os.strerror(errno.ENAMETOOLONG):
            problem = "path too long for the system to open (over PATH_MAX)"
        raise ImageError(name, problem) from None


def fetch_ahead(sources: Iterable, concurrency: int = 32) -> Iterator:
    """The same sources, in order, with the bytes of URLs read `concurrency` at a time.

    Remote reads wait on the network, not the CPU, so they run on fsspec's IO
    loop, ahead of the decoding pool: a slow server is hidden as long as
    `concurrency` reads in flight cover its latency, and a server slower than
    the deadline for one read holds its place in the order no longer than
    that. Local files and sources that already carry bytes pass through
    untouched. At most `concurrency` sources are held here, so memory stays
    bounded. When the caller stops (Ctrl-C, SIGTERM, an error), the reads in
    flight are cancelled, not waited for: their images are simply not done.
    """
    pending: collections.deque = collections.deque()
    try:
        for source in sources:
            name = name_of(source)
            if _is_remote(name) and not (isinstance(source, Source)
                                         and (source.data is not None or source.error is not None)):
                try:
                    fs, path = filesystem(name)
                except ImageError as e:
                    pending.append(Source(name, error=e.problem))
                else:
                    from fsspec.asyn import get_loop  # here: a run of local files needs no fsspec

                    pending.append(asyncio.run_coroutine_threadsafe(_fetch(name, fs, path), get_loop()))
            else:
                pending.append(source)
            while pending and (len(pending) >= concurrency or not isinstance(pending[0], Future)):
                yield _done(pending.popleft())
        while pending:
            yield _done(pending.popleft())
    finally:
        for item in pending:
            if isinstance(item, Future):
                item.cancel()


async def _fetch(name: str, fs, path: str) -> Source:
    try:
        return Source(name, data=await _read(name, fs, path))
    except ImageError as e:
        return Source(name, error=e.problem)


def _done(item):
    if not isinstance(item, Future):
        return item
    try:
        return item.result()
    finally:
        item.cancel()  # when the wait was interrupted: the read stops too


# -------------------------------------------------------------------- shards
def iter_shard(name: str) -> Iterator[Source]:
    """The image members of a tar shard, in member order, bytes already read.

    The shard (local or URL, plain or gzip-compressed) is read once, front to
    back: nothing is extracted to disk and nothing needs seeking, so a shard
    streamed from a server costs no more than one pass. Members that are not
    images (by extension), not regular files, or hidden are skipped.

    Never raises for a bad shard: a shard that cannot be opened, or whose data
    ends early or is damaged, ends the iteration with one `Source` carrying
    the error, named `SHARD/MEMBER` when the cut fell inside that member's
    data and `SHARD` otherwise. The members before the damage are kept.
    """
    try:
        raw = _open_stream(name)
    except ImageError as e:
        yield Source(name, error=e.problem)
        return
    with raw:
        members = 0
        current = None
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*", tarinfo=_TarInfo)
        except ImageError as e:  # a remote read that failed for good
            yield Source(name, error=f"reading the shard failed after 0 images: {e.problem}")
            return
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            yield Source(name, error=f"not a readable tar shard: {_reason(e)}")
            return
        try:
            while (member := tar.next()) is not None:
                del tar.members[:]  # a streamed archive needs no memory of past members
                if not (member.isreg() and is_image_name(member.name)):
                    continue
                if member.size > MAX_IMAGE_BYTES:  # skipped unread: the next header is found by seeking
                    yield Source(f"{name}/{member.name}", error=too_large(member.size))
                    continue
                current = member.name
                data = tar.extractfile(member).read()
                current = None
                members += 1
                yield Source(f"{name}/{member.name}", data=data)
        except ImageError as e:  # a remote read that failed for good
            where = f"{name}/{current}" if current is not None else name
            yield Source(where, error=f"reading the shard failed after {_images(members)}: {e.problem}")
            return
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            if current is not None:
                yield Source(f"{name}/{current}", error=f"the shard's data ends inside this member: {_reason(e)}")
            elif "end of data" in str(e):
                yield Source(name, error=_truncated(members))
            else:
                yield Source(name, error=f"damaged after {_images(members)}: {_reason(e)}")
            return
        end = getattr(tar, "vggembed_end", None)
        if isinstance(end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
            yield Source(name, error=_truncated(members))
        elif not isinstance(end, tarfile.EOFHeaderError):
            yield Source(name, error=f"damaged after {_images(members)}: a bad tar header ({end}); the rest of the "
                                     "shard cannot be read")


def _truncated(members: int) -> str:
    return (f"truncated: the data ends after {_images(members)}, before the end-of-archive marker; the rest of "
            "the shard is lost")


def _images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


class _TarInfo(tarfile.TarInfo):
    """Remembers why the header reading stopped: `tarfile` ends a streamed
    archive quietly at a missing, cut or damaged header, which is how a
    truncated shard looks; only zero blocks are a proper end."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.vggembed_end = e
            raise


def _open_stream(name: str) -> BinaryIO:
    if _is_remote(name):
        fs, path = filesystem(name)
        return io.BufferedReader(_RemoteReader(name, fs, path), 1 << 20)
    return _open_local(name, "tar shard")


class _RemoteReader(io.RawIOBase):
    """A remote file read front to back (a tar shard).

    Over HTTP it is one streamed GET; elsewhere fsspec's file object, read in
    4 MiB blocks. A transient failure reopens it at the same offset (a ranged
    request; an HTTP server that ignores ranges is read again from the start,
    skipping what was read) instead of failing the whole shard. A shard has
    no deadline as a whole (it is large): each read from it has the deadline
    of one image read, over its attempts, and an HTTP stream that has come for
    RATE_WINDOW seconds or more must average the minimum rate.
    """

    def __init__(self, name, fs, path):
        self.name_, self.fs, self.path = name, fs, path
        self.http = name.split("://", 1)[0].lower() in ("http", "https")
        self.settings = remote_settings()
        self.pos = 0
        self.f = None  # the open file (fsspec) or response (HTTP)
        self.opened = 0.0  # HTTP: when the response came
        self.streamed = 0  # HTTP: bytes of the response read since

    def readable(self):
        return True

    def readinto(self, b) -> int:
        n = len(b)
        if self.http:
            async def attempt(progress):
                return await self._read_http(n, progress)
        else:
            async def attempt(progress):
                return await _in_thread(lambda: self._read_file(n))
        data = _wait(_retry(self.name_, attempt, self.settings, self.settings["deadline"]))
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)

    async def _read_http(self, n: int, progress: _Progress) -> bytes:
        try:
            if self.f is None:
                session = await self.fs.set_session()
                kwargs = dict(self.fs.kwargs)
                if self.pos:
                    kwargs["headers"] = {**(kwargs.get("headers") or {}), "Range": f"bytes={self.pos}-"}
                r = await session.get(self.fs.encode_url(self.path), **kwargs)
                self.f, self.opened, self.streamed = r, time.monotonic(), 0
                _check_status(r.status, r.reason, r.headers)
                skip = self.pos if r.status == 200 else 0  # the server ignores ranges
                while skip:
                    chunk = await r.content.read(min(skip, 1 << 20))
                    if not chunk:
                        raise _Failure(f"the shard is now shorter than the {self.pos} bytes already read")
                    skip -= len(chunk)
            progress.body = time.monotonic()
            data = await self.f.content.read(n)
            progress.received = len(data)
            self.streamed += len(data)
            elapsed = time.monotonic() - self.opened
            if elapsed >= RATE_WINDOW and self.streamed < self.settings["min_rate"] * elapsed:
                raise _Failure(f"too slow: {self.streamed} bytes in {elapsed:.0f} s, under the minimum of "
                               f"{self.settings['min_rate']:g} bytes/s ($VGGEMBED_MIN_RATE)")
            return data
        except BaseException:  # a failure, the deadline or an interrupt: the next attempt reopens
            self._drop()
            raise

    def _read_file(self, n: int) -> bytes:
        try:
            if self.f is None:
                self.f = self.fs.open(self.path, "rb", block_size=4 << 20)
                if self.pos:
                    self.f.seek(self.pos)
            return self.f.read(n)
        except BaseException:
            self._drop()
            raise

    def _drop(self):
        f, self.f = self.f, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def close(self):
        if self.http and self.f is not None:  # an aiohttp response is closed on its loop
            from fsspec.asyn import get_loop

            get_loop().call_soon_threadsafe(self._drop)
        else:
            self._drop()
        super().close()


def _reason(e: BaseException) -> str:
    return getattr(e, "problem", None) or str(e) or type(e).__name__


# ------------------------------------------------------------------- remote
def filesystem(url: str):
    """(fsspec filesystem, path) for a URL; one clear message when support is missing.

    Raises:
        ImageError: the URL holds a password, or fsspec cannot parse it.
        VGGEmbedError: fsspec or the protocol's package is not installed.
    """
    if urlsplit(url).password is not None:
        raise ImageError(redact(url), "has a password in the URL; vggembed does not take credentials from URLs "
                                      "(they would be written into the index): use ~/.netrc or the protocol's "
                                      "usual environment variables or config files")
    protocol = url.split("://", 1)[0].lower()
    fsspec = require_remote(url)
    options = {}
    if protocol in ("http", "https"):
        import aiohttp
        import aiohttp.http_exceptions

        timeout = remote_settings()["timeout"]
        options["client_kwargs"] = {"trust_env": True,  # proxies and ~/.netrc, as curl
                                    "timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                     sock_read=timeout)}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        raise VGGEmbedError(f"{redact(url)}: reading {protocol}:// needs its fsspec package: {e}") from None
    except ValueError as e:
        raise ImageError(redact(url), f"not a URL fsspec can read: {e}") from None


def require_remote(url: str):
    """fsspec, or a VGGEmbedError saying how to install it."""
    try:
        import fsspec
    except ImportError:
        raise VGGEmbedError(f"{redact(url)}: reading URLs needs fsspec: {REMOTE_EXTRA}") from None
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise VGGEmbedError(f"{redact(url)}: reading http(s) URLs needs aiohttp: {REMOTE_EXTRA}") from None
    return fsspec


def check_protocol(url: str) -> None:
    """Fail early, once per run, when a URL's protocol cannot be read here."""
    fsspec = require_remote(url)
    protocol = url.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise VGGEmbedError(f"{redact(url)}: unknown protocol {protocol}://") from None
    except ImportError as e:
        raise VGGEmbedError(f"{redact(url)}: reading {protocol}:// needs its fsspec package: {e}") from None


# The settings of remote reads: (environment variable, default, smallest allowed, type).
SETTINGS = {
    "attempts": ("VGGEMBED_RETRIES", 5, 1, int),  # attempts per read, the first included
    "delay": ("VGGEMBED_RETRY_DELAY", 0.5, 0.0, float),  # first backoff, doubled each retry, with jitter
    "timeout": ("VGGEMBED_TIMEOUT", 60.0, 0.001, float),  # HTTP: a connect, or a wait for the next bytes
    "deadline": ("VGGEMBED_DEADLINE", 120.0, 0.001, float),  # one image read, over all its attempts and waits
    "min_rate": ("VGGEMBED_MIN_RATE", 1024.0, 0.0, float),  # bytes/s a body must average, after RATE_WINDOW s
}
RATE_WINDOW = 10.0  # seconds a body comes before its rate is judged


def remote_settings() -> dict:
    """The settings of remote reads (`SETTINGS`), from the environment where set.

    Raises:
        VGGEmbedError: a setting that is not a number, or is too small.
    """
    out = {}
    for key, (var, default, least, kind) in SETTINGS.items():
        text = os.environ.get(var, "").strip()
        try:
            value = kind(text) if text else default
        except ValueError:
            value = None
        if value is None or not (value >= least) or value == float("inf"):
            raise VGGEmbedError(f"${var}={text!r}: expected {'a whole number' if kind is int else 'a number'} "
                                f"of at least {least:g}")
        out[key] = value
    return out


_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNO = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                              errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})


class _Failure(Exception):
    """One failed attempt, in words: why, whether another attempt may do better, and how long the
    server asked to wait first (Retry-After)."""

    def __init__(self, reason: str, transient: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.transient, self.retry_after = reason, transient, retry_after


async def _retry(name: str, attempt: Callable, settings: dict, deadline: float | None):
    """`await attempt(progress)` until it succeeds, fails for good, runs out of attempts or passes the deadline.

    Transient failures are retried with exponential backoff and jitter, or
    after the wait a server asks for (Retry-After) when that is longer. No
    wait runs past the deadline: a retry that could only start after it is
    not waited for. At the deadline the attempt under way is cancelled (its
    connection closed) and the error says what it had got.

    Args:
        name: the input, for the error.
        attempt: one attempt, given a fresh `_Progress` to fill.
        deadline: seconds for everything, or None for no bound but the attempts.

    Raises:
        ImageError: the permanent failure, the last transient one, or the deadline.
    """
    loop = asyncio.get_running_loop()
    end = None if deadline is None else loop.time() + deadline
    last = None
    for n in range(1, settings["attempts"] + 1):
        progress = _Progress()
        task = asyncio.ensure_future(attempt(progress))
        try:
            done, _ = await asyncio.wait({task}, timeout=None if end is None else max(0.0, end - loop.time()))
        finally:
            if not task.done():  # the deadline, or the whole read cancelled: stop this attempt too
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if not done:
            raise ImageError(name, _late(progress, last, deadline, time.monotonic() - progress.started))
        try:
            return task.result()
        except (ImageError, VGGEmbedError):
            raise
        except Exception as e:  # noqa: BLE001 - every protocol has its own exception types
            failure = _describe(e, progress, settings)
        if not failure.transient:
            raise ImageError(name, failure.reason)
        if n == settings["attempts"]:
            raise ImageError(name, f"{failure.reason} (gave up after {n} attempts)")
        wait = settings["delay"] * 2 ** (n - 1) * random.uniform(0.5, 1.0)
        if failure.retry_after is not None:
            wait = max(wait, failure.retry_after)
        if end is not None and loop.time() + wait >= end:
            if failure.retry_after is not None and failure.retry_after >= wait:
                raise ImageError(name, f"{failure.reason}: the server asks to retry in {failure.retry_after:.0f} s, "
                                       f"past the {deadline:g} s deadline for one read ($VGGEMBED_DEADLINE)")
            raise ImageError(name, f"{failure.reason} (gave up after {n} attempts, at the {deadline:g} s deadline "
                                   "for one read, $VGGEMBED_DEADLINE)")
        last = failure
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


def _late(progress: _Progress, last: _Failure | None, deadline: float, elapsed: float) -> str:
    """Why a read passed its deadline: a body coming too slowly, or no answer."""
    if progress.body is not None and not progress.received:
        return f"timed out: the answer's headers came, then no data for {time.monotonic() - progress.body:.0f} s, " \
               f"when the {deadline:g} s deadline for one read passed ($VGGEMBED_DEADLINE)"
    if progress.body is not None:
        return f"too slow: {progress.bytes()} in {elapsed:.0f} s, then the {deadline:g} s deadline for one read " \
               "passed ($VGGEMBED_DEADLINE)"
    earlier = f" (before that: {last.reason})" if last is not None else ""
    return f"timed out: no answer within the {deadline:g} s deadline for one read ($VGGEMBED_DEADLINE){earlier}"


def retrying(name: str, fn: Callable[[], _T]) -> _T:
    """fn() (a blocking call, such as a listing) on a thread, retried as a remote read is, with no
    deadline but its attempts (a listing may take long); an interrupt abandons it.

    Raises:
        ImageError: for a permanent failure at once, or the last transient one.
    """
    settings = remote_settings()

    async def attempt(progress):
        return await _in_thread(fn)

    return _wait(_retry(name, attempt, settings, None))


def _check_status(status: int, reason: str | None, headers) -> None:
    """Nothing for a success; for an HTTP error status, the `_Failure` it stands for."""
    if status < 400:
        return
    if status in (401, 403):
        raise _Failure(f"access denied (HTTP {status})")
    if status == 404:
        raise _Failure("not found")
    reason = " ".join(str(reason or "").split())[:100]  # a server's reason phrase may be anything
    if not reason:
        with contextlib.suppress(ValueError):
            reason = http.HTTPStatus(status).phrase
    raise _Failure(f"HTTP {status} {reason}".rstrip(), status in _TRANSIENT_STATUS or status >= 500,
                   _retry_after(headers))


def _retry_after(headers) -> float | None:
    """Seconds a Retry-After header asks to wait (a number or an HTTP date), if any."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _describe(e: BaseException, progress: _Progress | None = None, settings: dict | None = None) -> _Failure:
    """A failed attempt in words, never a library's repr."""
    if isinstance(e, _Failure):
        return e
    got = f" after {progress.bytes()}" if progress is not None and progress.body is not None else ""
    with contextlib.suppress(ImportError):
        import aiohttp
        import aiohttp.http_exceptions

        if isinstance(e, aiohttp.ClientError):
            return _describe_aiohttp(e, aiohttp, got, progress, settings or remote_settings())
    status = _status(e)
    if status is not None:
        try:
            _check_status(status, _message(e), getattr(e, "headers", None))
        except _Failure as failure:
            return failure
    if isinstance(e, FileNotFoundError):
        return _Failure("not found")
    if isinstance(e, PermissionError):
        return _Failure("access denied")
    if isinstance(e, IsADirectoryError):
        return _Failure("is a folder")
    if type(e).__name__ == "IncompleteReadError" and hasattr(e, "kwargs"):  # botocore: a body cut short
        return _Failure(f"cut short: {e.kwargs.get('actual_bytes')} of {e.kwargs.get('expected_bytes')} bytes, "
                        "then the connection closed", True)
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)) or type(e).__name__ in ("FSTimeoutError", "ReadTimeoutError",
                                                                                     "ConnectTimeoutError"):
        return _Failure(f"timed out{got}", True)
    if _errno(e) == errno.ECONNRESET:
        return _Failure(f"connection reset by the server{got}", True)
    if isinstance(e, ConnectionError) or (isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO):
        return _Failure(f"connection failed{got}: {_message(e)}", True)
    module = type(e).__module__ or ""
    if module.startswith(("botocore", "urllib3")) and "Connection" in type(e).__name__:
        return _Failure(f"connection failed{got}: {_message(e)}", True)
    return _Failure(_message(e))


def _describe_aiohttp(e, aiohttp, got: str, progress: _Progress | None, settings: dict) -> _Failure:
    if isinstance(e, aiohttp.TooManyRedirects):
        last = e.history[-1].headers.get("Location") if e.history else None
        if last:
            url = e.history[-1].url
            last = redact(str(url.join(type(url)(last))))  # a relative Location, made whole
        where = f"; the last one to {last}" if last else ""
        return _Failure(f"too many redirects ({len(e.history)}){where}")
    if isinstance(e, getattr(aiohttp, "RedirectClientError", ())):
        return _Failure(f"redirected to a URL that cannot be read: {redact(str(e.url))}")
    if isinstance(e, getattr(aiohttp, "InvalidUrlClientError", ())):
        return _Failure(f"not a URL that can be read: {redact(str(e.url))}")
    if isinstance(e, aiohttp.ClientResponseError):
        if isinstance(e.__cause__, aiohttp.http_exceptions.HttpProcessingError):  # aiohttp's own parse error
            what = _message(e.__cause__.message).split(":")[0]
            return _Failure(f"the server's answer is not valid HTTP{got} ({what})", True)
        if e.status >= 400:
            try:
                _check_status(e.status, e.message, e.headers)
            except _Failure as failure:
                return failure
        return _Failure(f"the server's answer is not valid HTTP{got}: {_message(e)}", True)
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        why = getattr(e.certificate_error, "verify_message", None) or _message(e.certificate_error)
        return _Failure(f"TLS error: the certificate of {e.host} is not trusted ({why})")
    if isinstance(e, (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError)):
        where = f" with {e.host}:{e.port}" if isinstance(e, aiohttp.ClientConnectorError) else ""
        ssl_error = e.os_error if isinstance(e, aiohttp.ClientConnectorError) else e
        reason = getattr(ssl_error, "reason", None)
        return _Failure(f"TLS error{where}: {reason.replace('_', ' ').lower() if reason else _message(ssl_error)}")
    if isinstance(e, aiohttp.ClientConnectorError):
        if isinstance(e, getattr(aiohttp, "ClientConnectorDNSError", ())) or isinstance(e.os_error, socket.gaierror):
            return _Failure(f"name not resolved: {e.host}")
        if e.os_error.errno == errno.ECONNREFUSED:
            return _Failure(f"connection refused by {e.host}:{e.port}", True)
        return _Failure(f"cannot connect to {e.host}:{e.port}: {e.os_error.strerror or _message(e.os_error)}", True)
    if isinstance(e, getattr(aiohttp, "ConnectionTimeoutError", ())):
        return _Failure(f"timed out connecting ($VGGEMBED_TIMEOUT={settings['timeout']:g} s)", True)
    if isinstance(e, aiohttp.ServerTimeoutError):
        return _Failure(f"timed out: no data for {settings['timeout']:g} s{got} ($VGGEMBED_TIMEOUT)", True)
    if _errno(e) == errno.ECONNRESET:
        return _Failure(f"connection reset by the server{got}", True)
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return _Failure(f"the server closed the connection{got or ' without an answer'}", True)
    if isinstance(e, aiohttp.ClientPayloadError):
        if "ConnectionResetError" in str(e):  # aiohttp names the reset only in its message
            return _Failure(f"connection reset by the server{got}", True)
        if progress is not None and progress.expected is not None and progress.received < progress.expected:
            return _Failure(f"cut short: {progress.bytes()}, then the connection closed", True)
        return _Failure(f"the body was cut{got}: {_message(e).split(':')[0]}", True)
    return _Failure(f"connection failed{got}: {_message(e)}", True)


def _errno(e: BaseException) -> int | None:
    """The errno of an exception or of one it was raised from."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(e, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    response = getattr(e, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


def _message(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())[:300]
