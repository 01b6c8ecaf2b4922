"""Token-aligned CutMix for distillation from cached teacher targets.

A box of whole grid cells of one image is pasted into another. The box's edges fall on token borders, which are
multiples of 2**dwt_levels pixels, so the pasted Haar coefficients are exactly the partner's: the student's tokens
in the box *are* the partner's tokens. The teacher is not run again:
- the dense target takes the partner's cached feature-map cells inside the box (the teacher's map at a cell depends
  mostly on that cell; its receptive field makes this an approximation near the box edge);
- the pooled embedding target is the area-weighted mean of the two cached embeddings, and so (the head being linear)
  the KL target's logits are the area-weighted mean of the two images' logits: the label mixing of CutMix (Yun et
  al., 2019) in the teacher's embedding space.
Boxes and partners are a pure function of (seed, step), so ``--resume`` stays exact.
"""
from __future__ import annotations

import numpy as np
import torch


def cutmix_plan(batch: int, grid: int, prob: float, seed: int, step: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partner index, box ``(row, col, height, width)`` in grid cells and a mixed flag, per sample of the batch at
    ``step``. Box sides are uniform in 1..grid-1 (never the whole image); about ``prob`` of the samples are mixed."""
    rng = np.random.default_rng([seed, step, 0x6D1C])
    shift = int(rng.integers(1, batch)) if batch > 1 else 0
    partner = (np.arange(batch) + shift) % batch  # nobody is its own partner when batch > 1
    h = rng.integers(1, grid, batch) if grid > 1 else np.zeros(batch, np.int64)
    w = rng.integers(1, grid, batch) if grid > 1 else np.zeros(batch, np.int64)
    row, col = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
    mixed = (rng.random(batch) < prob) & (h > 0) & (partner != np.arange(batch))
    return partner, np.stack([row, col, h, w], 1), mixed


def cutmix(pixels: np.ndarray, emb: torch.Tensor, dense: torch.Tensor | None, grid: int, prob: float, seed: int,
           step: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
    """Mix a batch (see module docstring): pixels [B, S, S, 3], teacher embeddings [B, D] and maps [B, grid*grid, C]
    (or None) -> mixed copies. ``pixels`` and the targets must already carry each sample's own flip."""
    b, size = pixels.shape[0], pixels.shape[1]
    if prob <= 0 or b < 2:
        return pixels, emb, dense
    partner, boxes, mixed = cutmix_plan(b, grid, prob, seed, step)
    cell = size // grid
    out_px, out_emb = pixels.copy(), emb.clone()
    out_dense = None if dense is None else dense.clone().reshape(b, grid, grid, -1)
    src_dense = None if dense is None else dense.reshape(b, grid, grid, -1)
    for i in np.flatnonzero(mixed):
        j, (r, c, h, w) = partner[i], boxes[i]
        out_px[i, r * cell:(r + h) * cell, c * cell:(c + w) * cell] = pixels[j, r * cell:(r + h) * cell,
                                                                              c * cell:(c + w) * cell]
        area = float(h * w) / (grid * grid)
        out_emb[i] = (1.0 - area) * emb[i] + area * emb[j]
        if out_dense is not None:
            out_dense[i, r:r + h, c:c + w] = src_dense[j, r:r + h, c:c + w]
    return out_px, out_emb, None if out_dense is None else out_dense.reshape(dense.shape)
