"""Find weight files on disk, and fetch the published ones into a cache.

Lookup order when no path is given: $VGGEMBED_WEIGHTS, then ./weights/,
then the cache ($VGGEMBED_HOME, else $XDG_CACHE_HOME/vggembed, else
~/.cache/vggembed).

Downloads go to `NAME.download` beside the final file, resume from where a
cut transfer stopped (HTTP Range), are checked against the known size and
MD5, and are renamed into place only when whole and verified.
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DownloadError, VGGEmbedError
from ..store.destination import Destination
from .cache import cache_dir, cached_md5
from .registry import DEFAULT_FOR_ARCH, PUBLISHED, Published, file_md5


def search_folders() -> tuple[Path, Path]:
    """Where commands look for a published file by name, in order."""
    return Path("weights"), cache_dir()


def find_weights(model: str = "vgg16") -> Path:
    """The weight file to use when the user named none.

    Raises:
        VGGEmbedError: nothing found; the message names the fetch command.
    """
    env = os.environ.get("VGGEMBED_WEIGHTS")
    if env:
        if not Path(env).exists():
            raise VGGEmbedError(f"{env}: no such file (from $VGGEMBED_WEIGHTS)")
        return Path(env)
    name = DEFAULT_FOR_ARCH.get(model, model)
    if name not in PUBLISHED:
        raise VGGEmbedError(f"unknown model {model!r}; known: {', '.join(PUBLISHED)}")
    filename = PUBLISHED[name].filename
    for folder in search_folders():
        if (folder / filename).is_file():
            return folder / filename
    raise VGGEmbedError(
        f"no {name} weights found (looked for {filename} in $VGGEMBED_WEIGHTS, ./weights/ and {cache_dir()}); "
        f"run: vggembed weights fetch {name}   (or pass --weights PATH)"
    )


def find_by_md5(recipe, where) -> Path:
    """The weight file whose MD5 the recipe records: $VGGEMBED_WEIGHTS, then ./weights/ and the cache
    (the recorded file name first, then every other .npz/.mat there)."""
    candidates = []
    if os.environ.get("VGGEMBED_WEIGHTS"):
        candidates.append(Path(os.environ["VGGEMBED_WEIGHTS"]))
    folders = [f for f in search_folders() if f.is_dir()]
    if recipe.weights:
        candidates += [f / Path(recipe.weights).name for f in folders]
    candidates += sorted(p for f in folders for p in f.iterdir() if p.suffix.lower() in (".npz", ".mat"))
    seen = set()
    for c in candidates:
        if c in seen or not c.is_file():
            continue
        seen.add(c)
        if cached_md5(c) == recipe.weights_md5:
            return c
    raise VGGEmbedError(f"{where}: was made with {recipe.weights or 'weights'} (MD5 {recipe.weights_md5}), which "
                        "is not in $VGGEMBED_WEIGHTS, ./weights/ or the cache; pass --weights PATH")


def fetch(name: str, *, dest: Path | None = None, mirror: str | None = None, progress: bool = True,
          timeout: float = 60.0) -> Path:
    """Download a published weight file (and its companions) into `dest`.

    Args:
        name: a key of `registry.PUBLISHED` (vgg16, vgg19, ...).
        dest: the folder; default the cache.
        mirror: a base URL that holds the same file names (for machines that
            cannot reach the original hosts); default $VGGEMBED_MIRROR.
    Returns:
        The path of the weight file.
    """
    if name not in PUBLISHED:
        raise VGGEmbedError(f"unknown weights {name!r}; known: {', '.join(PUBLISHED)}")
    pub = PUBLISHED[name]
    dest = Path(dest) if dest else cache_dir()
    mirror = mirror or os.environ.get("VGGEMBED_MIRROR")
    target = dest / pub.filename
    # Held against a second fetch of the same file; a file-system error is one line naming the place
    # (network errors are DownloadErrors already).
    with Destination(target) as held, held.writing():
        for filename, url in pub.extras:
            _download(_url(url, filename, mirror), dest / filename, progress=progress, timeout=timeout)
        if target.exists() and (not pub.md5s or file_md5(target) in pub.md5s):
            return target
        _download(_url(pub.url, pub.filename, mirror), target, pub=pub, progress=progress, timeout=timeout)
    return target


def _url(url: str, filename: str, mirror: str | None) -> str:
    return mirror.rstrip("/") + "/" + filename if mirror else url


def _download(url: str, target: Path, *, pub: Published | None = None, progress: bool, timeout: float) -> None:
    from tqdm import tqdm

    part = target.with_name(target.name + ".download")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already whole
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: cannot connect: {getattr(e, 'reason', e)}") from None

    if response is not None:
        with response:
            if have and response.status != 206:  # server ignored Range: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=target.name,
                disable=not progress, file=sys.stderr,
            ) as bar:
                try:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(f"{url}: transfer cut short after {f.tell()} bytes ({e}); "
                                        "run the same command again to resume") from None
            got = part.stat().st_size
            if total is not None and got < total:
                raise DownloadError(f"{url}: transfer cut short at {got} of {total} bytes; "
                                    "run the same command again to resume")

    if pub is not None:
        size = part.stat().st_size
        if pub.size is not None and size != pub.size:
            part.unlink()
            raise DownloadError(f"{target}: downloaded {size} bytes, expected {pub.size}; the partial file was removed")
        if pub.md5s:
            md5 = file_md5(part)
            if md5 not in pub.md5s:
                part.unlink()
                raise DownloadError(f"{target}: MD5 {md5} does not match the published {', '.join(pub.md5s)}; "
                                    "the download was removed")
    os.replace(part, target)
