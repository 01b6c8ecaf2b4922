"""Held-out evaluation of a student against its teacher: per-level cosine and top-1 through the shared head."""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.teachers import Head, TeacherError, resolve_labels
from model.waveclip import WaveCLIP
from runtime.wavelet import images_to_levels


@torch.no_grad()
def student_embeddings(model: WaveCLIP, images: np.ndarray, batch_size: int = 128,
                       device: str | torch.device = "cpu", progress: str | None = None) -> list[torch.Tensor]:
    """uint8 images [N, S, S, 3] -> per-level embeddings [N, D] (CPU), through the numpy preprocessing; a progress
    bar on stderr named ``progress`` where given."""
    was_training = model.training
    model.eval()
    spec = model.config.preprocessing_spec()
    outs: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_levels)]
    for i in tqdm(range(0, len(images), batch_size), desc=progress, unit="batch", disable=not progress,
                  file=sys.stderr):
        patches = [torch.from_numpy(p).to(device) for p in images_to_levels(images[i:i + batch_size], spec)]
        for k, emb in enumerate(model(patches)):
            outs[k].append(emb.cpu())
    model.train(was_training)
    return [torch.cat(o) if o else torch.zeros(0, model.config.embed_dim) for o in outs]


def head_rows(head_labels: Sequence[str], labels: Sequence[str | None]) -> list[int | None]:
    """Row of each label in a head over ``head_labels`` (matched as ImageNet classes, so wnids and class names
    mix); None where a label is missing, not ImageNet, or not in the head."""
    row_of = {idx: row for row, idx in enumerate(resolve_labels(head_labels))}
    rows = []
    for label in labels:
        try:
            rows.append(row_of.get(resolve_labels([label])[0]) if label is not None else None)
        except TeacherError:
            rows.append(None)
    return rows


def evaluate(model: WaveCLIP, images: np.ndarray, teacher_emb: torch.Tensor, head: Head,
             rows: Sequence[int | None], device: str | torch.device = "cpu") -> dict:
    """{"images", "cosine" (per level mean cos to the teacher), "labelled", "student_top1" (per level),
    "teacher_top1"}; the top-1 fields are None when no image has a label in the head."""
    student = student_embeddings(model, images, device=device)
    teacher_emb = teacher_emb.float()
    result = {"images": len(images),
              "cosine": [round(F.cosine_similarity(s, teacher_emb, dim=-1).mean().item(), 4) for s in student]}
    keep = torch.tensor([r is not None for r in rows], dtype=torch.bool)
    target = torch.tensor([r for r in rows if r is not None], dtype=torch.long)
    result["labelled"] = int(keep.sum())
    if not keep.any():
        return {**result, "student_top1": None, "teacher_top1": None}

    def top1(emb: torch.Tensor) -> float:
        return round((head.logits(emb[keep]).argmax(-1) == target).float().mean().item(), 4)

    return {**result, "student_top1": [top1(s) for s in student], "teacher_top1": top1(teacher_emb)}
