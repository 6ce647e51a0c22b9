"""Retrieval descriptors of conv/pool maps: GeM and R-MAC, and unit-length rows.

- `gem` (generalized mean, Radenović, Tolias & Chum, "Fine-tuning CNN Image
  Retrieval with No Human Annotation", TPAMI 2018): per channel
  (mean over H, W of max(x, eps)^p)^(1/p) with p = 3: between average (p = 1)
  and max pooling (p -> inf). The map is clamped at eps as in the authors'
  code, which also makes it the ReLU'd map. Computed inside the network's
  graph (`model._pooled`).
- `rmac` (regional maximum activations of convolutions, Tolias, Sicre &
  Jégou, "Particular object retrieval with integral max-pooling of CNN
  activations", ICLR 2016): square regions at L = 3 scales (`rmac_regions`,
  the authors' sampling: at scale l, regions of side 2 min(H, W) / (l + 1)
  with about 40% overlap), the maximum of each channel over each region,
  each region vector L2-normalized, the region vectors summed, the sum
  L2-normalized. Without the PCA-whitening the paper learns on a separate
  image set (there is none to learn it from here): apply your own on the
  vectors if you have one. Computed in numpy on the map, since the regions
  follow each map's size.
"""

from __future__ import annotations

import math

import numpy as np

GEM_P = 3.0
EPS = 1e-6
RMAC_LEVELS = 3
RMAC_OVERLAP = 0.4


def rmac_regions(height: int, width: int, levels: int = RMAC_LEVELS) -> list[tuple[int, int, int]]:
    """Tolias et al.'s regions on a height x width map: (top, left, side), 0-based, largest first."""
    short = min(height, width)
    steps = np.arange(2, 8)  # the numbers of regions the long side may have
    b = (max(height, width) - short) / (steps - 1)
    extra = int(np.argmin(np.abs((short ** 2 - short * b) / short ** 2 - RMAC_OVERLAP))) + 1
    extra_w = extra if height < width else 0
    extra_h = extra if height > width else 0
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        step_w = (width - side) / (level + extra_w - 1) if level + extra_w > 1 else 0.0
        step_h = (height - side) / (level + extra_h - 1) if level + extra_h > 1 else 0.0
        lefts = [math.floor(half + i * step_w) - half for i in range(level + extra_w)]
        tops = [math.floor(half + i * step_h) - half for i in range(level + extra_h)]
        regions += [(top, left, side) for top in tops for left in lefts]
    return regions


def gem(maps: np.ndarray, p: float = GEM_P) -> np.ndarray:
    """GeM vectors (N, C) of maps (N, H, W, C), float32, as `model._pooled` computes them in the graph (used
    where the map is computed outside TensorFlow: int8)."""
    x = np.maximum(np.asarray(maps, np.float32), EPS)
    return (np.mean(x ** p, axis=(1, 2)) ** (1.0 / p)).astype(np.float32)


def rmac(maps: np.ndarray) -> np.ndarray:
    """R-MAC vectors (N, C) of maps (N, H, W, C), float32, unit length."""
    maps = np.asarray(maps, np.float32)
    n, height, width, channels = maps.shape
    total = np.zeros((n, channels), np.float32)
    for top, left, side in rmac_regions(height, width):
        v = maps[:, top: top + side, left: left + side, :].max(axis=(1, 2))
        total += v / (np.linalg.norm(v, axis=1, keepdims=True) + EPS)
    return total / (np.linalg.norm(total, axis=1, keepdims=True) + EPS)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (`--l2-normalize`); zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)
