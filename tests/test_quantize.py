"""calibration.quantize: int8 bundles calibrated on real images with the real KV cache, checked against fp32."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration import quantize as Q
from calibration.reader import CascadeCalibrationReader
from runtime.bundle import load_bundle, validate_manifest
from runtime.data import read_image_list, spread
from runtime.preprocess import preprocess

# A random (untrained) tiny model has tiny top-1/top-2 margins, so a few flips are expected; measured 98-100%.
MIN_AGREEMENT = "0.8"


@pytest.fixture(scope="module")
def tiny_csv(data_dir) -> Path:
    path = data_dir / "tiny-imagenet-200" / "labels.csv"
    if not path.is_file():
        pytest.skip("tiny-imagenet-200 not found")
    return path


def _args(bundle, csv, out, *extra) -> list[str]:
    return [str(bundle), "--data", str(csv), "--split", "train", "--samples", "24", "--eval-data", str(csv),
            "--eval-split", "val", "--eval-samples", "48", "-o", str(out), "-q", *extra]


@pytest.fixture(scope="module")
def ort_int8(tiny_bundle, tiny_csv, tmp_path_factory):
    """The ORT int8 bundle, plus every calibration item quantize_static was given (spied)."""
    import onnxruntime.quantization as oq

    real = oq.quantize_static
    seen: list[list[dict]] = []

    def spy(model_input, model_output, reader, **kw):
        seen.append(reader.items())
        reader.rewind()
        return real(model_input, model_output, reader, **kw)

    out = tmp_path_factory.mktemp("int8") / "ort"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oq, "quantize_static", spy)
        assert Q.main(_args(tiny_bundle, tiny_csv, out, "--min-agreement", MIN_AGREEMENT)) == 0
    return out, seen


def test_ort_bundle_contract(ort_int8, tiny_bundle):
    out, _ = ort_int8
    bundle = load_bundle(out)  # every sha256 checked
    m = bundle.manifest
    validate_manifest(m)
    fp32 = load_bundle(tiny_bundle).manifest
    assert m["precision"] == "int8" and m["graph_format"] == "onnx"
    assert [lv["inputs"] for lv in m["levels"]] == [lv["inputs"] for lv in fp32["levels"]]
    assert m["head"] == fp32["head"] and m["gate"] == fp32["gate"]
    q = m["quantization"]
    assert q["backend"] == "onnxruntime" and q["format"] == "QDQ" and q["method"] == "minmax"
    assert q["samples"] == 24 and len(q["data"]["paths_sha256"]) == 64 and q["data"]["split"] == "train"
    assert q["weights"] == {"type": "int8", "per_channel": True, "symmetric": True}
    assert q["op_types_to_quantize"] == ["MatMul", "Gemm"] and q["quantized_nodes"]["MatMul"] > 0
    assert {"LayerNormalization", "Softmax", "Erf", "Add"} <= set(q["float_compute_nodes"])
    assert {"onnx", "onnxruntime", "numpy"} <= set(q["versions"])
    for k in range(bundle.num_levels):
        graph = onnx.load(str(bundle.level_path(k)), load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        matmuls = [n for n in graph.node if n.op_type == "MatMul"]
        assert 0 < sum(any(i in dq for i in n.input) for n in matmuls) < len(matmuls)  # attention MatMuls float
        assert {e.value for t in graph.initializer for e in t.external_data if e.key == "location"} == {"weights.bin"}


def test_patch_embedding_and_projection_stay_float(ort_int8):
    """The scheme keeps the first (patch embedding, behind the patch standardisation) and last (every level's output
    projection) weighted MatMuls float, with float weights: in the level graphs and in the one-pass graph."""
    out, _ = ort_int8
    bundle = load_bundle(out)
    assert bundle.has_full
    for path, levels in [(bundle.level_path(k), 1) for k in range(bundle.num_levels)] + [(bundle.full_path(), 4)]:
        graph = onnx.load(str(path), load_external_data=False).graph
        dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        weights = {t.name for t in graph.initializer}
        matmuls = [n for n in graph.node if n.op_type == "MatMul"]
        first = [n for n in matmuls if "patch_embed" in n.name]
        last = [n for n in matmuls if any(i in weights and i.endswith("proj") for i in n.input)]
        assert len(first) == levels and len(last) == levels, path.name
        assert not any(i in dq for n in first + last for i in n.input), path.name
        assert any(i in dq for n in matmuls for i in n.input)  # the blocks' MatMuls are quantized


def test_provenance_records_no_absolute_path(ort_int8):
    from conftest import absolute_paths

    out = ort_int8[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["data"]["source"] in ("labels.csv", "tiny-imagenet-200/labels.csv")
    assert absolute_paths(manifest) == []
    assert absolute_paths(json.loads((out / "quantization_report.json").read_text())) == []


def test_report_per_level(ort_int8):
    out, _ = ort_int8
    report = json.loads((out / Q.REPORT).read_text())
    assert len(report["levels"]) == 4
    for e in report["levels"]:
        assert 0.8 <= e["top1_agreement"] <= 1 and 0.99 < e["cosine_mean"] <= 1 + 1e-6
    assert report["min_top1_agreement"] == min(e["top1_agreement"] for e in report["levels"])
    assert {"label_agreement", "exit_level_agreement", "thresholds"} <= set(report["cascade"])
    assert report["eval_data"]["split"] == "val" and report["images"] == 48
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["evaluation"]["levels"] == report["levels"]


def test_reader_feeds_real_kv(ort_int8, tiny_bundle, tiny_csv):
    """Level k was calibrated on the real images' patches and exactly the KV the fp32 level k-1 produced for them."""
    _, seen = ort_int8
    fp32 = load_bundle(tiny_bundle)
    assert len(seen) == fp32.num_levels + 2  # the level graphs, the split body, then the one-pass graph
    feeds = [{name: np.concatenate([item[name] for item in items]) for name in items[0]}
             for items in seen[:fp32.num_levels]]
    records = spread(read_image_list(tiny_csv, "train"), 24, Q.SEED)
    expected = preprocess([r.path for r in records], fp32.preprocessing)
    past: list[np.ndarray] = []
    for k in range(fp32.num_levels):
        sess = ort.InferenceSession(str(fp32.level_path(k)), providers=["CPUExecutionProvider"])
        names, _ = fp32.kv_names(k)
        assert set(feeds[k]) == {i.name for i in sess.get_inputs()} == {"patches", *names}
        np.testing.assert_array_equal(feeds[k]["patches"], expected[k])  # real images, calibration pick
        for name, ref in zip(names, past):
            np.testing.assert_allclose(feeds[k][name], ref, rtol=0, atol=1e-6)
        past = sess.run(None, {"patches": expected[k], **dict(zip(names, past))})[1:]
    assert np.abs(feeds[1][fp32.kv_names(1)[0][0]]).max() > 0
    for k in range(fp32.num_levels):  # the one-pass graph: every level's patches of the same images
        np.testing.assert_array_equal(np.concatenate([item[f"patches.{k}"] for item in seen[-1]]), expected[k])


def test_split_body_calibrated_on_every_level(ort_int8, tiny_bundle):
    """The int8 bundle's shared body is quantized on the real inputs of every level (tokens of the fp32 embedding
    graph, the level index, the fp32 KV cache: empty at level 0), and the split form agrees with fp32 too."""
    out, seen = ort_int8
    fp32, int8 = load_bundle(tiny_bundle), load_bundle(out)
    body_items = seen[-2]
    assert sorted({int(item["level"]) for item in body_items}) == list(range(fp32.num_levels))
    level0 = [item for item in body_items if int(item["level"]) == 0]
    embed = ort.InferenceSession(str(fp32.embed_path(0)), providers=["CPUExecutionProvider"])
    level_feeds = seen[0]
    tokens = embed.run(None, {"patches": np.concatenate([f["patches"] for f in level_feeds])})[0]
    np.testing.assert_allclose(np.concatenate([i["tokens"] for i in level0]), tokens, atol=1e-6)
    assert all(i[fp32.kv_names(1)[0][0]].shape[2] == 0 for i in level0)
    level1 = [item for item in body_items if int(item["level"]) == 1]
    np.testing.assert_allclose(np.concatenate([i[fp32.kv_names(1)[0][0]] for i in level1]),
                               np.concatenate([f[fp32.kv_names(1)[0][0]] for f in seen[1]]), atol=1e-6)
    graph = onnx.load(str(int8.body_path()), load_external_data=False).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    report = json.loads((out / "quantization_report.json").read_text())
    assert len(report["split"]["levels"]) == fp32.num_levels
    assert report["min_top1_agreement"] <= report["split"]["min_top1_agreement"]


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_calibrate_the_split_body(method, tiny_bundle, tiny_csv, tmp_path):
    """The histogram calibrators stack each item's tensors, which failed on the split body (its attention shapes
    change with every level's past length) and on a last partial batch (23 images, batches of 8)."""
    out = tmp_path / method
    args = _args(tiny_bundle, tiny_csv, out, "--method", method, "--min-agreement", MIN_AGREEMENT)
    args[args.index("--samples") + 1] = "23"
    assert Q.main(args) == 0
    bundle = load_bundle(out)
    assert bundle.manifest["quantization"]["method"] == method and bundle.has_split
    assert json.loads((out / "quantization_report.json").read_text())["split"]["min_top1_agreement"] >= 0.8


def test_reader_protocol(tiny_bundle, sample_images):
    fp32 = load_bundle(tiny_bundle)
    patches = preprocess(sample_images[:10], fp32.preprocessing)
    reader = CascadeCalibrationReader.for_level(fp32, patches, 2, batch_size=4)
    assert len(reader) == 3 and [b["patches"].shape[0] for b in reader] == [4, 4, 2]
    assert reader.get_next() is None
    reader.set_range(1, 10)  # in items, as ORT's strided calibration counts them
    assert len(reader) == 2 and reader.get_next()["past_key_values.0.key"].shape == (4, 2, 34, 32)
    assert reader.get_next()["patches"].shape[0] == 2 and reader.get_next() is None


def test_held_out_is_disjoint(tiny_csv):
    records = read_image_list(tiny_csv, "val")
    calib = spread(records, 50, Q.SEED)
    held = Q.held_out_images(records, calib, None, None, 200, str(tiny_csv))
    assert len(held) == 200 and not {r.path for r in held} & {r.path for r in calib}
    held = Q.held_out_images(records, calib, str(tiny_csv), "val", 10_000, str(tiny_csv))
    assert len(held) == len(records) - 50


def test_low_agreement_refuses(tiny_bundle, tiny_csv, tmp_path, capsys):
    out = tmp_path / "refused"
    assert Q.main(_args(tiny_bundle, tiny_csv, out, "--min-agreement", "1.01")) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "no bundle written" in capsys.readouterr().err


def _main(args: list[str]) -> int:
    try:
        return Q.main(args)
    except SystemExit as e:  # argparse errors
        return int(e.code)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_too_few_images(tiny_bundle, sample_images, tmp_path, capsys):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sample_images[:5]:
        shutil.copy(p, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert Q.main([str(tiny_bundle), "--data", str(folder), "-o", str(out), "-q"]) == 2
    err = _error(capsys)
    assert "found 5 readable" in err and "1 unreadable" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["few"]


@pytest.mark.parametrize("case", ["missing data", "output exists", "backend"])
def test_bad_input(case, tiny_bundle, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(tiny_bundle), "--data", str(tiny_csv), "--split", "train", "-o", str(out), "-q"]
    if case == "missing data":
        args[2] = str(tmp_path / "nowhere")
    elif case == "output exists":
        out.mkdir()
    else:
        args += ["--backend", "cuda"]
    assert _main(args) == 2
    err = _error(capsys)
    assert {"missing data": "no such data", "output exists": "--force", "backend": "cuda"}[case] in err
    assert list(tmp_path.iterdir()) == ([out] if case == "output exists" else [])


def test_openvino_bundle_classifies(tiny_bundle, tiny_csv, sample_images, tmp_path):
    pytest.importorskip("nncf")
    from runtime.cascade import Cascade

    out = tmp_path / "ov"
    assert Q.main([str(tiny_bundle), "--data", str(tiny_csv), "--split", "train", "--samples", "16",
                   "--eval-samples", "32", "--backend", "openvino", "--min-agreement", MIN_AGREEMENT,
                   "-o", str(out), "-q"]) == 0
    bundle = load_bundle(out)
    validate_manifest(bundle.manifest)
    assert bundle.manifest["graph_format"] == "openvino" and bundle.manifest["precision"] == "int8"
    assert [lv["file"] for lv in bundle.manifest["levels"]] == [f"level{k}.xml" for k in range(4)]
    q = bundle.manifest["quantization"]
    assert q["backend"] == "openvino" and "nncf" in q["versions"] and q["quantized_nodes"]["MatMul"] > 0
    assert q["eval_data"]["split"] == "train" and q["eval_data"]["disjoint_from_calibration"]
    assert bundle.has_split and bundle.manifest["split"]["body"]["file"] == "body.xml"
    report = json.loads((out / "quantization_report.json").read_text())
    assert len(report["split"]["levels"]) == 4  # the split form was checked against fp32 too
    import openvino as ov

    full = ov.Core().read_model(str(out / bundle.manifest["full"]["file"]))
    fed = {op.get_friendly_name(): {i.get_source_output().get_node().get_type_name() for i in op.inputs()}
           for op in full.get_ordered_ops() if op.get_type_name() == "MatMul"}
    attention = [n for n in fed if re.match(r".*/attn/MatMul_\d+", n)]
    assert attention and not any("FakeQuantize" in fed[n] for n in attention)  # level by level: left float
    assert any("FakeQuantize" in t for t in fed.values())  # the weights' MatMuls are int8
    fp32 = Cascade(load_bundle(tiny_bundle)).classify(sample_images[:4])
    for weights in ("levels", "split"):
        results = Cascade(bundle, backend="openvino", weights=weights).classify(sample_images[:4])
        assert len(results) == 4 and all(r.label in bundle.labels for r in results)
        assert sum(a.label == b.label for a, b in zip(results, fp32)) >= 3


def test_tensorrt_bundle_is_symmetric_qdq(tiny_bundle, tiny_csv, tmp_path):
    out = tmp_path / "trt"
    assert Q.main(_args(tiny_bundle, tiny_csv, out, "--backend", "tensorrt", "--min-agreement", MIN_AGREEMENT)) == 0
    bundle = load_bundle(out)
    q = bundle.manifest["quantization"]
    assert q["activations"] == {"type": "int8", "symmetric": True} and "built on the target" in q["target"]
    model = onnx.load(str(bundle.level_path(1)))  # external data resolved
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
