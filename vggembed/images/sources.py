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
  protocol fsspec knows) is read through fsspec with retries and backoff
  for transient failures (timeouts, resets, 5xx, throttling); a 404 or an
  access refusal is that image's failure, never the run's end.

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
import errno
import io
import os
import random
import re
import tarfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
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


def read_bytes(name: str, stop: threading.Event | None = None) -> bytes:
    """The content of a URL (retried when the failure is transient), at most
    `MAX_IMAGE_BYTES`: a larger one is refused having read no more than that.

    Args:
        name: a URL.
        stop: once set, a failing remote read is not retried again.

    Raises:
        ImageError: naming the input and why it cannot be read.
    """
    fs, path = filesystem(name)
    read = _read_http if name.split("://", 1)[0].lower() in ("http", "https") else _read_file
    return retrying(name, lambda: read(name, fs, path), stop)


def too_large(size: int | None) -> str:
    """Why an input of `size` bytes (None: not known, only that it is over the limit) is refused."""
    limit = f"{MAX_IMAGE_BYTES >> 20} MiB"
    return f"{size} bytes: larger than an image may be ({limit})" if size is not None else \
        f"more than {limit}: larger than an image may be"


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


def _read_http(name: str, fs, path: str) -> bytes:
    """One GET, as fsspec's `cat_file` sends it, streamed: refused at its
    Content-Length, or once the body passes the limit. (`fs.open` would first
    spend a HEAD request per image on the size.)"""
    from fsspec.asyn import sync

    async def get():
        session = await fs.set_session()
        async with session.get(fs.encode_url(path), **fs.kwargs) as r:
            if r.status == 404:
                raise FileNotFoundError(path)
            r.raise_for_status()
            if r.content_length is not None and r.content_length > MAX_IMAGE_BYTES:
                raise ImageError(name, too_large(r.content_length))
            chunks, size = [], 0
            async for chunk in r.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise ImageError(name, too_large(None))
                chunks.append(chunk)
            return b"".join(chunks)

    return sync(fs.loop, get)


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

    Remote reads wait on the network, not the CPU, so they run on their own
    threads, ahead of the decoding pool: a slow server is hidden as long as
    `concurrency` reads in flight cover its latency. Local files and sources
    that already carry bytes pass through untouched. At most `concurrency`
    sources are held here, so memory stays bounded.
    """
    pool: ThreadPoolExecutor | None = None
    pending: collections.deque = collections.deque()
    stop = threading.Event()
    try:
        for source in sources:
            name = name_of(source)
            if _is_remote(name) and not (isinstance(source, Source)
                                         and (source.data is not None or source.error is not None)):
                if pool is None:
                    pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="vggembed-fetch")
                pending.append(pool.submit(_fetch, name, stop))
            else:
                pending.append(source)
            while pending and (len(pending) > concurrency or not isinstance(pending[0], Future)):
                yield _done(pending.popleft())
        while pending:
            yield _done(pending.popleft())
    finally:
        if pool is not None:
            # Ctrl-C must not wait for a slow server: reads not started are dropped,
            # reads under way are not retried, and nobody waits for them here.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)


def _fetch(name: str, stop: threading.Event) -> Source:
    try:
        return Source(name, data=read_bytes(name, stop))
    except ImageError as e:
        return Source(name, error=e.problem)


def _done(item):
    return item.result() if isinstance(item, Future) else item


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
            yield Source(name, error=e.problem)
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
        except (tarfile.TarError, OSError, EOFError, zlib.error, ImageError) as e:
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
    """A remote file read front to back; a transient failure reopens it at
    the same offset (a ranged request) instead of failing the whole shard."""

    def __init__(self, name, fs, path):
        self.name_, self.fs, self.path = name, fs, path
        self.pos = 0
        self.f = None

    def readable(self):
        return True

    def readinto(self, b) -> int:
        def attempt():
            if self.f is None:
                self.f = self.fs.open(self.path, "rb", block_size=4 << 20)
                if self.pos:
                    self.f.seek(self.pos)
            try:
                return self.f.read(len(b))
            except BaseException:
                self._drop()
                raise

        data = retrying(self.name_, attempt)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _drop(self):
        if self.f is not None:
            with contextlib.suppress(Exception):
                self.f.close()
            self.f = None

    def close(self):
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


def remote_settings() -> dict:
    """Retry and timeout settings, from the environment where set."""
    return {
        "attempts": max(1, int(os.environ.get("VGGEMBED_RETRIES", "5"))),
        "delay": float(os.environ.get("VGGEMBED_RETRY_DELAY", "0.5")),
        "timeout": float(os.environ.get("VGGEMBED_TIMEOUT", "60")),
    }


_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNO = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                              errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})


def retrying(name: str, fn: Callable[[], _T], stop: threading.Event | None = None) -> _T:
    """fn(), retried with exponential backoff and jitter while it fails transiently.

    Args:
        name: the input, for the error.
        fn: one attempt.
        stop: once set (the run is ending), no further attempt is made.

    Raises:
        ImageError: for a permanent failure at once, or the last transient one.
    """
    settings = remote_settings()
    stop = stop or threading.Event()
    for attempt in range(1, settings["attempts"] + 1):
        try:
            return fn()
        except (ImageError, VGGEmbedError):
            raise
        except Exception as e:  # noqa: BLE001 - every protocol has its own exception types
            transient, reason = classify_error(e)
            if not transient:
                raise ImageError(name, reason) from None
            if attempt == settings["attempts"]:
                raise ImageError(name, f"{reason} (gave up after {attempt} attempts)") from None
            if stop.wait(settings["delay"] * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)):
                raise ImageError(name, f"{reason} (the run ended before a retry)") from None
    raise AssertionError("unreachable")


def classify_error(e: BaseException) -> tuple[bool, str]:
    """(transient?, reason) for an exception from a remote read."""
    status = _status(e)
    if status is not None:
        if status in (401, 403):
            return False, f"access denied (HTTP {status})"
        if status == 404:
            return False, "not found (HTTP 404)"
        return status in _TRANSIENT_STATUS or status >= 500, f"HTTP {status}: {_message(e)}"
    if isinstance(e, FileNotFoundError):
        return False, "not found"
    if isinstance(e, PermissionError):
        return False, "access denied"
    if isinstance(e, IsADirectoryError):
        return False, "is a folder"
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)) or type(e).__name__ in ("FSTimeoutError", "ReadTimeoutError",
                                                                                     "ConnectTimeoutError"):
        return True, "timed out"
    if isinstance(e, ConnectionError) or (isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO):
        return True, f"connection failed: {_message(e)}"
    module = type(e).__module__ or ""
    if module.startswith("aiohttp") and any(t.__name__ in ("ClientConnectionError", "ClientPayloadError")
                                           for t in type(e).__mro__):
        return True, f"connection failed: {_message(e)}"
    if module.startswith(("botocore", "urllib3")) and "Connection" in type(e).__name__:
        return True, f"connection failed: {_message(e)}"
    return False, _message(e)


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
