"""Per-level wrappers around WaveCLIP and their ONNX export (TorchScript exporter, batch the only dynamic axis)."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from model.config import WaveCLIPConfig
from model.waveclip import WaveCLIP

DEFAULT_OPSET = 17
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript tracer)"
PAST = "past_key_values.%d.%s"
PRESENT = "present.%d.%s"
KINDS = ("key", "value")


def level_io(config: WaveCLIPConfig, level: int) -> tuple[list[dict], list[dict]]:
    """Manifest entries (name, shape, dtype) of level ``level``'s graph inputs and outputs; "batch" is symbolic."""
    h, hd, past = config.heads, config.head_dim, config.past_length(level)
    total = past + config.level_tokens(level)
    inputs = [{"name": "patches", "shape": ["batch", config.level_patches(level), config.patch_dim(level)],
               "dtype": "float32"}]
    if level:
        inputs += [{"name": PAST % (i, kind), "shape": ["batch", h, past, hd], "dtype": "float32"}
                   for i in range(config.layers) for kind in KINDS]
    outputs = [{"name": "embedding", "shape": ["batch", config.embed_dim], "dtype": "float32"}]
    outputs += [{"name": PRESENT % (i, kind), "shape": ["batch", h, total, hd], "dtype": "float32"}
                for i in range(config.layers) for kind in KINDS]
    return inputs, outputs


class LevelGraph(nn.Module):
    """Level k as a flat-I/O module: (patches, past k0, v0, k1, v1, ...) -> (embedding, present k0, v0, ...)."""

    def __init__(self, model: WaveCLIP, level: int) -> None:
        super().__init__()
        self.model, self.level = model, level

    def forward(self, patches: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kv = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)] or None
        emb, present = self.model.forward_level(self.level, patches, kv)
        return (emb, *[t for pair in present for t in pair])


class FullGraph(nn.Module):
    """Levels 0..n-1 without a cache (full block-causal forward) -> the last level's embedding, or with
    ``every_level`` each level's (the bundle's one-pass graph, export/full.py)."""

    def __init__(self, model: WaveCLIP, num_levels: int, every_level: bool = False) -> None:
        super().__init__()
        self.model, self.num_levels, self.every_level = model, num_levels, every_level

    def forward(self, *patches: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        embeddings = self.model(list(patches), blockwise=True)
        return tuple(embeddings) if self.every_level else embeddings[-1]


def _dummy(shape: list, batch: int) -> torch.Tensor:
    return torch.randn([batch if d == "batch" else d for d in shape])


def _set_shapes(proto: onnx.ModelProto, specs: list[dict]) -> None:
    """Overwrite the graph outputs' shapes with the exact static ones (the tracer leaves some symbolic)."""
    by_name = {s["name"]: s["shape"] for s in specs}
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        for d, value in zip(dims, by_name[out.name]):
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = value


def _trace(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], opset: int,
           axes: dict[str, dict[int, str]] | None = None, scalars: tuple[str, ...] = ()) -> None:
    """Export with axis 0 ("batch") dynamic for every input and output but ``scalars``, plus ``axes``."""
    dynamic = {n: {0: "batch"} for n in inputs + outputs if n not in scalars} | (axes or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes (shapes are static by design)
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True)


def trace_proto(module: nn.Module, args: tuple, name: str, inputs: list[str], outputs: list[str], opset: int,
                axes: dict[str, dict[int, str]] | None = None, scalars: tuple[str, ...] = ()) -> onnx.ModelProto:
    """``_trace`` into a temporary file and return the graph with its weights in memory."""
    with tempfile.TemporaryDirectory(prefix="waveclip-export-") as tmp, torch.no_grad():
        path = Path(tmp) / f"{name}.onnx"
        _trace(module.eval(), args, path, inputs, outputs, opset, axes, scalars)
        return onnx.load(str(path), load_external_data=True)


def export_level(model: WaveCLIP, level: int, opset: int = DEFAULT_OPSET, batch: int = 2) -> onnx.ModelProto:
    """Trace level ``level`` and return its graph with weights in memory (external data resolved)."""
    inputs, outputs = level_io(model.config, level)
    args = tuple(_dummy(s["shape"], batch) for s in inputs)
    proto = trace_proto(LevelGraph(model, level), args, f"level{level}", [s["name"] for s in inputs],
                        [s["name"] for s in outputs], opset)
    _set_shapes(proto, outputs)
    return proto


def export_full_graph(model: WaveCLIP, num_levels: int, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> None:
    """Export ONE graph computing levels 0..num_levels-1 with no cache (inputs ``patches.{k}``, output ``embedding``
    of the last level): the recompute baseline for benchmarks."""
    cfg = model.config
    names = [f"patches.{k}" for k in range(num_levels)]
    args = tuple(torch.randn(1, cfg.level_patches(k), cfg.patch_dim(k)) for k in range(num_levels))
    with torch.no_grad():
        _trace(FullGraph(model, num_levels).eval(), args, Path(path), names, ["embedding"], opset)
