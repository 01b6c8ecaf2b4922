"""Speed capabilities (behaviour, never timings): one thread pool owns the cores, exits forced to a mix on the real
cascade, the cost model, the weights modes (levels / split), bench/speed.py end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendError, create_backend
from runtime.bundle import load_bundle
from runtime.cascade import Cascade
from runtime.threads import blas_threads
from runtime.timing import exit_plan, expected_ms, parse_exit_mix

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "examples" / "images").glob("*.jpg"))
INT8 = ROOT / "models" / "waveclip-demo" / "bundle-int8"


class RecordingBackend:
    """Wraps a backend; records the BLAS thread counts threadpoolctl sees while each level runs."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.seen = inner, inner.name, []

    def run_level(self, level, patches, past):
        self.seen.append(blas_threads())
        return self.inner.run_level(level, patches, past)

    def take_rows(self, present, rows):
        self.seen.append(blas_threads())
        return self.inner.take_rows(present, rows)

    def to_numpy(self, present):
        return self.inner.to_numpy(present)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_blas_is_single_threaded_while_a_cascade_runs(tiny_bundle, backend):
    """numpy's BLAS pool never wakes between levels (it would spin against the backend's threads): 1 thread while
    the cascade runs, on every backend; the caller's setting is back afterwards. No environment variable."""
    pytest.importorskip(backend)
    from threadpoolctl import threadpool_limits

    before = blas_threads()
    if not before:
        pytest.skip("numpy has no BLAS library threadpoolctl can see")
    with threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core device, whatever this machine has
        wrapped = RecordingBackend(create_backend(load_bundle(tiny_bundle), backend))
        cascade = Cascade(tiny_bundle, wrapped, thresholds=0.5)
        levels = cascade.preprocess(IMAGES)
        cascade.classify_levels(levels, exit_levels=np.arange(len(IMAGES)) % 4)
        cascade.run_all_levels(levels)
        assert wrapped.seen and all(set(t) == {1} for t in wrapped.seen)
        assert set(blas_threads()) == {2}
    assert blas_threads() == before


def test_forced_exits_run_the_real_cascade(tiny_bundle):
    """exit_levels forces each row's exit; embeddings at the exit equal those of running all levels (so the KV rows
    carried on were gathered right), and the last level always exits."""
    cascade = Cascade(tiny_bundle, thresholds=0.0)  # the gate alone would exit everything at level 0
    levels = cascade.preprocess(IMAGES)
    forced = np.arange(len(IMAGES)) % 4
    results = cascade.classify_levels(levels, keep_embeddings=True, exit_levels=forced)
    assert [r.exit_level for r in results] == forced.tolist()
    full = cascade.run_all_levels(levels)
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.embedding, full[r.exit_level][i], atol=1e-5)
        assert len(r.level_ms) == r.exit_level + 1
    with pytest.raises(ValueError, match="one level in 0..3 per row"):
        cascade.classify_levels(levels, exit_levels=[4] * len(IMAGES))
    with pytest.raises(ValueError):
        cascade.classify_levels(levels, exit_levels=[0])


def test_exit_plan_follows_the_mix():
    mix = parse_exit_mix("40,30,20,10", 4)
    np.testing.assert_allclose(mix, [0.4, 0.3, 0.2, 0.1])
    assert np.bincount(exit_plan(mix, 40), minlength=4).tolist() == [16, 12, 8, 4]
    assert np.bincount(exit_plan(mix, 7), minlength=4).sum() == 7
    assert exit_plan(mix, 40).tolist() != sorted(exit_plan(mix, 40).tolist())  # interleaved, not sorted
    np.testing.assert_allclose(parse_exit_mix([1, 1], 2), [0.5, 0.5])
    assert expected_ms(mix, [10, 20, 30, 40]) == pytest.approx(20.0)
    for bad in ("40,30", "a,b,c,d", "-1,1,1,1", "0,0,0,0"):
        with pytest.raises(ValueError):
            parse_exit_mix(bad, 4)


@pytest.mark.parametrize("bundle_name", ["tiny", "int8"])
def test_onnxruntime_weights_modes_agree(tiny_bundle, bundle_name):
    """levels / split hold the weights differently and compute the same embeddings at every level."""
    path = tiny_bundle if bundle_name == "tiny" else INT8
    bundle = load_bundle(path)
    atol = 1e-5 if bundle_name == "tiny" else 1e-3  # int8: kernels may pick other (equally valid) rounding paths
    embs = {}
    for weights in ("levels", "split"):
        for io_binding in (True, False):
            cascade = Cascade(bundle, create_backend(bundle, "onnxruntime", providers=["CPUExecutionProvider"],
                                                     weights=weights, io_binding=io_binding, threads=1))
            levels = cascade.preprocess(IMAGES)
            embs[weights, io_binding] = cascade.run_all_levels(levels)
            forced = cascade.classify_levels(levels, exit_levels=np.arange(len(IMAGES)) % 4, keep_embeddings=True)
            for i, r in enumerate(forced):
                np.testing.assert_allclose(r.embedding, embs[weights, io_binding][r.exit_level][i], atol=atol)
    for key, got in embs.items():  # with or without I/O binding: the same numbers
        for a, b in zip(got, embs[key[0], True]):
            np.testing.assert_allclose(a, b, atol=atol, err_msg=str(key))
    for a, b in zip(embs["split", True], embs["levels", True]):
        if bundle_name == "tiny":  # fp32: the split graphs are the level graphs' computation
            np.testing.assert_allclose(a, b, atol=atol)
        else:  # int8: the shared body has its own calibration (ranges over every level's inputs)
            assert (a * b).sum(1).min() > 0.98


@pytest.mark.parametrize("weights", ["levels", "split"])
def test_workers_spin_within_a_run_and_stop_between_runs(tiny_bundle, weights):
    """ONNX Runtime workers: spinning within a run (by default) but forced to stop when it returns, on every session,
    so no idle session spins against the running one or the host work between levels; spinning=False: never."""
    bundle = load_bundle(tiny_bundle)
    for spinning, allowed in ((None, "1"), (True, "1"), (False, "0")):
        kw = {} if spinning is None else {"spinning": spinning}
        be = create_backend(bundle, "onnxruntime", providers=["CPUExecutionProvider"], threads=2, weights=weights, **kw)
        for session in be.sessions + be.embeds:
            opts = session.get_session_options()
            assert opts.get_session_config_entry("session.intra_op.allow_spinning") == allowed
            assert opts.get_session_config_entry("session.force_spinning_stop") == "1"


def test_unknown_weights_mode_is_refused(tiny_bundle):
    with pytest.raises(BackendError, match="choose from auto, levels, split"):
        create_backend(load_bundle(tiny_bundle), "onnxruntime", weights="twice")


@pytest.mark.slow
def test_bench_speed_prints_the_table(tiny_bundle, tmp_path):
    """bench/speed.py end to end on the tiny bundle with a tiny stand-in ViT: one row per setup, ratios, memory."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("GlobalAveragePool", ["pixels"], ["p"]), helper.make_node("Flatten", ["p"], ["embedding"])]
    model = helper.make_model(helper.make_graph(nodes, "vit", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "vit.onnx"))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), str(tiny_bundle), "--vit",
                          str(tmp_path / "vit.onnx"), "--rounds", "2", "--batch-rounds", "1", "--batch", "2",
                          "--images", "3", "--threads", "1", "--data", str(ROOT / "examples" / "images"),
                          "--ov-weights", "split", "--ov-property", "CPU_RUNTIME_CACHE_CAPACITY=0",
                          "--json", str(tmp_path / "s.json")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "s.json").read_text())
    labels = [row["setup"] for row in r["rows"]]
    assert labels[:4] == ["onnxruntime fp32 (levels)", "onnxruntime fp32 (split)", "openvino f32 (split)",
                          "openvino f32 (split, CPU_RUNTIME_CACHE_CAPACITY=0)"]
    assert all(("CPU_RUNTIME" in label) == (i % 2 == 1) for i, label in enumerate(labels[2:]))
    assert "| onnxruntime fp32 (levels) |" in out.stdout
    for row in r["rows"]:
        assert row["mix"]["runs"] == 2 and len(row["exit_costs"]) == 4 and row["expected_mix_ms"] > 0
        assert row["memory"]["cascade"]["rss_mib"] > 0 and row["memory"]["ratio"] > 0
        assert row["agreement_top1"] >= 0.99 or "bf16" in row["setup"]
        assert row["one_pass"]["runs"] == 2 and row["ratios"]["one_pass_vs_vit"] > 0  # the bundle's one-pass graph
    assert all(row["throughput"]["batch"] == 2 and row["throughput"]["pooled_ratio"] > 0 for row in r["rows"])
    assert "; pooled " in out.stdout
    assert "always-full / ViT (one pass)" in out.stdout
    assert r["images_per_timed_call"] == 10 and "10 images a timed call" in out.stdout


def test_every_batch1_item_is_timed_alike():
    """Each timed call runs the same number of images for every item (a single run would pay a cold start that a
    sequence spreads out); measure reports per-image ms."""
    from bench_module import load_bench

    speed = load_bench("speed")
    calls = []
    run = speed.in_sequence(lambda: calls.append(1))
    assert run() == speed.PER_CALL and len(calls) == speed.PER_CALL
    times = speed.measure({"a": run}, rounds=2, warmup=0, progress=lambda it: it)
    assert len(times["a"]) == 2 and len(calls) == 3 * speed.PER_CALL


def test_openvino_bf16_is_an_explicit_precision_close_to_fp32(tiny_bundle):
    """OpenVINO runs an fp32 bundle in f32 unless bf16 is asked for; bf16 embeddings stay close to f32 (cosine)."""
    pytest.importorskip("openvino")
    bundle = load_bundle(tiny_bundle)
    embs = {}
    for precision in ("f32", "bf16"):
        backend = create_backend(bundle, "openvino", inference_precision=precision)
        assert backend.compiled[0].get_property("INFERENCE_PRECISION_HINT").to_string() in (precision, "f32")
        cascade = Cascade(bundle, backend)
        embs[precision] = cascade.run_all_levels(cascade.preprocess(IMAGES))
    for a, b in zip(embs["f32"], embs["bf16"]):
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.98


def test_openvino_properties_reach_every_compiled_model(tiny_bundle, monkeypatch):
    """``properties`` go to the split body and every embedding model (OpenVINO refuses an unknown one); the
    embeddings do not change."""
    ov = pytest.importorskip("openvino")
    bundle = load_bundle(tiny_bundle)
    configs, compile_model = [], ov.Core.compile_model

    def recording(self, model, device="CPU", config=None):
        configs.append(dict(config or {}))
        return compile_model(self, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", recording)
    plain = create_backend(bundle, "openvino", weights="split")
    lean = create_backend(bundle, "openvino", weights="split", properties={"CPU_RUNTIME_CACHE_CAPACITY": 0})
    assert len(configs) == 2 * (1 + bundle.num_levels)
    assert all(("CPU_RUNTIME_CACHE_CAPACITY" in c) == (i >= len(configs) // 2) for i, c in enumerate(configs))
    assert all(c["PERFORMANCE_HINT"] == "LATENCY" for c in configs)
    a, b = (Cascade(bundle, backend).run_all_levels(Cascade(bundle, backend).preprocess(IMAGES))
            for backend in (plain, lean))
    assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
    with pytest.raises(BackendError, match="cannot compile"):
        create_backend(bundle, "openvino", properties={"NOT_A_PROPERTY": 1})
