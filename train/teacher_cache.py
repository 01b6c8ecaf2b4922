"""Teacher targets per image, computed once and cached on disk in chunks: the embedding and, for dense distillation,
the teacher's feature map pooled to the student's token grid; for the image and optionally its horizontal mirror.

Layout: ``CACHE_DIR/teacher/<key>/chunk_00000.pt`` ({"emb": [n, views, D], "dense": [n, views, grid*grid, C] or
absent}, float16) + ``meta.json``. The key hashes the teacher spec, a fingerprint of its weights (so changed weights or
a differently seeded random teacher miss the cache), the image list (absolute paths, sizes, labels), the views and
the dense grid (and, for augmented views, ``train.augment.Augment.describe``; for the student view, its spec); a
second run, a resume, or an interrupted teacher pass picks up what is there and computes only the missing chunks.
On a CPU the teacher runs in OpenVINO or ONNX Runtime after a parity check (``train.teacher_onnx``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from model.checkpoint import atomic_torch_save
from model.teachers import Teacher
from runtime.data import ImageRecord, records_digest
from runtime.preprocess import image_to_array, load_image, pixel_spec
from train.teacher_onnx import BF16, Encoder, onnx_encoder

if TYPE_CHECKING:
    from train.augment import Augment

CACHE_VERSION = 3  # 2: efficientnet-lite0 embeddings are centred; 3: chunks are dicts with dense maps
CHUNK = 1024


def default_cache_dir() -> Path:
    """$WAVECLIP_CACHE, else ~/.cache/waveclip-edge."""
    return Path(os.environ.get("WAVECLIP_CACHE") or Path.home() / ".cache" / "waveclip-edge").expanduser()


@torch.no_grad()
def teacher_fingerprint(teacher: Teacher) -> str:
    """Hash of the teacher's weights and buffers (exact and cheap; changed weights or a differently seeded random
    teacher miss the cache). Code changes that alter the embedding bump ``CACHE_VERSION``."""
    h = hashlib.sha256()
    for name, tensor in teacher.model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(teacher_spec: str, records: Sequence[ImageRecord], flip: bool, extra: str = "") -> str:
    text = f"v{CACHE_VERSION}|{teacher_spec}|{extra}|flip={flip}|{records_digest(records)}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class TeacherTargets:
    emb: torch.Tensor  # [N, views, D] float16, raw (not normalised)
    dense: torch.Tensor | None  # [N, views, grid*grid, C] float16, row-major over the grid, or None
    pixels: torch.Tensor | None = None  # augmented views only: the student's uint8 [N, views, S, S, 3]


def _load_chunk(path: Path, n: int, views: int, dim: int, dense_grid: int | None, size: int | None) -> dict | None:
    try:
        chunk = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing or damaged chunk: recompute it
        return None
    if not isinstance(chunk, dict) or not isinstance(chunk.get("emb"), torch.Tensor):
        return None
    if tuple(chunk["emb"].shape) != (n, views, dim):
        return None
    dense = chunk.get("dense")
    if dense_grid and dense is not None and tuple(dense.shape[:3]) != (n, views, dense_grid ** 2):
        return None
    if size and (not isinstance(chunk.get("pixels"), torch.Tensor)
                 or tuple(chunk["pixels"].shape) != (n, views, size, size, 3)):
        return None
    return chunk


def pool_map(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, grid*grid, C], adaptive average pooling, row-major over the grid."""
    return F.adaptive_avg_pool2d(fmap.float(), grid).flatten(2).transpose(1, 2)


def teacher_input(teacher: Teacher, images: list[Image.Image], student_view: dict | None) -> torch.Tensor:
    """The teacher's pixels: the student's square view resized whole (``student_view``: the student's spec; images
    already in it pass unchanged), else the file through the teacher's own preprocessing."""
    if student_view is None:
        return teacher.preprocess(images)
    return teacher.preprocess_square([Image.fromarray(image_to_array(im, student_view)) for im in images])


def _encode(teacher: Teacher, encoder: Encoder, records: Sequence[ImageRecord], views: int,
            dense_grid: int | None, augment: Augment | None = None, student_view: dict | None = None) -> dict:
    images = [load_image(r.path) for r in records]
    if augment is not None:  # view-major, like the mirror; each view cut from the full-resolution image
        per_image = [augment(im, r.path) for im, r in zip(images, records)]
        images = [per_image[i][v] for v in range(views) for i in range(len(records))]
        arrays = [image_to_array(im, augment.spec) for im in images]
        if student_view is not None:  # the student's pixels of each view
            images = [Image.fromarray(a) for a in arrays]
    elif views == 2:
        images += [ImageOps.mirror(im) for im in images]
    emb, fmap = encoder(teacher_input(teacher, images, student_view))
    out = {"emb": emb.float().cpu().reshape(views, len(records), -1).transpose(0, 1).half()}
    if augment is not None:
        pixels = torch.from_numpy(np.stack(arrays))
        out["pixels"] = pixels.reshape(views, len(records), *pixels.shape[1:]).transpose(0, 1).contiguous()
    if dense_grid and fmap is not None:
        dense = pool_map(fmap.cpu(), dense_grid)
        out["dense"] = dense.reshape(views, len(records), *dense.shape[1:]).transpose(0, 1).half()
    return out


def teacher_targets(teacher: Teacher, records: Sequence[ImageRecord], cache_dir: str | os.PathLike, *,
                    flip: bool = True, dense_grid: int | None = None, key_extra: str = "", batch_size: int = 64,
                    progress: bool = True, augment: Augment | None = None, student_view: dict | None = None,
                    backend: str = "auto") -> tuple[TeacherTargets, dict]:
    """Teacher targets (views: the image, then its mirror when ``flip``; or, with ``augment``, its augmented views
    and the student's pixels of each; dense maps pooled to ``dense_grid`` when given and the teacher has a map; with
    ``student_view`` (the student's preprocessing spec) the teacher sees the student's pixels of every view through
    ``Teacher.preprocess_square``, else the original file through ``Teacher.preprocess``) and
    stats: {"key", "images", "computed" (images run through the teacher now),
    "seconds", "images_per_s" (computed images, each with its views, per second; None when all came from the cache),
    "backend" (what ran the teacher: ``backend`` asks, ``train.teacher_onnx.onnx_encoder``)}. The key does not
    depend on the backend, but for ``openvino-bf16``, whose targets are bf16's."""
    if augment is not None:
        flip, key_extra = False, f"{key_extra}|{augment.describe()}"
    if student_view is not None:
        key_extra = f"{key_extra}|teacher_view=student|{pixel_spec(student_view)}"  # the pixels, not their tokens
    if backend == BF16:  # bf16 targets are not the fp32 ones that every other backend gives
        key_extra = f"{key_extra}|teacher_precision=bf16"
    extra = f"{teacher_fingerprint(teacher)}|{key_extra}|dense={dense_grid or 0}"
    key = cache_key(teacher.name, records, flip, extra)
    folder = Path(cache_dir).expanduser() / "teacher" / key
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": teacher.name, "extra": key_extra, "images": len(records), "flip": flip,
            "embed_dim": teacher.embed_dim, "dense_grid": dense_grid, "chunk": CHUNK, "version": CACHE_VERSION}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    views, dim = (augment.views if augment is not None else 1 + flip), teacher.embed_dim
    size = augment.spec["image_size"] if augment is not None else None
    chunks, computed, seconds = [], 0, 0.0
    encoder: Encoder | None = None
    ran = "cache"
    bar = tqdm(total=len(records), desc="teacher", unit="img", disable=not progress, mininterval=1.0)
    for start in range(0, len(records), CHUNK):
        part = records[start:start + CHUNK]
        path = folder / f"chunk_{start // CHUNK:05d}.pt"
        chunk = _load_chunk(path, len(part), views, dim, dense_grid, size)
        if chunk is None:
            t0 = time.perf_counter()
            if encoder is None:
                sample = teacher_input(teacher, [load_image(r.path) for r in part[:2]], student_view)
                encoder, ran = onnx_encoder(teacher, sample, torch.get_num_threads(), backend)
            pieces = []
            for i in range(0, len(part), batch_size):
                pieces.append(_encode(teacher, encoder, part[i:i + batch_size], views, dense_grid, augment,
                                      student_view))
                bar.update(len(part[i:i + batch_size]))
            chunk = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
            seconds += time.perf_counter() - t0
            computed += len(part)
            atomic_torch_save(chunk, path)
        else:
            bar.update(len(part))
        chunks.append(chunk)
    bar.close()
    emb = torch.cat([c["emb"] for c in chunks]) if chunks else torch.zeros(0, views, dim, dtype=torch.float16)
    dense = None
    if dense_grid and chunks and all("dense" in c for c in chunks):
        dense = torch.cat([c["dense"] for c in chunks])
    pixels = torch.cat([c["pixels"] for c in chunks]) if size and chunks else None
    stats = {"key": key, "images": len(records), "computed": computed, "seconds": round(seconds, 3),
             "images_per_s": round(computed / seconds, 2) if computed else None, "backend": ran}
    return TeacherTargets(emb, dense, pixels), stats


def with_augmented_views(teacher: Teacher, records: Sequence[ImageRecord], plain: TeacherTargets, arrays: np.ndarray,
                         cache_dir: str | os.PathLike, augment: Augment, *, dense_grid: int | None, batch_size: int,
                         student_view: dict | None, backend: str = "auto") -> tuple[TeacherTargets, np.ndarray, dict]:
    """``plain`` (one view per image) followed by ``augment``'s cached views: targets [N, 1 + K, ...], the student's
    pixels [N, 1 + K, S, S, 3] (view 0: ``arrays``, the plain images) and the augmented pass's stats (summed over the
    blocks; "key" lists each block's). The views are cached in blocks of ``VIEW_BLOCK`` (views 0-1, 2-3, ...), so
    asking for more views later runs the teacher on the new blocks only."""
    from train.augment import VIEW_BLOCK

    blocks, stats = [], []
    for first in range(augment.first, augment.first + augment.views, VIEW_BLOCK):
        views = min(VIEW_BLOCK, augment.first + augment.views - first)
        targets, block_stats = teacher_targets(teacher, records, cache_dir, dense_grid=dense_grid,
                                               batch_size=batch_size, augment=augment.block(first, views),
                                               student_view=student_view, backend=backend)
        blocks.append(targets)
        stats.append(block_stats)
    pixels = np.concatenate([arrays[:, None]] + [b.pixels.numpy() for b in blocks], axis=1)
    dense = None
    if plain.dense is not None and all(b.dense is not None for b in blocks):
        dense = torch.cat([plain.dense] + [b.dense for b in blocks], 1)
    computed, seconds = sum(s["computed"] for s in stats), sum(s["seconds"] for s in stats)
    merged = {"key": ",".join(s["key"] for s in stats), "images": len(records), "computed": computed,
              "seconds": round(seconds, 3), "images_per_s": round(computed / seconds, 2) if computed else None,
              "backend": ",".join(sorted({s["backend"] for s in stats}))}
    return TeacherTargets(torch.cat([plain.emb] + [b.emb for b in blocks], 1), dense), pixels, merged


def teacher_embeddings(teacher: Teacher, records: Sequence[ImageRecord], cache_dir: str | os.PathLike, *,
                       flip: bool = True, key_extra: str = "", batch_size: int = 64, progress: bool = True,
                       backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """Raw teacher embeddings [N, views, D] float16 and the stats of :func:`teacher_targets` (no dense maps)."""
    targets, stats = teacher_targets(teacher, records, cache_dir, flip=flip, key_extra=key_extra,
                                     batch_size=batch_size, progress=progress, backend=backend)
    return targets.emb, stats
