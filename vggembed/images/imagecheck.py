"""Check an encoded JPEG or PNG's structure before any pixel memory is allocated.

Pillow allocates the whole picture its header declares, and libjpeg turns a
scan that stops early into grey blocks with only a warning, which Pillow
discards. So before decoding, the file's own bytes are walked (markers and
chunks only, at C speed) and a file is refused when:

- a JPEG has no scan, or its last scan runs to the end of the file with no
  end-of-image marker (a cut file, whatever `ImageFile.LOAD_TRUNCATED_IMAGES`
  says);
- a progressive JPEG stops before every coefficient of every component has
  been sent in full (a file cut between scans and given back its end marker);
- the declared size cannot fit in the data that is there. The bounds are what
  the coding itself makes impossible to beat, so no real file violates them:
  a Huffman-coded JPEG spends at least one bit per 8x8 block on the DC
  coefficient of its full-resolution component, and deflate (PNG) expands at
  most 1032:1. A 2 KB JPEG can therefore declare at most about 1 million
  pixels, whatever its header says. Arithmetic-coded JPEGs, WebP, GIF, TIFF
  and the rest can legitimately code a flat picture in almost no bytes: for
  them only --max-pixels bounds memory.

A JPEG cut inside its last scan and given back an end marker is only
visible after decoding (a sequential JPEG's tail comes out mid-grey, a
progressive one's last refinement is missing): `cut_scan_suspected` and
`with_garbage_tail` let `decode.load_rgb` confirm it with a second decode,
which a sequential JPEG needs only when its bottom-right corner is mid-grey.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

# A marker that ends entropy-coded data: 0xFF followed by anything but a
# stuffed zero, a restart marker RST0..7 or another fill 0xFF.
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
DEFLATE_MAX_RATIO = 1032
# Inserted before a JPEG's end marker to tell a complete scan (the bytes are
# skipped as junk before the marker) from a cut one (they are decoded as data
# and change the picture). No 0xFF, so no marker.
_GARBAGE = bytes(range(255)) * 4


class BadStructure(ValueError):
    """The file's structure shows it is cut or forged; the message says how."""


@dataclass
class Jpeg:
    width: int
    height: int
    sampling: tuple[int, int]  # largest horizontal, vertical sampling factors
    arithmetic: bool
    progressive: bool
    eoi: int  # offset of the end-of-image marker that ends the last scan
    scans: list = field(default_factory=list)


def check(fmt: str | None, data) -> Jpeg | None:
    """Walk `data` (bytes, memoryview or mmap) of an image Pillow identified as `fmt`.

    Returns the JPEG's layout for a JPEG (for `cut_scan_suspected`), else None.

    Raises:
        BadStructure: a cut file, or one whose declared size its data cannot hold.
    """
    if fmt in ("JPEG", "MPO"):
        return _check_jpeg(data)
    if fmt == "PNG":
        _check_png(data)
    return None


def _check_jpeg(data) -> Jpeg:
    n, pos = len(data), 2
    frame, progressive, lossless, coverage, scans = None, False, False, {}, []
    dc_bits = 0
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            raise BadStructure("ends before its end-of-image marker (a truncated file)")
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x00:
            pos += 1
            continue
        if marker == 0xD9:
            break
        if marker in _STANDALONE or marker == 0xD8:
            pos += 2
            continue
        if pos + 4 > n:
            raise BadStructure("ends inside a header (a cut file)")
        length = struct.unpack(">H", data[pos + 2: pos + 4])[0]
        body = bytes(data[pos + 4: pos + 2 + length])
        if pos + 2 + length > n or length < 2:
            raise BadStructure("ends inside a header (a cut file)")
        if marker in _SOF and len(body) >= 6:
            height, width, ncomp = struct.unpack(">HHB", body[1:6])
            comps = [body[6 + 3 * i: 9 + 3 * i] for i in range(ncomp)]
            if any(len(c) < 3 for c in comps):
                raise BadStructure("has a frame header shorter than its component count")
            sampling = (max(c[1] >> 4 for c in comps), max(c[1] & 15 for c in comps))
            frame = Jpeg(width, height, sampling, arithmetic=marker >= 0xC9, progressive=marker in _PROGRESSIVE, eoi=-1)
            progressive, lossless = marker in _PROGRESSIVE, marker in _LOSSLESS
            coverage = {c[0]: [None] * 64 for c in comps}
        pos += 2 + length
        if marker != 0xDA:
            continue
        if frame is None:
            raise BadStructure("has a scan before its frame header")
        ns = body[0] if body else 0
        ids = [body[1 + 2 * i] for i in range(ns) if 2 + 2 * i <= len(body)]
        ss, se, a = body[1 + 2 * ns: 4 + 2 * ns] if len(body) >= 4 + 2 * ns else (0, 63, 0)
        end = _END_OF_SCAN.search(data, pos)
        if end is None:
            raise BadStructure("ends inside its image data with no end-of-image marker (a truncated file)")
        nbytes = end.start() - pos
        scans.append(nbytes)
        if lossless or ss == 0:
            dc_bits += 8 * nbytes
        if progressive:
            for cid in ids:
                for k in range(ss, min(se, 63) + 1):
                    if cid in coverage:
                        coverage[cid][k] = a & 15  # Al: the lowest bit sent so far
        pos = end.start()
    if frame is None or not scans:
        raise BadStructure("holds no image data (a header only)")
    frame.eoi, frame.scans = pos, scans
    if progressive and any(al != 0 for bits in coverage.values() for al in bits):
        raise BadStructure("is a progressive JPEG that stops before its last scan (a cut file)")
    if not frame.arithmetic and frame.width and frame.height:
        blocks = -(-frame.width // 8) * -(-frame.height // 8)
        if dc_bits < blocks:
            raise BadStructure(
                f"declares {frame.width}x{frame.height} pixels but holds {sum(scans)} bytes of image data, "
                f"fewer than any complete JPEG of that size ({-(-blocks // 8)} at least): a cut or forged file")
    return frame


def _check_png(data) -> None:
    n, pos, idat, header = len(data), 8, 0, None
    while pos + 8 <= n:
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        if kind == b"IHDR" and length >= 13:
            header = struct.unpack(">IIBBBBB", data[pos + 8: pos + 21])
        elif kind == b"IDAT":
            idat += length
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        return  # Pillow reports that itself
    width, height, depth, colour = header[:4]
    need = -(-width * height * depth * _PNG_CHANNELS.get(colour, 1) // 8)
    if need > DEFLATE_MAX_RATIO * idat + 64:
        raise BadStructure(
            f"declares {width}x{height} pixels but holds {idat} bytes of image data, which cannot inflate "
            f"to the {need} bytes that needs (deflate expands at most {DEFLATE_MAX_RATIO}:1): a cut or forged file")


def cut_scan_suspected(img, layout: Jpeg) -> bool:
    """Whether a decoded JPEG (a PIL image) needs `with_garbage_tail` to tell
    whether its last scan was cut: always for a progressive JPEG (a cut last
    scan only lowers the precision of some blocks), else when the
    bottom-right corner is the flat mid-grey (127/128 in every channel) that
    libjpeg fills a missing scan tail with."""
    if layout.progressive:
        return True
    w, h = img.size
    corner = img.crop((max(0, w - 4), max(0, h - 4), w, h)).tobytes()
    return corner.strip(b"\x7f\x80") == b""


def with_garbage_tail(data, layout: Jpeg) -> bytes:
    """The JPEG up to its end marker with junk bytes before the marker.

    A complete scan decodes to the same picture (libjpeg skips junk before a
    marker); a cut scan decodes the junk as data, so the picture changes.
    """
    return bytes(data[: layout.eoi]) + _GARBAGE + b"\xff\xd9"
