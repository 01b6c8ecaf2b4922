"""The split form of a bundle: each level's small embedding graph plus ONE transformer body shared by every level.

Why: a runtime holds one copy of each weight per session, so one session per level graph holds (and prepacks) the
transformer weights once per level. The body graph takes the level's tokens, the level index and a past KV cache
of any length (empty at level 0): one session serves every level, so its weights are in memory, prepacked, once,
and it runs the same kernels as the level graphs. The level-specific parameters are small: the patch embedding
(``embed{k}.onnx``) and the level's final LayerNorm (stacked in the body, picked by ``level``).

The level graphs stay in the bundle (every backend reads them); the split graphs share their bytes in
``weights.bin`` and are listed under the manifest's optional ``split`` entry.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from export.graphs import KINDS, PAST, PRESENT, trace_proto
from model.waveclip import WaveCLIP

LEVEL, TOKENS = "level", "tokens"


class EmbedGraph(nn.Module):
    """Level k's patches [batch, grid*grid, patch_dim] -> its tokens after ``ln_pre`` [batch, 1 + grid*grid, width]."""

    def __init__(self, model: WaveCLIP, level: int) -> None:
        super().__init__()
        self.model, self.level = model, level

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.model.ln_pre(self.model.embed_level(self.level, patches))


class BodyGraph(nn.Module):
    """(level, tokens, past k0, v0, ...) -> (embedding, present k0, v0, ...) for any level, past of any length."""

    def __init__(self, model: WaveCLIP) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("ln_weight", torch.stack([ln.weight for ln in model.ln_post]))
        self.register_buffer("ln_bias", torch.stack([ln.bias for ln in model.ln_post]))
        self.eps, self.width = model.ln_post[0].eps, model.config.width

    def forward(self, level: torch.Tensor, tokens: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, present = tokens, []
        for i, block in enumerate(self.model.blocks):
            x, kv = block(x, (past[2 * i], past[2 * i + 1]))
            present += list(kv)
        index = level.reshape(1)
        cls = F.layer_norm(x[:, 0], (self.width,), self.ln_weight.index_select(0, index)[0],
                           self.ln_bias.index_select(0, index)[0], self.eps)
        return (F.normalize(cls @ self.model.proj, dim=-1), *present)


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    return ([PAST % (i, kind) for i in range(layers) for kind in KINDS],
            [PRESENT % (i, kind) for i in range(layers) for kind in KINDS])


def export_embed(model: WaveCLIP, level: int, opset: int, batch: int = 2) -> onnx.ModelProto:
    cfg = model.config
    args = (torch.randn(batch, cfg.level_patches(level), cfg.patch_dim(level)),)
    return trace_proto(EmbedGraph(model, level), args, f"embed{level}", ["patches"], [TOKENS], opset)


def export_body(model: WaveCLIP, opset: int, batch: int = 2) -> onnx.ModelProto:
    cfg = model.config
    past_names, present_names = kv_names(cfg.layers)
    t = cfg.level_tokens(0)
    past = tuple(torch.randn(batch, cfg.heads, t, cfg.head_dim) for _ in past_names)
    args = (torch.tensor(1, dtype=torch.int64), torch.randn(batch, cfg.level_tokens(1), cfg.width), *past)
    axes = {n: {0: "batch", 2: "past"} for n in past_names} | {n: {0: "batch", 2: "total"} for n in present_names}
    if not cfg.uniform:  # the levels' token counts differ: the body takes any
        axes[TOKENS] = {0: "batch", 1: "tokens"}
    return trace_proto(BodyGraph(model), args, "body", [LEVEL, TOKENS, *past_names], ["embedding", *present_names],
                       opset, axes, scalars=(LEVEL,))


def split_entry(num_levels: int) -> dict:
    """The manifest's ``split`` entry (file names only; their sha256 go to ``files``)."""
    return {"embed": [{"level": k, "file": f"embed{k}.onnx"} for k in range(num_levels)],
            "body": {"file": "body.onnx", "inputs": [LEVEL, TOKENS, "past_key_values.*"],
                     "past": "any length, empty at level 0"}}


def validate_split(folder: Path, entry: dict, model: WaveCLIP, patches: list[np.ndarray], atol: float) -> dict:
    """Run every level through the split graphs in ONNX Runtime and compare with PyTorch's forward_level."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    body = ort.InferenceSession(str(folder / entry["body"]["file"]), opts, providers=["CPUExecutionProvider"])
    cfg = model.config
    past_names, present_names = kv_names(cfg.layers)
    batch = patches[0].shape[0]
    past_np = [np.zeros((batch, cfg.heads, 0, cfg.head_dim), np.float32) for _ in past_names]
    past_t, worst = None, []
    for e in entry["embed"]:
        k = e["level"]
        embed = ort.InferenceSession(str(folder / e["file"]), opts, providers=["CPUExecutionProvider"])
        tokens = embed.run(None, {"patches": patches[k].astype(np.float32)})[0]
        outs = body.run(None, {LEVEL: np.array(k, np.int64), TOKENS: tokens, **dict(zip(past_names, past_np))})
        with torch.no_grad():
            ref_emb, ref_kv = model.forward_level(k, torch.from_numpy(patches[k]).float(), past_t)
        ref = [ref_emb.numpy(), *[t.numpy() for pair in ref_kv for t in pair]]
        worst.append(max(float(np.abs(a - b).max()) for a, b in zip(outs, ref)))
        past_np, past_t = outs[1:], ref_kv
    return {"passed": all(w <= atol for w in worst), "max_abs_diff_per_level": worst, "atol": atol,
            "outputs_checked": ["embedding", *present_names]}
