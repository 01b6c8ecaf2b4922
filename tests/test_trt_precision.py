"""TensorRT precision on 8.5-10.x (builder flags) and 11.x (strongly typed: the fp16 copy of a level graph).

No GPU is needed: the fp16 copy is checked by running it in ONNX Runtime against the fp32 graph."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtime.backends.trt_precision import (BuildPlan, build_plan, engine_precision, fp16_graph, main,
                                            tensorrt_major)
from runtime.bundle import load_bundle


def test_flags_up_to_10_and_graphs_from_11():
    assert build_plan("fp16", 10) == BuildPlan(("FP16",), False)
    assert build_plan("int8", 8) == BuildPlan(("INT8", "FP16"), False)
    assert build_plan("fp32", 10) == BuildPlan((), False)
    # TensorRT 11 removed BuilderFlag.FP16 / INT8: no flags, fp16 from the graph, int8 from its Q/DQ nodes
    assert build_plan("fp16", 11) == BuildPlan((), True)
    assert build_plan("int8", 11) == BuildPlan((), False)
    assert build_plan("fp32", 12) == BuildPlan((), False)
    assert build_plan("fp16", 11, "fp16") == BuildPlan((), False)  # an fp16 bundle is in fp16 already
    assert [tensorrt_major(v) for v in ("10.3", "11.4.0.106", "8")] == [10, 11, 8]
    with pytest.raises(ValueError, match="expected MAJOR"):
        tensorrt_major("ten")
    with pytest.raises(ValueError, match="choose from"):
        build_plan("bf16", 10)


def test_engine_precision_follows_the_bundle():
    assert engine_precision(None, "fp32") == "fp16" and engine_precision(None, "int8") == "int8"
    assert engine_precision("fp32", "fp32") == "fp32"
    with pytest.raises(ValueError, match="needs an int8 QDQ bundle"):
        engine_precision("int8", "fp32")
    with pytest.raises(ValueError, match="builds int8 engines"):
        engine_precision("fp16", "int8")


def _feeds(level: dict, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i["name"]: rng.standard_normal([batch if d == "batch" else d for d in i["shape"]]).astype(np.float32)
            for i in level["inputs"]}


def test_fp16_copy_keeps_float32_io_and_the_graphs_outputs(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    k = bundle.num_levels - 1  # the deepest level: the longest KV cache in and out
    level = bundle.manifest["levels"][k]
    dst = fp16_graph(bundle.level_path(k), tmp_path / "half" / "level.onnx")
    assert sorted(p.name for p in dst.parent.iterdir()) == ["level.onnx", "level.onnx.weights"]
    half = onnx.load(str(dst))
    io = list(half.graph.input) + list(half.graph.output)
    assert {t.type.tensor_type.elem_type for t in io} == {onnx.TensorProto.FLOAT}
    float_weights = {t.data_type for t in half.graph.initializer} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert float_weights == {onnx.TensorProto.FLOAT16}
    feeds = _feeds(level)
    ref = ort.InferenceSession(str(bundle.level_path(k))).run(None, feeds)
    out = ort.InferenceSession(str(dst)).run(None, feeds)
    assert len(out) == len(ref) and all(o.dtype == np.float32 and o.shape == r.shape for o, r in zip(out, ref))
    emb, emb_ref = out[0], ref[0]
    cos = np.sum(emb * emb_ref, -1) / np.linalg.norm(emb, axis=-1) / np.linalg.norm(emb_ref, axis=-1)
    assert cos.min() > 0.999
    for o, r in zip(out[1:], ref[1:]):  # the KV cache: fp16 rounding of values of order 1
        assert np.abs(o - r).max() < 0.02 * max(1.0, np.abs(r).max())


def test_cli_writes_every_level_and_refuses_int8(tiny_bundle, tmp_path, capsys):
    assert main([str(tiny_bundle), str(tmp_path / "fp16")]) == 0
    levels = load_bundle(tiny_bundle).num_levels
    assert sorted(p.name for p in (tmp_path / "fp16").glob("*.onnx")) == [f"level{k}.onnx" for k in range(levels)]
    int8 = shutil.copytree(tiny_bundle, tmp_path / "int8")
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    (int8 / "manifest.json").write_text(json.dumps({**manifest, "precision": "int8"}))
    assert main([str(int8), str(tmp_path / "x")]) == 2
    assert "needs the fp32 bundle" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([str(tmp_path / "none"), str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
