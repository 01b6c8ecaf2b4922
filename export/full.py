"""The one-pass graph of a bundle: every level in ONE block-causal forward, every level's embedding out.

Why: the cascade runs the levels one by one so that an image can stop early; an image that goes to the last level
then pays one graph run per level, each over a level's few tokens (four 50-token passes for ``waveclip-b16``), which
runs below the rate of one pass over all of them and launches every kernel once per level. When no image can stop
early (the gate asks for every level, or calibration and evaluation want every level's embedding), the same
embeddings come from one pass over all the levels' tokens, block-causal: the ViT's shape of work. Its attention runs
level by level (each level's queries against the keys of the levels up to it: ``WaveCLIP.forward(blockwise=True)``),
not as one masked score matrix: a masked softmax drives exp() into underflow, which ONNX Runtime's CPU kernel takes
5x longer over (with the masking Where, 14 of 62 ms in an int8 b16 pass, against 2 ms level by level).

``full.onnx`` takes ``patches.{k}`` of every level and returns ``embedding.{k}`` of every level; its weights are
the level graphs' bytes in the bundle's ``weights.bin`` (listed under the manifest's optional ``full`` entry).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from export.graphs import FullGraph, trace_proto
from model.waveclip import WaveCLIP

FILE = "full.onnx"


def input_names(num_levels: int) -> list[str]:
    return [f"patches.{k}" for k in range(num_levels)]


def output_names(num_levels: int) -> list[str]:
    return [f"embedding.{k}" for k in range(num_levels)]


def full_entry(num_levels: int) -> dict:
    """The manifest's ``full`` entry (the file's sha256 goes to ``files``)."""
    return {"file": FILE, "inputs": input_names(num_levels), "outputs": output_names(num_levels),
            "note": "every level in one block-causal pass, no KV cache: for when every level is wanted"}


def export_full(model: WaveCLIP, num_levels: int, opset: int, batch: int = 2) -> onnx.ModelProto:
    """Trace the one-pass graph over levels 0..num_levels-1 (batch dynamic) with its weights in memory."""
    cfg = model.config
    args = tuple(torch.randn(batch, cfg.level_patches(k), cfg.patch_dim(k)) for k in range(num_levels))
    return trace_proto(FullGraph(model, num_levels, every_level=True), args, "full", input_names(num_levels),
                       output_names(num_levels), opset)


def validate_full(folder: Path, entry: dict, model: WaveCLIP, patches: list[np.ndarray], atol: float) -> dict:
    """Run the one-pass graph in ONNX Runtime and compare every level's embedding with PyTorch's cascade."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / entry["file"]), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {name: p.astype(np.float32) for name, p in zip(entry["inputs"], patches)})
    with torch.no_grad():
        ref = model.forward_cascade([torch.from_numpy(p).float() for p in patches[:len(entry["inputs"])]])
    worst = [float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref)]
    return {"passed": all(w <= atol for w in worst), "max_abs_diff_per_level": worst, "atol": atol,
            "outputs_checked": entry["outputs"]}
