"""bench/roofline.py: the bytes and FLOPs it charges each graph, and one run of its table on the tiny bundle."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.backends.ort import OnnxRuntimeBackend
from runtime.bundle import load_bundle

from bench_module import load_bench

REPO = Path(__file__).resolve().parents[1]
R = load_bench("roofline")


def test_weight_bytes_counts_initializers_as_stored(tmp_path):
    path = R.matmul_chain([32, 128, 32], tmp_path / "mlp.onnx")
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    assert R.weight_bytes(path) == sum(w.nbytes for w in weights) == 2 * 32 * 128 * 4
    q = R.quantized(path, 8, tmp_path)  # int8 weights: a quarter, plus scales and zero points
    assert 2 * 32 * 128 <= R.weight_bytes(q) < 0.3 * R.weight_bytes(path)
    x = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99  # the probe really computes the same product


def test_kv_bytes_are_the_past_read_and_present_written(tiny_bundle, sample_images):
    from runtime.preprocess import preprocess

    bundle = load_bundle(tiny_bundle)
    backend = OnnxRuntimeBackend(bundle, providers=["CPUExecutionProvider"], io_binding=False)
    patches = preprocess(sample_images[:1], bundle.preprocessing)
    past = None
    for k in range(bundle.num_levels):
        read = sum(np.asarray(p).nbytes for p in past) if past else 0
        _, past = backend.run_level(k, patches[k], past)
        assert R.kv_bytes(bundle, k) == read + sum(np.asarray(p).nbytes for p in past)


def _toy_vit(path: Path) -> Path:
    """A single-input stand-in for the ViT baseline ([B, 3, 224, 224] -> [B, 8])."""
    w = numpy_helper.from_array(np.ones((3, 8), np.float32), "w")
    nodes = [helper.make_node("ReduceMean", ["pixels"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["y"])]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                                                           ["b", 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_table_on_the_tiny_bundle(tiny_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "GEMV_FP32", (512, 512))  # keep the bandwidth probe small here
    out = tmp_path / "roofline.json"
    argv = [str(tiny_bundle), "--vit", str(_toy_vit(tmp_path / "vit.onnx")), "--rounds", "2", "--json", str(out)]
    assert R.main(argv) == 0
    (r,) = json.loads(out.read_text())
    bundle = load_bundle(tiny_bundle)
    rows = r["rows"]
    assert [x["graph"] for x in rows] == [f"level {k}" for k in range(bundle.num_levels)] + ["ViT-B-16"]
    for x, lv in zip(rows, bundle.manifest["levels"]):
        assert x["gflops"] == lv["gflops"]
        assert x["mib"] * 2**20 == R.weight_bytes(bundle.level_path(lv["level"])) + R.kv_bytes(bundle, lv["level"])
    for x in rows:
        assert x["floor_ms"] == max(x["compute_floor_ms"], x["memory_floor_ms"]) > 0 and x["measured_ms"] > 0
    full = sum(x["measured_ms"] for x in rows[:-1]) / rows[-1]["measured_ms"]
    assert r["always_full_over_vit"]["measured"] == pytest.approx(full)
    assert "| level 0 |" in capsys.readouterr().out


def test_refuses_openvino_bundles(tmp_path, tiny_bundle, capsys):
    import shutil

    copy = tmp_path / "ov"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["graph_format"] = "openvino"
    (copy / "manifest.json").write_text(json.dumps(m))
    assert R.main([str(copy), "--vit", str(_toy_vit(tmp_path / "vit.onnx"))]) == 2
    assert "covers ONNX Runtime bundles" in capsys.readouterr().err
