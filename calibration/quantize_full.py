"""The int8 one-pass graph of an int8 bundle (export/full.py): quantized like the level graphs, on the same
calibration images (ONNX Runtime QDQ over the bundle's weights file, weight-only MatMulNBits, or OpenVINO IR by
NNCF). calibration.quantize checks its top-1 agreement against fp32 as it does for the level graphs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from calibration.backends import (WEIGHT_ONLY, WEIGHT_ONLY_SCHEME, WeightOnlyScheme, quantize_onnx, quantize_openvino,
                                  quantize_weight_only)
from calibration.reader import ItemsReader
from export.weights import SharedWeights, save_graph
from runtime.bundle import Bundle

BATCH = 8


def full_items(fp32: Bundle, patches: list[np.ndarray], batch: int = BATCH) -> list[dict[str, np.ndarray]]:
    """The one-pass graph's real inputs: every level's patches of the same images, ``batch`` rows an item."""
    names = fp32.manifest["full"]["inputs"]
    n = patches[0].shape[0]
    return [{name: np.ascontiguousarray(p[i:i + batch], dtype=np.float32) for name, p in zip(names, patches)}
            for i in range(0, n, batch)]


def write_full_int8(fp32: Bundle, patches: list[np.ndarray] | None, tmp: Path, scratch: Path, weights: SharedWeights,
                    scheme, method: str, ops: list[str], weight_only: WeightOnlyScheme = WEIGHT_ONLY_SCHEME) -> dict:
    """Write the int8 one-pass graph into ``tmp`` (data in ``weights``); the manifest entry."""
    entry = dict(fp32.manifest["full"])
    if method == WEIGHT_ONLY:
        proto = quantize_weight_only(fp32.full_path(), weight_only)
        entry["quantized"] = {"weight_only": True}
    else:
        proto = quantize_onnx(fp32.full_path(), ItemsReader(full_items(fp32, patches)), scratch / "full.int8.onnx",
                              scheme, method, ops, scratch)
        entry["quantized"] = {"calibration_images": int(patches[0].shape[0])}
    save_graph(weights.externalize(proto), tmp / entry["file"])
    onnx.checker.check_model(str(tmp / entry["file"]))
    return entry


# The one-pass graph's attention runs level by level (export/full.py): NNCF would quantize its activation x
# activation MatMuls (scores, weighted values; 8 a layer), which made the int8 pass 25% slower on OpenVINO (Intel
# Xeon with AMX, b16). They stay float, as NNCF leaves them in the level graphs.
ATTENTION_MATMULS = [r".*/attn/MatMul_\d+.*"]


def write_full_openvino(fp32: Bundle, patches: list[np.ndarray], tmp: Path, method: str, ops: list[str] | None,
                        progress: bool = False) -> dict:
    """The OpenVINO form: the NNCF-quantized one-pass IR (batch-1 calibration items)."""
    entry = {**fp32.manifest["full"], "file": "full.xml"}
    quantize_openvino(fp32.full_path(), full_items(fp32, patches, batch=1), tmp / entry["file"], method, ops,
                      progress=progress, ignore_patterns=ATTENTION_MATMULS)
    entry["quantized"] = {"calibration_images": int(patches[0].shape[0])}
    return entry
