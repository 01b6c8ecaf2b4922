"""Teacher embeddings per image (and its horizontal flip), computed once and cached on disk in chunks.

Layout: ``CACHE_DIR/teacher/<key>/chunk_00000.pt`` ([n, views, D] float16 each) + ``meta.json``. The key hashes the
teacher spec, a fingerprint of its outputs (so changed weights, code or a differently seeded random teacher miss the
cache), the image list (absolute paths, sizes, labels) and the views; a second run, a resume, or an interrupted teacher
pass picks up what is there and computes only the missing chunks.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from PIL import ImageOps
from tqdm import tqdm

from model.checkpoint import atomic_torch_save
from model.teachers import Teacher
from runtime.data import ImageRecord, records_digest
from runtime.preprocess import load_image

CACHE_VERSION = 2  # 2: efficientnet-lite0 embeddings are centred
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


def _load_chunk(path: Path, n: int, views: int, dim: int) -> torch.Tensor | None:
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing or damaged chunk: recompute it
        return None
    return t if isinstance(t, torch.Tensor) and tuple(t.shape) == (n, views, dim) else None


@torch.no_grad()
def _encode(teacher: Teacher, records: Sequence[ImageRecord], flip: bool) -> torch.Tensor:
    images = [load_image(r.path) for r in records]
    if flip:
        images += [ImageOps.mirror(im) for im in images]
    emb = teacher.encode_image(teacher.preprocess(images)).float().cpu()
    return emb.reshape(1 + flip, len(records), -1).transpose(0, 1)


def teacher_embeddings(teacher: Teacher, records: Sequence[ImageRecord], cache_dir: str | os.PathLike, *,
                       flip: bool = True, key_extra: str = "", batch_size: int = 64, progress: bool = True
                       ) -> tuple[torch.Tensor, dict]:
    """Raw teacher embeddings [N, views, D] float16 (views: the image, then its mirror when ``flip``) and stats:
    {"key", "images", "computed" (images run through the teacher now), "seconds", "images_per_s" (computed images,
    each with its flip, per second; None when all came from the cache)}."""
    key = cache_key(teacher.name, records, flip, f"{teacher_fingerprint(teacher)}|{key_extra}")
    folder = Path(cache_dir).expanduser() / "teacher" / key
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": teacher.name, "extra": key_extra, "images": len(records), "flip": flip,
            "embed_dim": teacher.embed_dim, "chunk": CHUNK, "version": CACHE_VERSION}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    views, dim = 1 + flip, teacher.embed_dim
    chunks, computed, seconds = [], 0, 0.0
    bar = tqdm(total=len(records), desc="teacher", unit="img", disable=not progress, mininterval=1.0)
    for start in range(0, len(records), CHUNK):
        part = records[start:start + CHUNK]
        path = folder / f"chunk_{start // CHUNK:05d}.pt"
        emb = _load_chunk(path, len(part), views, dim)
        if emb is None:
            t0 = time.perf_counter()
            pieces = []
            for i in range(0, len(part), batch_size):
                pieces.append(_encode(teacher, part[i:i + batch_size], flip))
                bar.update(len(pieces[-1]))
            emb = torch.cat(pieces).half()
            seconds += time.perf_counter() - t0
            computed += len(part)
            atomic_torch_save(emb, path)
        else:
            bar.update(len(part))
        chunks.append(emb)
    bar.close()
    out = torch.cat(chunks) if chunks else torch.zeros(0, views, dim, dtype=torch.float16)
    stats = {"key": key, "images": len(records), "computed": computed, "seconds": round(seconds, 3),
             "images_per_s": round(computed / seconds, 2) if computed else None}
    return out, stats
