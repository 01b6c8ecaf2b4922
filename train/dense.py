"""Dense (token-level) distillation: each student patch token predicts the teacher's feature map at its grid cell.

The teacher map is pooled to the student's grid when cached (``train.teacher_cache``); here it is standardised per
channel with statistics over the training set, and a training-only head (LayerNorm + Linear, shared by all levels)
maps the student's final patch-token states to the teacher's channels. The loss is the mean cosine distance per
token. The head is not part of the exported model: it only shapes the tokens the CLS attends to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseHead(nn.Module):
    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens))


def channel_stats(dense: torch.Tensor, max_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of cached maps [N, views, P, C] (over a spread of at most ``max_rows`` images)."""
    step = max(1, dense.shape[0] // max_rows)
    x = dense[::step].float().reshape(-1, dense.shape[-1])
    return x.mean(0), x.std(0).clamp_min(1e-6)


def mirror_grid(dense: torch.Tensor, grid: int) -> torch.Tensor:
    """Maps [B, grid*grid, C] of an image -> those of its horizontal mirror (columns reversed)."""
    b, p, c = dense.shape
    return dense.reshape(b, grid, grid, c).flip(2).reshape(b, p, c)


def pool_grid(tokens: torch.Tensor, grid: int, to: int) -> torch.Tensor:
    """[B, grid*grid, C] row-major -> [B, to*to, C]: each cell the mean of the finer cells it holds (``to`` divides
    ``grid``): a finer level's predictions at the grid of the cached teacher maps, whose cells are such means too."""
    if grid == to:
        return tokens
    b, _, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, grid, grid)
    return F.avg_pool2d(x, grid // to).reshape(b, c, to * to).transpose(1, 2)


def dense_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target); both [B, P, C]."""
    return (1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()
