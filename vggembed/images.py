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
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import sources
from .errors import ImageError

RESIZE_MODES = ("squash", "center-crop", "none")
# Refuse images above this many pixels (Pillow's own bomb limit); a 4000x3000
# phone photo is 12 million. Raised with --max-pixels.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_rgb(source, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open an input as an 8-bit RGB PIL image.

    Args:
        source: a local path, a URL, a `sources.Source` (a tar member, say),
            raw encoded bytes, a binary file object, or a PIL image.
        max_pixels: images with more pixels are refused (decompression bombs).
        draft: let JPEG decode at a reduced scale whose size stays at least
            this (w, h). Faster on large photos; values change slightly.

    Raises:
        ImageError: naming the source and what is wrong.
    """
    name = sources.name_of(source)
    fp = None
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            fp = sources.open_binary(source)  # ImageError when it cannot be read (missing, a FIFO, a 404...)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(name, f"{w}x{h} is {w * h} pixels, over the limit of {max_pixels} "
                                   "(a decompression bomb?); raise it with --max-pixels")
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img, name)
    except ImageError:
        raise
    except UnidentifiedImageError:
        what = "empty file (0 bytes)" if sources.is_empty(fp) else "not an image Pillow can identify"
        raise ImageError(name, what) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"decompression bomb refused: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(name, f"cannot decode: {e}") from None
    finally:
        if fp is not None and fp is not source:
            fp.close()


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
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit (and 32-bit) grey: scale the 0..65535 range to 0..255.
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if mode != "F" else 1.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA") if mode in ("P", "PA") else img
        return img.convert("RGB")  # alpha dropped, as the seeds' imread(mode='RGB')
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(name, f"unsupported image mode {mode}: {e}") from None


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
    """Source (path, URL, `sources.Source`, bytes, PIL image or HxWx3 array in 0..255 RGB) -> HxWxC array.

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
    if arr.dtype == np.uint8:
        return resize(Image.fromarray(np.ascontiguousarray(arr), "RGB"), mode, size)
    # float input: resize each channel as a float image so nothing is rounded
    chans = [Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32), "F") for c in range(3)]
    return np.stack([np.asarray(_resize_pil(c, mode, size)) for c in chans], axis=-1)
