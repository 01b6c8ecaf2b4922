"""Per-level ONNX export with the KV cache as explicit I/O (export/), validated through the numpy runtime."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import onnx as export_cli
from export.graphs import export_full_graph
from export.weights import SharedWeights
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import get_preset
from model.waveclip import WaveCLIP
from runtime.bundle import load_bundle, validate_manifest
from runtime.wavelet import images_to_levels

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WAVECLIP_DATA", REPO.parent / "shared" / "data"))
IMAGES = sorted((DATA / "imagenet-sample").glob("*.JPEG"))[:4]
IMAGE_ARGS = ["--images", *map(str, IMAGES)] if IMAGES else []  # else the exporter's own fallback


def make_checkpoint(path: Path, preset: str, classes: int = 10) -> Path:
    torch.manual_seed(0)
    cfg = get_preset(preset)
    head = {"class_names": [f"class {i}" for i in range(classes)], "labels": [f"n{i:08d}" for i in range(classes)],
            "weight": torch.nn.functional.normalize(torch.randn(classes, cfg.embed_dim), dim=-1),
            "bias": torch.zeros(classes), "logit_scale": 100.0}
    save_checkpoint(path, WaveCLIP(cfg), head, teacher="random-init")
    return path


def export(ckpt: Path, out: Path, *extra: str) -> int:
    return export_cli.main([str(ckpt), "-o", str(out), "-q", *IMAGE_ARGS, *extra])


def param_bytes(ckpt: Path) -> int:
    model, _ = load_checkpoint(ckpt)
    return sum(p.numel() * 4 for p in model.state_dict().values())


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", "waveclip-tiny")


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    assert export(tiny_ckpt, out) == 0
    return out


def test_export_validates(bundle):
    result = json.loads((bundle / "validation.json").read_text())
    assert result["passed"] and len(result["levels"]) == 4
    for level in result["levels"]:
        assert level["embedding_max_abs_diff"] <= 1e-4 and level["present_max_abs_diff"] <= 1e-4
        assert level["vs_full_forward_max_abs_diff"] <= 1e-4 and level["top1_agreement"] == 1.0
        assert {"embedding", "present.0.key", "present.1.value"} <= set(level["outputs"])


def test_bundle_loads_and_manifest_validates(bundle, tiny_ckpt):
    b = load_bundle(bundle)
    validate_manifest(b.manifest)
    cfg = get_preset("waveclip-tiny")
    m = b.manifest
    assert m["precision"] == "fp32" and m["graph_format"] == "onnx" and m["gate"]["thresholds"] == [0.5] * 3
    assert m["preprocessing"] == json.loads(json.dumps(cfg.preprocessing_spec()))
    assert b.head_weight.shape == (10, cfg.embed_dim) and len(b.labels) == 10
    lv = m["levels"][2]
    assert lv["past_length"] == 2 * cfg.tokens_per_level and lv["cumulative_gflops"] > lv["gflops"] > 0
    assert lv["inputs"][1] == {"name": "past_key_values.0.key", "dtype": "float32",
                               "shape": ["batch", cfg.heads, 2 * cfg.tokens_per_level, cfg.head_dim]}
    assert lv["outputs"][-1]["shape"] == ["batch", cfg.heads, 3 * cfg.tokens_per_level, cfg.head_dim]
    assert [i["name"] for i in m["levels"][0]["inputs"]] == ["patches"]
    assert isinstance(m["optimization"]["applied"], list) and len(m["optimization"]["levels"]) == 4
    assert m["export"]["opset"] == 17 and len(m["export"]["checkpoint"]["sha256"]) == 64
    for level in m["levels"]:  # declared shapes are the graph's own
        graph = onnx.load(str(bundle / level["file"]), load_external_data=False).graph
        for decl, value in zip(level["inputs"] + level["outputs"], list(graph.input) + list(graph.output)):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert (decl["name"], decl["shape"]) == (value.name, dims)


def run_from_manifest(folder: Path, rgb: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """A consumer that knows only manifest.json, onnxruntime and numpy (+ the numpy tokenizer)."""
    m = json.loads((folder / "manifest.json").read_text())
    kv, patches, cache, embeddings = m["kv_cache"], images_to_levels(rgb, m["preprocessing"]), {}, []
    names = [(i, kind) for i in range(kv["num_layers"]) for kind in ("key", "value")]
    for lv in m["levels"]:
        feeds = {lv["inputs"][0]["name"]: patches[lv["level"]]}
        if lv["past_length"]:
            feeds.update({kv[f"past_{kind}_pattern"] % i: cache[i, kind] for i, kind in names})
        assert sorted(feeds) == sorted(i["name"] for i in lv["inputs"])
        sess = ort.InferenceSession(str(folder / lv["file"]), providers=["CPUExecutionProvider"])
        out = dict(zip([o["name"] for o in lv["outputs"]], sess.run([o["name"] for o in lv["outputs"]], feeds)))
        cache = {(i, kind): out[kv[f"present_{kind}_pattern"] % i] for i, kind in names}
        embeddings.append(out["embedding"])
    head = m["head"]
    weight = np.fromfile(folder / head["weight"]["file"], "<f4").reshape(head["weight"]["shape"])
    bias = np.fromfile(folder / head["bias"]["file"], "<f4").reshape(head["bias"]["shape"])
    return embeddings, head["logit_scale"] * embeddings[-1] @ weight.T + bias


def test_bundle_runs_from_manifest_alone(bundle, tiny_ckpt):
    cfg = get_preset("waveclip-tiny")
    rgb = np.random.default_rng(0).integers(0, 256, (3, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    embeddings, logits = run_from_manifest(bundle, rgb)
    model, ckpt = load_checkpoint(tiny_ckpt)
    with torch.no_grad():
        full = model([torch.from_numpy(p) for p in images_to_levels(rgb, cfg.preprocessing_spec())])
    for got, ref in zip(embeddings, full):
        assert np.abs(got - ref.numpy()).max() <= 1e-4
    ref_logits = 100.0 * full[-1].numpy() @ ckpt["head"]["weight"].numpy().T
    assert np.abs(logits - ref_logits).max() <= 1e-2


def test_weights_shared_once(bundle, tiny_ckpt):
    total = sum(p.stat().st_size for p in bundle.iterdir())
    assert total < 1.5 * param_bytes(tiny_ckpt)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["external_data"]["tensor_references"] > m["external_data"]["unique_tensors"]
    for lv in m["levels"]:
        path = bundle / lv["file"]
        big = [t for t in onnx.load(str(path), load_external_data=False).graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
        assert big and {e.value for t in big for e in t.external_data if e.key == "location"} == {"weights.bin"}
        onnx.checker.check_model(str(path), full_check=True)


def test_shared_weights_dedup(tmp_path):
    a = onnx.numpy_helper.from_array(np.arange(1024, dtype=np.float32), "a")
    b = onnx.numpy_helper.from_array(np.arange(1024, dtype=np.float32), "b")
    graph = onnx.helper.make_graph([], "g", [], [], initializer=[a, b])
    store = SharedWeights(tmp_path)
    store.externalize(onnx.helper.make_model(graph))
    assert store.unique == 1 and store.tensors == 2 and store.size == 4096


def test_wrong_past_length_refused(bundle):
    cfg = get_preset("waveclip-tiny")
    sess = ort.InferenceSession(str(bundle / "level2.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"patches": np.zeros((1, cfg.patches_per_level, cfg.patch_dim(2)), np.float32)}
    wrong = np.zeros((1, cfg.heads, cfg.past_length(1), cfg.head_dim), np.float32)
    feeds.update({i.name: wrong for i in sess.get_inputs()[1:]})
    with pytest.raises(Exception, match="dimension"):
        sess.run(None, feeds)


def test_existing_output_refused(bundle, tiny_ckpt, capsys):
    before = (bundle / "manifest.json").read_bytes()
    assert export(tiny_ckpt, bundle) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--force" in err and len(err.splitlines()) == 1
    assert (bundle / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("kind", ["garbage", "version"])
def test_bad_checkpoint_exit_2(tmp_path, kind):
    ckpt = tmp_path / "bad.pt"
    if kind == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"format": "waveclip-edge/checkpoint", "format_version": 99}, ckpt)
    proc = subprocess.run([sys.executable, "-m", "export.onnx", str(ckpt), "-o", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert ("version" in proc.stderr) == (kind == "version")
    assert not (tmp_path / "out").exists()


def _no_leftovers(out: Path) -> None:
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_write_failure_midway_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = SharedWeights._store

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] > 20:  # after level 0 is on disk
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(SharedWeights, "_store", failing)
    out = tmp_path / "bundle"
    assert export(tiny_ckpt, out, "--no-optimize") == 2
    assert "No space left on device" in capsys.readouterr().err
    _no_leftovers(out)


def test_validation_failure_writes_nothing(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert export(tiny_ckpt, out, "--no-optimize", "--atol", "0") == 1
    assert "validation failed" in capsys.readouterr().err
    _no_leftovers(out)


def test_levels_must_be_a_prefix(tiny_ckpt, tmp_path, capsys):
    assert export(tiny_ckpt, tmp_path / "a", "--levels", "0,2") == 2
    assert "prefix" in capsys.readouterr().err
    assert export(tiny_ckpt, tmp_path / "b", "--levels", "0,1", "--no-optimize") == 0
    m = load_bundle(tmp_path / "b").manifest
    assert [lv["file"] for lv in m["levels"]] == ["level0.onnx", "level1.onnx"] and m["gate"]["thresholds"] == [0.5]


def test_fp16_export_validates(tiny_ckpt, tmp_path):
    out = tmp_path / "fp16"
    assert export(tiny_ckpt, out, "--fp16", "--no-optimize") == 0
    b = load_bundle(out)
    assert b.manifest["precision"] == "fp16"
    sess = ort.InferenceSession(str(out / "level3.onnx"), providers=["CPUExecutionProvider"])
    assert {i.type for i in sess.get_inputs()} | {o.type for o in sess.get_outputs()} == {"tensor(float)"}
    weights = onnx.load(str(out / "level3.onnx"), load_external_data=False).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_full_graph_matches_torch(tiny_ckpt, tmp_path):
    model, _ = load_checkpoint(tiny_ckpt)
    cfg = model.config
    export_full_graph(model, 3, tmp_path / "full.onnx")
    patches = [np.random.default_rng(k).standard_normal((2, cfg.patches_per_level, cfg.patch_dim(k)), np.float32)
               for k in range(3)]
    sess = ort.InferenceSession(str(tmp_path / "full.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {f"patches.{k}": p for k, p in enumerate(patches)})
    with torch.no_grad():
        ref = model([torch.from_numpy(p) for p in patches])[-1].numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_bench_kv_cache_table(bundle):
    proc = subprocess.run([sys.executable, "bench/bench_kv_cache.py", str(bundle), "--runs", "3", "--warmup", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4


def test_help_explains_flags():
    text = export_cli._parser().format_help()
    for flag in ("--opset", "--levels", "--fp16", "--force", "--images", "--no-optimize", "--atol"):
        assert flag in text


@pytest.mark.slow
def test_b16_random_init_export(tmp_path):
    ckpt = make_checkpoint(tmp_path / "b16.pt", "waveclip-b16", classes=10)
    out = tmp_path / "b16"
    rc = export_cli.main([str(ckpt), "-o", str(out), "-q", *(["--images", *map(str, IMAGES[:2])] if IMAGES else [])])
    assert rc == 0
    result = json.loads((out / "validation.json").read_text())
    assert result["passed"] and len(result["levels"]) == 4
    assert sum(p.stat().st_size for p in out.iterdir()) < 1.5 * param_bytes(ckpt)


def test_two_layer_patch_embedding_exports_and_validates(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("waveclip-tiny").replace(patch_hidden=24)
    head = {"class_names": [f"class {i}" for i in range(4)], "labels": [f"n{i:08d}" for i in range(4)],
            "weight": torch.nn.functional.normalize(torch.randn(4, cfg.embed_dim), dim=-1), "bias": torch.zeros(4),
            "logit_scale": 100.0}
    save_checkpoint(tmp_path / "c.pt", WaveCLIP(cfg), head, teacher="random-init")
    assert export(tmp_path / "c.pt", tmp_path / "bundle") == 0
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["patch_hidden"] == 24
    validate_manifest(manifest)


def test_validation_images_are_capped(tmp_path, tiny_checkpoint, capsys):
    """A folder of many images validates on --max-images of them, evenly spaced (one batch: a folder of 1,000
    imagenet-sample images made a b16 export take over 24 GiB); the report names the subset."""
    from conftest import write_noise_images
    from export.validate import find_images

    (tmp_path / "imgs").mkdir()
    write_noise_images(tmp_path / "imgs", 40, 40, count=10)
    found, source = find_images([tmp_path / "imgs"], limit=4)
    assert [Path(f).name for f in found] == ["0.png", "2.png", "5.png", "7.png"] and source == "--images (4 of 10)"
    assert find_images([tmp_path / "imgs"], limit=10)[1] == "--images"
    out = tmp_path / "bundle"
    assert export_cli.main([str(tiny_checkpoint), "-o", str(out), "--images", str(tmp_path / "imgs"),
                            "--max-images", "3", "-q", "--no-split", "--no-full"]) == 0
    report = json.loads((out / "validation.json").read_text())
    assert report["images"]["count"] == 3 and report["images"]["source"] == "--images (3 of 10)"
    with pytest.raises(SystemExit) as bad:
        export_cli.main([str(tiny_checkpoint), "-o", str(tmp_path / "b2"), "--max-images", "0"])
    assert bad.value.code == 2
    assert "--max-images" in capsys.readouterr().err


def test_level_grids_export_and_run_everywhere(tmp_path):
    """A model whose finest level has its own (finer) grid exports, validates every graph (levels, split body with
    its varying token count, one pass) against torch, and runs from the manifest alone in every CPU backend."""
    from runtime.bundle import BundleError
    from runtime.cascade import Cascade
    from runtime.manifest_check import check_manifest

    torch.manual_seed(0)
    cfg = get_preset("waveclip-tiny", level_grids=[4, 4, 4, 8])
    head = {"class_names": [f"class {i}" for i in range(4)], "labels": [f"n{i:08d}" for i in range(4)],
            "weight": torch.nn.functional.normalize(torch.randn(4, cfg.embed_dim), dim=-1), "bias": torch.zeros(4),
            "logit_scale": 100.0}
    model = WaveCLIP(cfg).eval()
    save_checkpoint(tmp_path / "c.pt", model, head, teacher="random-init")
    assert export(tmp_path / "c.pt", tmp_path / "bundle") == 0
    report = json.loads((tmp_path / "bundle" / "validation.json").read_text())
    assert report["passed"] and report["split"]["passed"] and report["full"]["passed"]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    validate_manifest(manifest)
    assert "tokens_per_level" not in manifest["kv_cache"]
    assert [lv["tokens"] for lv in manifest["levels"]] == [17, 17, 17, 65]
    assert [lv["grid"] for lv in manifest["preprocessing"]["levels"]] == [4, 4, 4, 8]

    rgb = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    levels = images_to_levels(rgb, manifest["preprocessing"])
    with torch.no_grad():
        ref = [e.numpy() for e in model([torch.from_numpy(p) for p in levels])]
    bundle = load_bundle(tmp_path / "bundle")
    for backend, weights in [("onnxruntime", "levels"), ("onnxruntime", "split"), ("openvino", "split")]:
        if backend == "openvino":
            pytest.importorskip("openvino")
        cascade = Cascade(bundle, backend=backend, one_pass=False, weights=weights)
        got = cascade.classify_levels(levels, keep_embeddings=True, exit_levels=[1, 3])  # rows part at level 1
        assert [r.exit_level for r in got] == [1, 3]
        assert np.abs(got[0].embedding - ref[1][0]).max() <= 1e-4 and np.abs(got[1].embedding - ref[3][1]).max() <= 1e-4
        assert np.abs(np.stack(cascade.run_all_levels(levels)) - np.stack(ref)).max() <= 1e-4, (backend, weights)
        one_pass = Cascade(bundle, backend=backend, thresholds=1.01, weights=weights)
        assert one_pass.all_levels_in_one_pass
        assert np.abs(np.stack(one_pass.run_all_levels(levels)) - np.stack(ref)).max() <= 1e-4, (backend, weights)

    check_manifest(manifest, "m")
    for part, key, value, match in [("kv_cache", "tokens_per_level", 17, "must be absent"),
                                    ("model", "level_grids", [4, 4, 4, 6], r"level_grids\[3\]")]:
        broken = json.loads(json.dumps(manifest))
        broken[part][key] = value
        with pytest.raises(BundleError, match=match):
            check_manifest(broken, "m")
    broken = json.loads(json.dumps(manifest))
    broken["preprocessing"]["levels"][3]["grid"] = 4
    with pytest.raises(BundleError, match=r"levels\[3\].grid"):
        check_manifest(broken, "m")
