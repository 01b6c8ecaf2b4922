"""Distillation losses: per-level cosine distance to the teacher embedding, optional KL on a head's logits and
optional dense (token-level) cosine to the teacher's feature map (``train.dense``); the optional label cross-entropy
and self-distillation (the last level teaching the earlier ones)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from train.dense import dense_loss


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher) over the batch (neither needs to be normalised)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T**2, averaged over the batch (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    log_target=True, reduction="batchmean") * (t * t)


@dataclass
class LossParts:
    total: torch.Tensor
    cosine: list[float]  # per level
    kl: list[float]  # per level (zeros when kl_weight == 0)
    dense: list[float]  # per level (zeros without dense targets)


def distill_loss(student: Sequence[torch.Tensor], teacher: torch.Tensor, level_weights: Sequence[float],
                 logits: Callable[[torch.Tensor], torch.Tensor] | None = None, kl_weight: float = 0.0,
                 temperature: float = 1.0, dense_pred: Sequence[torch.Tensor] | None = None,
                 dense_target: torch.Tensor | None = None, dense_weight: float = 0.0) -> LossParts:
    """Weighted mean over levels of cosine distance (+ ``kl_weight`` x KL through ``logits``, the head, + ``dense_weight``
    x dense cosine distance of level k's predicted tokens ``dense_pred[k]`` to ``dense_target``)."""
    use_kl = kl_weight > 0 and logits is not None
    use_dense = dense_weight > 0 and dense_pred is not None and dense_target is not None
    teacher_logits = logits(teacher).detach() if use_kl else None
    total, cos_parts, kl_parts, dense_parts = student[0].new_zeros(()), [], [], []
    for k, (w, s) in enumerate(zip(level_weights, student)):
        cos = cosine_distance(s, teacher)
        kl = kl_distill(logits(s), teacher_logits, temperature) if use_kl else cos.new_zeros(())
        dense = dense_loss(dense_pred[k], dense_target) if use_dense else cos.new_zeros(())
        total = total + w * (cos + kl_weight * kl + dense_weight * dense)
        cos_parts.append(cos.item())
        kl_parts.append(kl.item())
        dense_parts.append(dense.item())
    return LossParts(total, cos_parts, kl_parts, dense_parts)


def label_loss(student: Sequence[torch.Tensor], rows: torch.Tensor, level_weights: Sequence[float],
               logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Weighted sum over levels of the cross-entropy through ``logits`` of the images with a label (``rows`` >= 0,
    their class's row; -1: unlabelled); zero when the batch has none."""
    keep = rows >= 0
    if not bool(keep.any()):
        return student[0].new_zeros(())
    return sum(w * F.cross_entropy(logits(s[keep]), rows[keep]) for w, s in zip(level_weights, student))


def self_distill_loss(student: Sequence[torch.Tensor], level_weights: Sequence[float],
                      logits: Callable[[torch.Tensor], torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """The last level teaches the earlier ones: weighted sum over levels k < L-1 of KL(softmax(z_last / T) ||
    softmax(z_k / T)) * T**2 through ``logits``, the last level's logits detached (Phuong & Lampert, *Distillation-based
    training for multi-exit architectures*, ICCV 2019): an early level learns what the full model will answer, the
    decision an early exit replaces."""
    last = logits(student[-1]).detach()
    return sum(w * kl_distill(logits(s), last, temperature) for w, s in zip(level_weights[:-1], student[:-1]))


def entropy_loss(student: Sequence[torch.Tensor], level_weights: Sequence[float],
                 logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Weighted sum over levels of the mean entropy of the head softmax through ``logits`` (entropy minimisation,
    Grandvalet & Bengio, NeurIPS 2004): every image, labelled or not, is pushed away from a tie between classes, the
    images whose answer any rounding (int8) flips."""
    return sum(w * -(F.log_softmax(z, -1) * F.softmax(z, -1)).sum(-1).mean()
               for w, z in ((w, logits(s)) for w, s in zip(level_weights, student)))


def lr_at(step: int, total: int, base_lr: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to ``min_ratio * base_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
