"""The ``ckpt.pt`` format: a plain dict of tensors and builtins, always loaded with ``weights_only=True``."""
from __future__ import annotations

import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from model.config import WaveCLIPConfig
from model.waveclip import WaveCLIP

FORMAT = "waveclip-edge/checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable WaveCLIP checkpoint; the message is one line."""


def save_checkpoint(path: str | os.PathLike, model: WaveCLIP, head: dict, teacher: str,
                    provenance: dict | None = None, train_state: dict | None = None) -> None:
    """Write a checkpoint atomically (temporary file + rename).

    ``head``: {"class_names": [...], "labels": [...] (ids such as wnids), "weight": [N, D] tensor,
    "bias": [N] tensor, "logit_scale": float}.
    """
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "head": {
            "class_names": list(head["class_names"]),
            "labels": list(head.get("labels") or head["class_names"]),
            "weight": head["weight"].detach().cpu().float().contiguous(),
            "bias": head["bias"].detach().cpu().float().contiguous(),
            "logit_scale": float(head["logit_scale"]),
        },
        "teacher": teacher,
        "provenance": provenance or {},
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    atomic_torch_save(ckpt, Path(path))


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary sibling, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check a checkpoint dict. Refuses (CheckpointError) anything that is not ours or holds pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable torch checkpoint (not a torch.save zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        detail = unsafe[0][:160] if unsafe else "weights_only unpickler refused it"
        raise CheckpointError(f"{path}: refused, it holds pickled code or objects ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a WaveCLIP checkpoint (no '{FORMAT}' format marker)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {ckpt.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("config", "state_dict", "head"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> tuple[WaveCLIP, dict]:
    """Checkpoint -> (model in eval mode, checkpoint dict). The config, the weights' shapes and the head are checked
    before anything is allocated."""
    ckpt = read_checkpoint(path)
    try:
        if not isinstance(ckpt["config"], dict):
            raise TypeError(f"config is a {type(ckpt['config']).__name__}, not a dict")
        cfg = WaveCLIPConfig.from_dict(ckpt["config"])
        state = ckpt["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError("state_dict is not a dict of tensors")
        with torch.device("meta"):  # the shapes the config implies, without allocating them
            expected = {k: tuple(v.shape) for k, v in WaveCLIP(cfg).state_dict().items()}
        for k, shape in expected.items():  # checkpoints older than the patch standardisation: its identity
            if k.startswith(("patch_shift_", "patch_scale_")) and k not in state:
                state = {**state, k: (torch.zeros if "shift" in k else torch.ones)(shape)}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            name = next(k for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k))
            raise ValueError(f"{name}: weights {got.get(name, 'missing')}, config expects {expected.get(name, 'none')}")
        model = WaveCLIP(cfg)
        model.load_state_dict(state)
    except (ValueError, RuntimeError, TypeError) as e:
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{path}: config and weights do not fit ({detail})") from None
    _check_head(path, ckpt["head"], cfg.embed_dim)
    return model.eval(), ckpt


def _check_head(path: str | os.PathLike, head: Any, embed_dim: int) -> None:
    """class_names and labels (strings, as many as rows), weight [N, embed_dim], bias [N], a finite logit_scale."""
    def fail(reason: str) -> None:
        raise CheckpointError(f"{path}: head: {reason}")

    if not isinstance(head, dict):
        fail(f"expected a dict, got {type(head).__name__}")
    lists = {k: head.get(k) for k in ("class_names", "labels")}
    for key, values in lists.items():
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            fail(f"{key} must be a non-empty list of strings")
    n = len(lists["labels"])
    if len(lists["class_names"]) != n:
        fail(f"{len(lists['class_names'])} class names for {n} labels")
    for key, shape in (("weight", (n, embed_dim)), ("bias", (n,))):
        t = head.get(key)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
            fail(f"{key} must be a float tensor of shape {list(shape)} (labels x embed_dim)")
    scale = head.get("logit_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        fail(f"logit_scale must be a finite number, got {scale!r}")


def publish_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, half: bool = True) -> None:
    """Copy a checkpoint for shipping: no optimizer/train state, weights stored in fp16 (loaded back as fp32)."""
    ckpt = read_checkpoint(src)
    ckpt.pop("train_state", None)
    if half:
        ckpt["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        ckpt["provenance"] = {**ckpt.get("provenance", {}), "stored_dtype": "float16"}
    atomic_torch_save(ckpt, Path(dst))
