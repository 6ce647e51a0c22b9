"""Decode any image people have into the RGB array VGG expects.

Every mode becomes 8-bit RGB the way a viewer would show it: EXIF rotation
applied, alpha dropped (as the seeds' `imread(mode='RGB')`), CMYK through its
ICC profile when it has one, 16-bit scaled to 8 bits instead of clipped.
Then one of three resize policies:

- `squash`: straight to the input size, aspect ignored, PIL bilinear (the
  seeds' `imresize`);
- `center-crop`: shorter side to 256/224 of the input size, then the centre
  (classifies more accurately than squashing);
- `none`: the image's own size (fully convolutional use of conv/pool layers).
"""

from __future__ import annotations

import io
import mmap
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from . import imagecheck, sources
from .safeio import NotAFileError, open_regular

RESIZE_MODES = ("squash", "center-crop", "none")
# Float images whose values lie in 0..1 give or take this much (rounding in the
# program that wrote them) are taken as 0..1.
FLOAT_SLACK = 1e-3
# Refuse images above this many pixels (Pillow's own bomb limit); a 4000x3000
# phone photo is 12 million. Raised with --max-pixels.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_rgb(source, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open an input as an 8-bit RGB PIL image.

    A path is opened only if it is a regular file (never a FIFO, socket or
    device, which could block forever). Before any pixel memory is
    allocated, the file's structure is checked against its declared size
    (`vggembed.imagecheck`), so a cut or forged file fails cheaply.

    Args:
        source: a local path, a URL, a `sources.Source` (a tar member, say), raw
            encoded bytes, a binary file object, or a PIL image.
        max_pixels: images with more pixels are refused (decompression bombs).
        draft: let JPEG decode at a reduced scale whose size stays at least
            this (w, h). Faster on large photos; values change slightly.

    Raises:
        ImageError: naming the source and what is wrong.
    """
    name = sources.name_of(source)
    try:
        if isinstance(source, (str, os.PathLike, sources.Source)):
            source = sources.resolve(source)  # bytes for a tar member or a URL (read with retries), else a local path
        if isinstance(source, Image.Image):
            _check_size(source, name, max_pixels)
            if draft is not None and source.format == "JPEG":
                source.draft("RGB", draft)
            source.load()
            return _to_rgb(ImageOps.exif_transpose(source), name)
        if not isinstance(source, (str, os.PathLike)):  # bytes (a tar member, a URL's content) or a file object
            if isinstance(source, (bytes, bytearray, memoryview)):
                data = bytes(source)
            else:  # a file object: never more read than an image may be
                data = source.read(sources.MAX_IMAGE_BYTES + 1)
                if len(data) > sources.MAX_IMAGE_BYTES:
                    raise ImageError(name, sources.too_large(None))
            if not data:
                raise ImageError(name, "empty file (0 bytes)")
            return _decode(io.BytesIO(data), data, name, max_pixels, draft)
        with open_regular(source, "image file") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ImageError(name, "empty file (0 bytes)")
            if size > sources.MAX_IMAGE_BYTES:  # before it is mapped or read: Pillow and the checks would walk it
                raise ImageError(name, sources.too_large(size))
            try:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError:  # a file system without mmap (some FUSE mounts)
                data = f.read()
                return _decode(io.BytesIO(data), data, name, max_pixels, draft)
            with data:
                return _decode(f, data, name, max_pixels, draft)
    except ImageError:
        raise
    except NotAFileError as e:
        raise ImageError(name, e.problem) from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image Pillow can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"decompression bomb refused: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(name, f"cannot decode: {e}") from None


def _decode(fp, data, name, max_pixels: int, draft) -> Image.Image:
    """Decode the encoded image `data`, read from `fp`, checking its structure first."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(fp)
    _check_size(img, name, max_pixels)
    try:
        jpeg = imagecheck.check(img.format, data)
    except imagecheck.BadStructure as e:
        raise ImageError(name, str(e)) from None
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", draft)
    img.load()
    if jpeg is not None and imagecheck.cut_scan_suspected(img, jpeg):
        # Decode again with junk before the end marker, which only a cut scan reads.
        again = Image.open(io.BytesIO(imagecheck.with_garbage_tail(data, jpeg)))
        if draft is not None and again.format == "JPEG":
            again.draft("RGB", draft)
        again.load()
        if again.tobytes() != img.tobytes():
            raise ImageError(name, "JPEG image data stops early, so part of the picture is missing (a cut file)")
    return _to_rgb(ImageOps.exif_transpose(img), name)


def _check_size(img: Image.Image, name, max_pixels: int) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(name, f"{w}x{h} is {w * h} pixels, over the limit of {max_pixels} "
                               "(a decompression bomb?); raise it with --max-pixels")


def _to_rgb(img: Image.Image, name) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "CMYK" and img.info.get("icc_profile"):
        from PIL import ImageCms

        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: fall back to Pillow's naive conversion
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (and 32-bit integer) grey: 0..65535 scaled to 0..255, above clipped.
        arr = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_levels(np.asarray(img, dtype=np.float64), name), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA") if mode in ("P", "PA") else img
        return img.convert("RGB")  # alpha dropped, as the seeds' imread(mode='RGB')
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(name, f"unsupported image mode {mode}: {e}") from None


def _float_levels(arr: np.ndarray, name) -> np.ndarray:
    """Float grey levels as uint8: 0..1 (the usual convention) scaled to 0..255,
    0..255 taken as they are; NaN, infinities or any other range are refused
    rather than guessed (a picture of them would be made up)."""
    finite = np.isfinite(arr)
    if not finite.all():
        raise ImageError(name, f"float image contains {arr.size - int(finite.sum())} NaN or infinite values")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= -FLOAT_SLACK and hi <= 1 + FLOAT_SLACK:
        arr = arr * 255.0
    elif not (lo >= -0.5 and hi <= 255.5):
        raise ImageError(name, f"float image has values from {lo:g} to {hi:g}; expected 0..1 or 0..255")
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def resize(img: Image.Image, mode: str, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """Apply a resize policy to an RGB image; returns HxWx3 uint8."""
    return np.asarray(_resize_pil(img, mode, size), dtype=np.uint8)


def _resize_pil(img: Image.Image, mode: str, size: tuple[int, int]) -> Image.Image:
    """The resize policies on any PIL image (RGB, or one float channel)."""
    w, h = size
    if mode == "none" or img.size == (w, h) and mode == "squash":
        return img
    if mode == "squash":
        return img.resize((w, h), Image.BILINEAR)
    if mode != "center-crop":
        raise ValueError(f"resize must be one of {RESIZE_MODES}; received {mode!r}")
    short = round(min(w, h) * 256 / 224)
    iw, ih = img.size
    scale = short / min(iw, ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def draft_size(mode: str, size: tuple[int, int]) -> tuple[int, int] | None:
    """The smallest decode size each resize policy can start from unchanged."""
    if mode == "squash":
        return size
    if mode == "center-crop":
        short = round(min(size) * 256 / 224)
        return (short, short)
    return None


def prepare(source, *, resize_mode: str = "squash", size=(224, 224), max_pixels=DEFAULT_MAX_PIXELS,
            fast_decode: bool = False) -> np.ndarray:
    """Source (path, bytes, PIL image or HxWx3 array in 0..255 RGB) -> HxWxC array.

    Arrays are resized as float (exact for float input); everything else
    goes through `load_rgb` and comes back uint8.
    """
    if isinstance(source, np.ndarray):
        return _prepare_array(source, resize_mode, size)
    draft = draft_size(resize_mode, size) if fast_decode else None
    img = load_rgb(source, max_pixels=max_pixels, draft=draft)
    return resize(img, resize_mode, size)


def _prepare_array(arr: np.ndarray, mode: str, size) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError("<array>", f"has shape {arr.shape}; expected HxW, HxWx3 or HxWx4")
    arr = arr[..., :3]
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError("<array>", "contains NaN or infinite values")
    if arr.dtype == np.uint8:
        return resize(Image.fromarray(np.ascontiguousarray(arr), "RGB"), mode, size)
    # float input: resize each channel as a float image so nothing is rounded
    chans = [Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32), "F") for c in range(3)]
    return np.stack([np.asarray(_resize_pil(c, mode, size)) for c in chans], axis=-1)
