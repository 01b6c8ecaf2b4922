"""The split graphs (export/split.py): per-level embeddings + one body for every level, weights once in memory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from runtime.backends import BackendError
from runtime.bundle import BundleError, load_bundle
from runtime.cascade import Cascade
from export.weights import external_key
from runtime.preprocess import list_images

REPO = Path(__file__).resolve().parents[1]
IMAGES = list_images([REPO / "examples" / "images"])


def test_export_writes_validated_split_graphs(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    assert bundle.has_split
    assert [e["file"] for e in bundle.manifest["split"]["embed"]] == [f"embed{k}.onnx" for k in range(4)]
    report = json.loads((tiny_bundle / "validation.json").read_text())["split"]
    assert report["passed"] and max(report["max_abs_diff_per_level"]) <= report["atol"]


def test_body_shares_the_level_graphs_bytes(tiny_bundle):
    """The body's transformer weights are the same regions of weights.bin as the level graphs' (stored once)."""
    bundle = load_bundle(tiny_bundle)
    level_keys = {external_key(t) for k in range(bundle.num_levels)
                  for t in onnx.load(str(bundle.level_path(k)), load_external_data=False).graph.initializer}
    body = [external_key(t) for t in onnx.load(str(bundle.body_path()), load_external_data=False).graph.initializer]
    body = [k for k in body if k is not None]
    own = [k for k in body if k not in level_keys]
    cfg = bundle.manifest["model"]
    assert len(body) > len(own)
    assert [k[4] for k in own] == [(bundle.num_levels, cfg["width"])] * 2  # only the stacked ln_post weight, bias


def test_body_has_one_set_of_block_weights(tiny_bundle):
    """One graph for every level: the body's MatMul weights are those of ONE stack of blocks, not one per level."""
    bundle = load_bundle(tiny_bundle)
    cfg = bundle.manifest["model"]
    graph = onnx.load(str(bundle.body_path()), load_external_data=False).graph
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    # per layer: qkv, out, fc, proj; plus the embedding projection; attention score/value MatMuls have no weight
    weighted = [n for n in matmuls if any(i in {t.name for t in graph.initializer} for i in n.input)]
    assert len(weighted) == 4 * cfg["layers"] + 1


@pytest.mark.parametrize("io_binding", [True, False])
def test_split_cascade_matches_levels(tiny_bundle, io_binding):
    levels = Cascade(tiny_bundle, thresholds=0.0, weights="levels")
    split = Cascade(tiny_bundle, thresholds=0.0, weights="split", io_binding=io_binding)
    for max_level in range(4):
        a = Cascade(tiny_bundle, backend=levels.backend, thresholds=1.01, max_level=max_level)
        b = Cascade(tiny_bundle, backend=split.backend, thresholds=1.01, max_level=max_level)
        ra, rb = a.classify(IMAGES), b.classify(IMAGES)
        assert [r.exit_level for r in rb] == [max_level] * len(IMAGES)
        assert [r.class_name for r in ra] == [r.class_name for r in rb]
        np.testing.assert_allclose([[s for _, s in r.top_k] for r in ra], [[s for _, s in r.top_k] for r in rb], atol=1e-5)


def test_split_mode_refuses_a_bundle_without_split(tiny_checkpoint, tmp_path):
    from export.onnx import main as export_main

    out = tmp_path / "nosplit"
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--no-split", "-q",
                        "--images", str(REPO / "examples" / "images")]) == 0
    assert not load_bundle(out).has_split
    with pytest.raises(BackendError, match="split graphs"):
        Cascade(out, weights="split")
    assert Cascade(out).backend.weights == "levels"  # auto: one graph per level when there is no split
    assert Cascade(out).classify(IMAGES[:1])


def test_auto_picks_the_split_graphs(tiny_bundle):
    assert Cascade(tiny_bundle).backend.weights == "split"
    pytest.importorskip("openvino")
    assert Cascade(tiny_bundle, backend="openvino").backend.weights == "split"


def test_manifest_check_rejects_a_bad_split_entry(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["split"]["embed"] = manifest["split"]["embed"][:2]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"split\.embed: has 2 entries, expected 4"):
        load_bundle(bad)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_split_mode_per_level_matches_level_graphs(tiny_bundle, backend):
    """Every level alone through the split graphs equals the level graph (real KV passed between levels)."""
    pytest.importorskip(backend)
    from runtime.backends import create_backend

    bundle = load_bundle(tiny_bundle)
    levels, split = create_backend(bundle, backend), create_backend(bundle, backend, weights="split")
    from runtime.preprocess import preprocess

    patches = preprocess(IMAGES, bundle.preprocessing)
    past_a = past_b = None
    for k in range(bundle.num_levels):
        emb_a, past_a = levels.run_level(k, patches[k], past_a)
        emb_b, past_b = split.run_level(k, patches[k], past_b)
        np.testing.assert_allclose(emb_a, emb_b, atol=1e-5)
        for a, b in zip(levels.to_numpy(past_a), split.to_numpy(past_b)):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("weights", ["levels", "split"])
def test_openvino_holds_the_cache_in_its_inference_precision(tiny_bundle, weights, monkeypatch):
    """At an explicit bf16 precision the KV cache stays bf16 between levels (no conversion to f32 and back) where the
    device computes in bf16, with the same results as an f32 cache, rows gathered too; at f32 it stays f32."""
    ov = pytest.importorskip("openvino")
    import runtime.backends.openvino as backend_module
    from runtime.preprocess import preprocess

    bundle = load_bundle(tiny_bundle)
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    half = backend_module.OpenVINOBackend(bundle, weights=weights, inference_precision="bf16")
    assert half.kv_type == (ov.Type.bf16 if has_bf16 else ov.Type.f32)
    assert backend_module.OpenVINOBackend(bundle, weights=weights).kv_type == ov.Type.f32  # fp32 bundle: pinned f32
    monkeypatch.setattr(backend_module, "kv_element_type", lambda *args: ov.Type.f32)
    wide = backend_module.OpenVINOBackend(bundle, weights=weights, inference_precision="bf16")
    patches = preprocess(IMAGES[:5], bundle.preprocessing)
    past_h = past_w = None
    for k, rows in enumerate([5, 4, 2, 1]):
        if k:
            past_h = half.take_rows(past_h, np.arange(rows))
            past_w = wide.take_rows(past_w, np.arange(rows))
        emb_h, past_h = half.run_level(k, patches[k][:rows], past_h)
        emb_w, past_w = wide.run_level(k, patches[k][:rows], past_w)
        assert {t.get_element_type() for t in past_h} == {half.kv_type}
        np.testing.assert_array_equal(emb_h, emb_w)
        for a, b in zip(half.to_numpy(past_h), wide.to_numpy(past_w)):
            assert a.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    first = half.run_level(0, patches[0][:2], None)[1]
    as_floats = half.to_numpy(first)  # a cache handed back as float arrays: converted to the cache's type, exactly
    np.testing.assert_array_equal(half.run_level(1, patches[1][:2], as_floats)[0],
                                  half.run_level(1, patches[1][:2], first)[0])
    if half.kv_type == ov.Type.bf16:  # float values round to the nearest bf16, ties to even
        values = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -12, -2.5], np.float32)
        rounded = backend_module.as_float32(half._kv_tensor(values))
        np.testing.assert_array_equal(rounded, np.array([1.0, 1 + 2 ** -6, 1 + 2 ** -7, -2.5], np.float32))


def test_openvino_kv_precision_is_a_choice(tiny_bundle):
    """kv_precision: f32 pins an f32 cache even at bf16; bf16 asks for a bf16 cache where the models compute in f32
    (the cache's values rounded: embeddings close to an f32 cache's, not equal); bad values and a device without the
    type are refused in one line."""
    ov = pytest.importorskip("openvino")
    from runtime.backends import BackendError
    from runtime.backends.openvino import OpenVINOBackend
    from runtime.preprocess import preprocess

    bundle = load_bundle(tiny_bundle)
    with pytest.raises(BackendError, match="kv_precision 'int4': choose from auto, f32, bf16, f16"):
        OpenVINOBackend(bundle, kv_precision="int4")
    assert OpenVINOBackend(bundle, inference_precision="bf16", kv_precision="f32").kv_type == ov.Type.f32
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(BackendError, match="has no BF16"):
            OpenVINOBackend(bundle, kv_precision="bf16")
        return
    half, wide = OpenVINOBackend(bundle, kv_precision="bf16"), OpenVINOBackend(bundle)
    assert (half.kv_type, wide.kv_type) == (ov.Type.bf16, ov.Type.f32)
    patches = preprocess(IMAGES[:4], bundle.preprocessing)
    past_h = past_w = None
    for k in range(4):
        emb_h, past_h = half.run_level(k, patches[k], past_h)
        emb_w, past_w = wide.run_level(k, patches[k], past_w)
        assert {t.get_element_type() for t in past_h} == {ov.Type.bf16}
        cos = (emb_h * emb_w).sum(1) / np.linalg.norm(emb_h, axis=1) / np.linalg.norm(emb_w, axis=1)
        assert cos.min() > 0.999
    assert np.abs(emb_h - emb_w).max() > 0  # level 3 read a rounded cache
