"""The one-pass graph (export/full.py): every level's embedding from one block-causal pass, the same as the levels one
by one, in the bundle, the runtime (ONNX Runtime, OpenVINO) and the int8 bundles."""
import json

import numpy as np
import onnx
import pytest

from export.onnx import main as export_main
from runtime.bundle import BundleError, load_bundle, validate_manifest
from runtime.cascade import Cascade


def test_bundle_holds_the_validated_one_pass_graph(tiny_bundle):
    bundle = load_bundle(tiny_bundle)  # every sha256 checked, the full graph's too
    validate_manifest(bundle.manifest)
    full = bundle.manifest["full"]
    assert bundle.has_full and full["file"] in bundle.manifest["files"]
    assert full["inputs"] == [f"patches.{k}" for k in range(4)]
    assert full["outputs"] == [f"embedding.{k}" for k in range(4)]
    graph = onnx.load(str(bundle.full_path()), load_external_data=False).graph
    assert [i.name for i in graph.input] == full["inputs"] and [o.name for o in graph.output] == full["outputs"]
    big = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and {e.value for t in big for e in t.external_data if e.key == "location"} == {"weights.bin"}
    attention = [n.op_type for n in graph.node if "/attn/" in n.name]
    assert "Where" not in attention and "Softmax" in attention  # level by level: no masked scores (model.Attention)
    check = json.loads((tiny_bundle / "validation.json").read_text())["full"]
    assert check["passed"] and len(check["max_abs_diff_per_level"]) == 4 and max(check["max_abs_diff_per_level"]) < 1e-4


def test_weights_stored_once(tiny_bundle, tiny_checkpoint, tmp_path):
    """The one-pass graph reads the level graphs' bytes in weights.bin: it adds no copy of the blocks' weights."""
    out = tmp_path / "nofull"
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--no-full", "-q"]) == 0
    without = load_bundle(out)
    assert not without.has_full and "full" not in without.manifest
    grown = (tiny_bundle / "weights.bin").stat().st_size - (out / "weights.bin").stat().st_size
    assert 0 <= grown < 0.05 * (out / "weights.bin").stat().st_size


@pytest.mark.parametrize("weights", ["levels", "split"])
def test_one_pass_equals_the_levels(tiny_bundle, sample_images, weights):
    one = Cascade(tiny_bundle, weights=weights)
    levels = Cascade(tiny_bundle, weights=weights, one_pass=False)
    assert one.one_pass and not levels.one_pass
    patches = one.preprocess(sample_images[:5])
    for a, b in zip(one.run_all_levels(patches), levels.run_all_levels(patches)):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_no_early_exit_runs_one_pass(tiny_bundle, sample_images, monkeypatch):
    """Thresholds above 1 (a margin never reaches them) send every image to the last level: one pass, the same answer
    as the levels forced to the last level."""
    cascade = Cascade(tiny_bundle, thresholds=1.5)
    assert cascade.backend._full is not None  # made at construction, not inside the first image's time
    calls = []
    real = cascade.backend.run_full
    monkeypatch.setattr(cascade.backend, "run_full", lambda levels: calls.append(1) or real(levels))
    results = cascade.classify(sample_images[:4])
    forced = Cascade(tiny_bundle, one_pass=False).classify_levels(cascade.preprocess(sample_images[:4]),
                                                                  exit_levels=[3] * 4)
    assert calls == [1] and [r.exit_level for r in results] == [3] * 4 and all(len(r.level_ms) == 1 for r in results)
    assert [r.label for r in results] == [r.label for r in forced]
    assert np.allclose([r.score for r in results], [r.score for r in forced], atol=1e-5)
    gated = Cascade(tiny_bundle, thresholds=0.5)  # a gate that can exit: the levels one by one, never one pass
    assert gated.backend._full is None  # and no second copy of the weights in memory
    monkeypatch.setattr(gated.backend, "run_full", lambda levels: pytest.fail("one pass with a live gate"))
    gated.classify(sample_images[:2])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_gate_off_holds_the_weights_once(tiny_bundle, sample_images, backend):
    """With no early exit possible the cascade makes only the one-pass session (one copy of the weights in memory);
    the level sessions are made if a run ever needs them (here: exits forced), with the same answers."""
    pytest.importorskip(backend)
    cascade = Cascade(tiny_bundle, backend=backend, thresholds=1.5)
    levels_made = (lambda: bool(cascade.backend.sessions)) if backend == "onnxruntime" else (
        lambda: bool(cascade.backend.compiled))
    patches = cascade.preprocess(sample_images[:3])
    full = cascade.classify_levels(patches)
    assert cascade.backend._full is not None and not levels_made()
    forced = cascade.classify_levels(patches, exit_levels=[3] * 3)
    assert levels_made() and [r.label for r in forced] == [r.label for r in full]
    assert np.allclose([r.score for r in forced], [r.score for r in full], atol=1e-5)
    gated = Cascade(tiny_bundle, backend=backend).backend  # gate on: the levels only, made at once
    assert gated._full is None and (gated.sessions if backend == "onnxruntime" else gated.compiled)


def test_not_used_below_the_last_level(tiny_bundle, sample_images):
    capped = Cascade(tiny_bundle, max_level=2)
    assert not capped.one_pass and len(capped.run_all_levels(capped.preprocess(sample_images[:2]))) == 3


def test_openvino_one_pass(tiny_bundle, sample_images):
    pytest.importorskip("openvino")
    ov = Cascade(tiny_bundle, backend="openvino")
    ref = Cascade(tiny_bundle, one_pass=False)
    patches = ref.preprocess(sample_images[:3])
    assert ov.one_pass
    for a, b in zip(ov.run_all_levels(patches), ref.run_all_levels(patches)):
        assert np.abs(a - b).max() < 1e-4


def test_manifest_check_refuses_bad_full_entry(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["full"]["inputs"] = ["patches.0", "patches.1"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="full.inputs"):
        load_bundle(bad)


def test_int8_bundle_quantizes_and_checks_the_one_pass_graph(tiny_bundle, data_dir, sample_images, tmp_path):
    csv = data_dir / "tiny-imagenet-200" / "labels.csv"
    if not csv.is_file():
        pytest.skip("tiny-imagenet-200 not found")
    from calibration import quantize as Q

    out = tmp_path / "int8"
    assert Q.main([str(tiny_bundle), "--data", str(csv), "--split", "train", "--samples", "16", "--eval-samples", "32",
                   "--min-agreement", "0.8", "-o", str(out), "-q"]) == 0
    bundle = load_bundle(out)
    assert bundle.has_full and bundle.manifest["full"]["quantized"]["calibration_images"] == 16
    ops = {n.op_type for n in onnx.load(str(bundle.full_path()), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    report = json.loads((out / "quantization_report.json").read_text())
    assert len(report["full"]["levels"]) == 4 and report["min_top1_agreement"] <= report["full"]["min_top1_agreement"]
    assert Cascade(bundle).one_pass
    # the int8 one-pass graph is quantized on its own: every level's embeddings for calibration and evaluation come
    # from the level graphs the gated cascade exits from; with the gate off, from the one-pass graph
    patches = Cascade(bundle).preprocess(sample_images[:4])
    for a, b in zip(Cascade(bundle).run_all_levels(patches), Cascade(bundle, one_pass=False).run_all_levels(patches)):
        np.testing.assert_array_equal(a, b)
    asked = Cascade(bundle, one_pass=True)  # what the quantization report's check of the one-pass graph runs
    for a, b in zip(asked.run_all_levels(patches), asked.backend.run_full(patches)):
        np.testing.assert_array_equal(a, b)
    assert report["full"]["levels"][0]["cosine_mean"] != report["levels"][0]["cosine_mean"]  # another graph's figures
    gate_off = Cascade(bundle, thresholds=1.01)
    one = gate_off.backend.run_full(patches)[-1]
    np.testing.assert_allclose([r.score for r in gate_off.classify_levels(patches)],
                               gate_off.probabilities(one).max(1), atol=1e-6)
