"""INT8 split graphs for an int8 bundle: the shared body (export/split.py) quantized once on real inputs of every
level, the small per-level embedding graphs kept in float (ONNX Runtime QDQ over the bundle's weights file, or
OpenVINO IR quantized by NNCF).

One body serves every level, so its activation ranges are calibrated over all levels' inputs together (``level``,
tokens and the real fp32 KV cache of the levels before), ``PER_LEVEL`` images a level. calibration.quantize checks
the top-1 agreement of this form against fp32 as it does for the level graphs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from calibration.backends import (WEIGHT_ONLY, WEIGHT_ONLY_SCHEME, WeightOnlyScheme, quantize_onnx, quantize_openvino,
                                  quantize_weight_only)
from calibration.reader import ItemsReader, level_feeds
from export.weights import SharedWeights, save_graph
from runtime.bundle import Bundle

PER_LEVEL = 64  # calibration images per level for the body (its KV inputs grow with the level)
BATCH = 8


def body_items(fp32: Bundle, patches: list[np.ndarray], per_level: int = PER_LEVEL, batch: int = BATCH
               ) -> list[dict[str, np.ndarray]]:
    """The body's real inputs at every level: (level, tokens from the fp32 embedding graph, fp32 past KV)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    kv = fp32.manifest["kv_cache"]
    past_names = fp32.kv_names(1)[0] if fp32.num_levels > 1 else []
    items: list[dict[str, np.ndarray]] = []
    rows = [p[:per_level] for p in patches]
    for k, feeds in enumerate(level_feeds(fp32, rows)):
        embed = ort.InferenceSession(str(fp32.embed_path(k)), opts, providers=["CPUExecutionProvider"])
        tokens = embed.run(None, {"patches": feeds["patches"]})[0]
        for i in range(0, tokens.shape[0], batch):
            n = min(batch, tokens.shape[0] - i)
            if k:  # every level's past inputs have the same names
                past = {name: feeds[name][i:i + n] for name in past_names}
            else:
                empty = np.zeros((n, kv["num_heads"], 0, kv["head_dim"]), np.float32)
                past = {name: empty for name in past_names}
            items.append({"level": np.array(k, np.int64), "tokens": tokens[i:i + n], **past})
    return items


def write_split_int8(fp32: Bundle, patches: list[np.ndarray] | None, tmp: Path, scratch: Path,
                     weights: SharedWeights, scheme, method: str, ops: list[str],
                     weight_only: WeightOnlyScheme = WEIGHT_ONLY_SCHEME) -> dict:
    """Write the int8 body and the float embedding graphs into ``tmp`` (data in ``weights``); the manifest entry."""
    entry = {**fp32.manifest["split"], "embed": [dict(e) for e in fp32.manifest["split"]["embed"]],
             "body": dict(fp32.manifest["split"]["body"])}
    for k, e in enumerate(entry["embed"]):
        proto = onnx.load(str(fp32.embed_path(k)), load_external_data=True)
        save_graph(weights.externalize(proto), tmp / e["file"])
    if method == WEIGHT_ONLY:
        proto = quantize_weight_only(fp32.body_path(), weight_only)
        entry["body"]["quantized"] = {"weight_only": True, "levels": fp32.num_levels}
    else:
        proto = quantize_onnx(fp32.body_path(), ItemsReader(body_items(fp32, patches)), scratch / "body.int8.onnx",
                              scheme, method, ops, scratch)
        entry["body"]["quantized"] = {"calibration_images_per_level": min(PER_LEVEL, patches[0].shape[0]),
                                      "levels": fp32.num_levels}
    save_graph(weights.externalize(proto), tmp / entry["body"]["file"])
    onnx.checker.check_model(str(tmp / entry["body"]["file"]))
    return entry


def write_split_openvino(fp32: Bundle, patches: list[np.ndarray], tmp: Path, method: str, ops: list[str] | None,
                         progress: bool = False) -> dict:
    """The OpenVINO form: float embedding IRs and the NNCF-quantized body IR (batch-1 calibration items)."""
    import openvino as ov

    split = fp32.manifest["split"]
    entry = {**split, "embed": [{**e, "file": f"embed{e['level']}.xml"} for e in split["embed"]],
             "body": {**split["body"], "file": "body.xml"}}
    for k, e in enumerate(entry["embed"]):
        ov.save_model(ov.convert_model(str(fp32.embed_path(k))), str(tmp / e["file"]), compress_to_fp16=False)
    quantize_openvino(fp32.body_path(), body_items(fp32, patches, batch=1), tmp / entry["body"]["file"], method, ops,
                      progress=progress)
    entry["body"]["quantized"] = {"calibration_images_per_level": min(PER_LEVEL, patches[0].shape[0]),
                                  "levels": fp32.num_levels}
    return entry
