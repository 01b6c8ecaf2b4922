"""Setting up a distillation run: the images, the head's labels, the student's initialisation, level weights, optimizer
groups, training precision, the batch of each step."""
from __future__ import annotations

import sys
from argparse import ArgumentTypeError
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.config import WaveCLIPConfig
from model.checkpoint import CheckpointError
from model.teachers import imagenet_classes, Teacher, TeacherError
from model.waveclip import WaveCLIP, gelu_mlp_state, resample_positions
from runtime.data import DataError, ImageRecord, load_images, read_image_list
from runtime.preprocess import ImageError
from runtime.wavelet import images_to_levels

REQUIRES_VIT_INIT = {"waveclip-b16"}  # too big to learn from scratch on a distillation set
NO_DECAY = {"cls_token", "level_embed", "pos_embed", "cls_pos_embed"}


class DistillError(ValueError):
    """A bad combination of arguments; the message is one line."""


def run_command(run: Callable[[], object]) -> int:
    """Exit status of a training command: 0 done, 2 bad input (its one-line error on stderr), 130 interrupted."""
    try:
        run()
    except (DistillError, DataError, TeacherError, CheckpointError, ImageError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def choose_labels(arg: str | None, records: list[ImageRecord], source: str) -> list[str]:
    """The head's label set: the data's sorted labels, all ImageNet-1k wnids, or a file's lines."""
    data_labels = sorted({r.label for r in records if r.label is not None})
    if arg is None:
        arg = "from-data" if data_labels else "imagenet1k"
    if arg == "imagenet1k":
        return [wnid for _, wnid, _ in imagenet_classes()]
    if arg == "from-data":
        if not data_labels:
            raise DistillError(f"--labels from-data: {source} has no label column (wnid or label)")
        return data_labels
    path = Path(arg).expanduser()
    if not path.is_file():
        raise DistillError(f"--labels {arg}: expected imagenet1k, from-data or an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"--labels {arg}: cannot read as UTF-8 text ({type(e).__name__})") from None
    labels = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not labels:
        raise DistillError(f"--labels {arg}: the file lists no labels")
    return labels


def init_student(cfg: WaveCLIPConfig, teacher: Teacher, preset: str) -> tuple[WaveCLIP, str]:
    """A new student; from the teacher's ViT weights when width, depth and heads match (see module docstring)."""
    model = WaveCLIP(cfg)
    vit = teacher.vit_state()
    if vit is not None:
        vit.setdefault("width", teacher.width)
        shape = (vit["width"], len(vit["blocks"]), vit.get("heads", cfg.heads))
        if shape == (cfg.width, cfg.layers, cfg.heads):
            model.init_from_vit(vit)
            return model, f"vit:{teacher.name}"
    if preset in REQUIRES_VIT_INIT:
        what = "not a ViT" if vit is None else "a ViT of width {}, {} layers, {} heads".format(*shape)
        raise DistillError(f"preset/teacher width mismatch: {preset} (width {cfg.width}, {cfg.layers} layers, "
                           f"{cfg.heads} heads) must start from a ViT teacher of the same shape; {teacher.name} is {what}")
    return model, "scratch"


def init_from_checkpoint(model: WaveCLIP, start: dict, path: Path, teacher: str, preset: str) -> tuple[str, list[int]]:
    """Load the student weights of ``start`` (``--init``, read from ``path``; patch statistics included) into
    ``model``; returns the provenance's ``init`` and the levels whose grid changed (``--level-grids``): those get a
    new patch embedding and need their patch statistics from the data; a new grid's position embedding starts as
    the checkpoint's resampled to it."""
    if start.get("teacher") != teacher or start["config"].get("name") != preset:
        raise DistillError(f"--init: {path} was trained with teacher {start.get('teacher')} and preset "
                           f"{start['config'].get('name')}, not {teacher} and {preset}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in start["state_dict"].items()}
    cfg = model.config
    try:
        old = WaveCLIPConfig.from_dict(start["config"])
    except (TypeError, ValueError) as e:
        raise DistillError(f"--init: {path} holds a config this version cannot read ({e})") from None
    if old.grid != cfg.grid or old.num_levels != cfg.num_levels:
        raise DistillError(f"--init: {path} has grid {old.grid} and {old.num_levels} levels, the student "
                           f"{cfg.grid} and {cfg.num_levels}")
    regrid = [k for k in range(cfg.num_levels) if old.level_grid(k) != cfg.level_grid(k)]
    fresh = model.state_dict()
    new = tuple(p for k in regrid for p in (f"patch_embed.{k}.", f"patch_shift_{k}", f"patch_scale_{k}"))
    state = {n: t for n, t in state.items() if not n.startswith(new)}  # a new tokenizer for these levels:
    state |= {n: t for n, t in fresh.items() if n.startswith(new)}  # the student's own initialisation
    for name in [n for n in fresh if n.startswith("pos_embed_grid.") and n not in state]:
        state[name] = resample_positions(state["pos_embed"], int(name.rsplit(".", 1)[1]))
    grow = not old.patch_hidden and cfg.patch_hidden  # linear -> two-layer embedding
    for k in range(cfg.num_levels if grow else 0):
        weight, bias = state.pop(f"patch_embed.{k}.weight", None), state.pop(f"patch_embed.{k}.bias", None)
        if weight is not None and bias is not None:
            state.update({f"patch_embed.{k}.{n}": t for n, t in gelu_mlp_state(weight, bias).items()})
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DistillError(f"--init: {path} does not fit the student ({str(e).splitlines()[0][:160]})") from None
    steps = start.get("provenance", {}).get("steps")
    grown = " (its linear patch embeddings grown into two-layer ones, same function)" if grow else ""
    regridded = f" (levels {regrid} on their new grids, with new patch embeddings)" if regrid else ""
    print(f"initialised the student from {path} ({steps} steps){grown}{regridded}", flush=True)
    return f"checkpoint:{path.name}@{steps}", regrid


def grid_list(text: str) -> tuple[int, ...]:
    """``4,4,4,8`` -> (4, 4, 4, 8) (argparse type: a bad value is a one-line usage error)."""
    try:
        grids = tuple(int(g) for g in text.split(","))
    except ValueError:
        raise ArgumentTypeError(f"{text!r}: comma-separated integers, one per level") from None
    if min(grids) < 1:
        raise ArgumentTypeError(f"{text!r}: grids are positive")
    return grids


def level_weights(arg: str | None, levels: int) -> list[float]:
    if arg is None:
        return [1.0 / levels] * levels
    try:
        w = [float(x) for x in arg.split(",")]
    except ValueError:
        raise DistillError(f"--level-weights {arg!r}: expected {levels} comma-separated numbers") from None
    if len(w) != levels or min(w) < 0 or sum(w) <= 0:
        raise DistillError(f"--level-weights {arg!r}: expected {levels} non-negative numbers with a positive sum")
    return [x / sum(w) for x in w]


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            (no_decay if p.ndim < 2 or name in NO_DECAY else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]




def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or ``auto`` on hardware with native bf16 (CUDA bf16, AVX512-BF16 or AMX CPUs)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def set_patch_stats(model: WaveCLIP, arrays: np.ndarray, spec: dict, max_images: int = 4096,
                    levels: list[int] | None = None) -> None:
    """Per-level, per-value mean and std of the training patches (a spread of ``max_images``) into the model (of
    ``levels`` only, when given)."""
    sample = arrays[:: max(1, len(arrays) // max_images)]
    for k, p in enumerate(images_to_levels(sample, spec)):
        if levels is not None and k not in levels:
            continue
        flat = torch.from_numpy(p.reshape(-1, p.shape[-1])).double()
        std = flat.std(0) if len(flat) > 1 else torch.ones(flat.shape[1], dtype=torch.float64)
        model.set_patch_stats(k, flat.mean(0).float(), std.clamp_min(1e-4).float())


def batch_at(step: int, n: int, batch_size: int, seed: int, views: int = 1
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices, mirror flags and view numbers (0: the plain image) of the batch at ``step``: epoch
    ``step // (n // batch_size)`` is a seeded permutation."""
    per_epoch = max(1, n // batch_size)
    epoch, j = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    perm, flips = rng.permutation(n), rng.random(n) < 0.5
    view = rng.integers(0, views, n) if views > 1 else np.zeros(n, np.int64)  # drawn last: views=1 batches unchanged
    idx = perm[j * batch_size:(j + 1) * batch_size]
    return idx, flips[idx], view[idx]


def load_set(source: str, split: str | None, limit: int | None, seed: int, spec: dict, what: str
             ) -> tuple[np.ndarray, list[ImageRecord], int]:
    """Images of ``source`` at the student's resolution; unreadable ones are counted, reported and skipped."""
    records = read_image_list(source, split, limit, seed)
    skipped: list[str] = []
    arrays, kept, n_skipped = load_images(records, spec, on_skip=lambda r, why: skipped.append(why))
    if n_skipped:
        print(f"{what}: skipped {n_skipped} unreadable image(s) of {len(records)} (first: {skipped[0]})", flush=True)
    if not kept:
        raise DistillError(f"{what}: no readable images in {source}")
    return arrays, kept, n_skipped
