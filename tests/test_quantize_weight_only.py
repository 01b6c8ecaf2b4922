"""calibration.quantize --method weight-only: int8 weights (ONNX Runtime MatMulNBits), float activations."""
import json

import numpy as np
import onnx
import pytest

from calibration import quantize as Q
from runtime.backends import BackendError, create_backend
from runtime.bundle import load_bundle, validate_manifest
from runtime.cascade import Cascade
from runtime.preprocess import preprocess


@pytest.fixture(scope="module")
def tiny_csv(data_dir):
    path = data_dir / "tiny-imagenet-200" / "labels.csv"
    if not path.is_file():
        pytest.skip("tiny-imagenet-200 not found")
    return path


def _args(bundle, csv, out, *extra) -> list[str]:
    return [str(bundle), "--data", str(csv), "--split", "train", "--eval-samples", "48", "--method", "weight-only",
            "-o", str(out), "-q", *extra]


@pytest.fixture(scope="module")
def weight_only(tiny_bundle, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("wo") / "int8"
    # A random tiny model's top-1/top-2 margins are tiny: 1 of the 48 images flips at level 0 (cosine 0.99996)
    assert Q.main(_args(tiny_bundle, tiny_csv, out, "--min-agreement", "0.95")) == 0
    return load_bundle(out)


def _matmuls(path) -> tuple[list[str], list[str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return ([n.name for n in graph.node if n.op_type == "MatMulNBits"],
            [n.name for n in graph.node if n.op_type == "MatMul"])


def test_bundle_contract(weight_only, tiny_bundle):
    m = weight_only.manifest
    validate_manifest(m)
    fp32 = load_bundle(tiny_bundle)
    assert m["precision"] == "int8" and m["head"] == fp32.manifest["head"] and m["gate"] == fp32.manifest["gate"]
    q = m["quantization"]
    assert q["method"] == "weight-only" and q["format"].startswith("MatMulNBits") and q["samples"] == 0
    assert q["weights"]["type"] == "int8" and q["weights"]["block_size"] == 32 and q["activations"]["type"] == "float32"
    assert q["activations"]["kernel_compute"].startswith("int8") and q["accuracy_level"] == 4
    body_q, body_f = _matmuls(weight_only.body_path())
    for k in range(weight_only.num_levels):
        quantized, plain = _matmuls(weight_only.level_path(k))
        assert len(quantized) == len(body_q) > 0  # the level graph quantizes what the split body does
        assert all("patch_embed" in n for n in plain if "attn/MatMul" not in n)  # embedding and attention float
        assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in
                                                            onnx.load(str(weight_only.level_path(k))).graph.node}
    quantized, plain = _matmuls(weight_only.full_path())  # the one-pass graph: the same MatMuls quantized
    assert quantized and all("patch_embed" in n for n in plain if "attn/MatMul" not in n)
    ext = m["external_data"]
    assert ext["unique_tensors"] < ext["tensor_references"]  # the levels and the body share each int8 weight once
    assert (weight_only.path / "weights.bin").stat().st_size < 0.6 * (fp32.path / "weights.bin").stat().st_size


def test_agrees_with_fp32_on_every_form(weight_only, tiny_bundle, sample_images):
    report = json.loads((weight_only.path / "quantization_report.json").read_text())
    assert report["passed"] and report["min_top1_agreement"] >= 0.95 and len(report["split"]["levels"]) == 4
    assert all(lv["cosine_mean"] > 0.9999 for lv in report["levels"] + report["split"]["levels"])
    fp32 = load_bundle(tiny_bundle)
    patches = preprocess(sample_images[:6], fp32.preprocessing)
    ref, _ = create_backend(fp32).run_level(0, patches[0], None)
    for weights in ("levels", "split"):
        got, _ = create_backend(weight_only, weights=weights).run_level(0, patches[0], None)
        cosine = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cosine.min() > 0.999
    labels = [r.label for r in Cascade(weight_only).classify(sample_images[:6])]
    assert labels == [r.label for r in Cascade(fp32).classify(sample_images[:6])]


def test_float_compute_only_rounds_the_weights(weight_only, tiny_bundle, tiny_csv, tmp_path):
    """--weight-only-compute float: MatMulNBits at accuracy_level 1 (fp32 compute), recorded in the manifest; only the
    weights' rounding is left, so every level's embedding is at least as near fp32 as with the int8 kernel."""
    out = tmp_path / "float"
    assert Q.main(_args(tiny_bundle, tiny_csv, out, "--min-agreement", "0.95", "--weight-only-compute", "float")) == 0
    q = load_bundle(out).manifest["quantization"]
    assert q["accuracy_level"] == 1 and q["activations"]["kernel_compute"] == "float"
    for path in (out / "body.onnx", out / "level0.onnx"):
        levels = {a.i for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {1}
    near = json.loads((out / "quantization_report.json").read_text())["levels"]
    fast = json.loads((weight_only.path / "quantization_report.json").read_text())["levels"]
    assert all(a["cosine_mean"] >= b["cosine_mean"] for a, b in zip(near, fast))


def test_tensorrt_refuses_in_one_line(weight_only):
    with pytest.raises(BackendError, match="MatMulNBits"):
        create_backend(weight_only, "tensorrt")


@pytest.mark.parametrize("extra", [("--backend", "openvino"), ("--quantize-ops", "MatMul"),
                                   ("--method", "minmax", "--weight-only-compute", "float")])
def test_bad_combinations(extra, tiny_bundle, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert Q.main(_args(tiny_bundle, tiny_csv, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "weight-only" in err[-1] and not out.exists()


def test_baseline_quantized_the_same_way(tmp_path):
    """bench/speed.py and devices.profile compare a weight-only bundle with a weight-only ViT baseline."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from devices.baseline import quantized_baseline

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3 * 16 * 16, 64)).astype(np.float32)
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 64])
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"],
                                                                                          ["embedding"])]
    graph = helper.make_graph(nodes, "vit", [x], [y], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "vit.onnx"))
    path = quantized_baseline(tmp_path / "vit.onnx", "onnxruntime", np.zeros((1, 16, 16, 3), np.uint8),
                              method="weight-only")
    assert path.name == "vit-int8-weight-only.onnx"
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["Flatten", "MatMulNBits"]
    pixels = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    want = pixels.reshape(2, -1) @ weight
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
    mtime = path.stat().st_mtime_ns
    assert quantized_baseline(tmp_path / "vit.onnx", "onnxruntime", None, method="weight-only") == path  # cached
    assert path.stat().st_mtime_ns == mtime


def test_bench_int8_times_every_int8_bundle(weight_only, tiny_bundle, tiny_csv, tmp_path, capsys):
    """bench/bench_int8.py FP32 INT8 [INT8 ...]: a weight-only bundle beside fp32, on its own backend."""
    from bench_module import load_bench

    bench = load_bench("bench_int8")
    out = tmp_path / "r.json"
    assert bench.main([str(tiny_bundle), str(weight_only.path), "--data", str(tiny_csv), "--split", "val",
                       "--images", "8", "--runs", "50", "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    name = f"onnxruntime int8 weight-only ({weight_only.path.name})"
    assert set(result["latency"]) == {"onnxruntime fp32", "openvino fp32", name}
    assert all(len(v) == 4 and all(lv["median_ms"] > 0 for lv in v) for v in result["latency"].values())
    assert list(result["agreement"]) == [name] and len(result["agreement"][name]) == 4
    table = capsys.readouterr().out
    assert f"| {name} |" in table and "x) |" in table
    assert bench.main([str(tiny_bundle), str(tiny_bundle), "--data", str(tiny_csv), "--runs", "50"]) == 2  # not int8
