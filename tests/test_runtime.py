"""The torch-free runtime: cascade decisions, batching, backends, CLI and bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.backends import BackendError
from runtime.bundle import BundleError, load_bundle
from runtime.cascade import Cascade, margins, softmax
from runtime.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def images() -> list[Path]:
    """48 real photos from ../shared/data, or the repo's own 4 sample images where that is absent."""
    from conftest import DATA

    real = sorted((DATA / "imagenet-sample").glob("*.JPEG"))[:48]
    return real or EXAMPLES


def torch_reference(ckpt_path, levels, thresholds):
    """Exit level, label index and margin of each image computed with the PyTorch model (full masked forward)."""
    import torch

    from model.checkpoint import load_checkpoint

    model, ckpt = load_checkpoint(ckpt_path)
    head = ckpt["head"]
    with torch.no_grad():
        embs = model([torch.from_numpy(x) for x in levels])
    out = []
    for i in range(levels[0].shape[0]):
        for k, emb in enumerate(embs):
            probs = torch.softmax(head["logit_scale"] * emb[i] @ head["weight"].T + head["bias"], -1)
            top2 = probs.topk(2).values
            margin = float(top2[0] - top2[1])
            if k == len(embs) - 1 or margin >= thresholds[k]:
                out.append((k, int(probs.argmax()), margin, emb[i].numpy()))
                break
    return out


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_decisions_equal_pytorch_reference(tiny_bundle, tiny_checkpoint, images, quantile):
    bundle = load_bundle(tiny_bundle)
    levels = preprocess(images, bundle.preprocessing)
    level0 = Cascade(bundle, max_level=0).classify_levels(levels)
    threshold = float(np.quantile([r.margin for r in level0], quantile))
    ref = torch_reference(tiny_checkpoint, levels, [threshold] * 3)
    got = Cascade(bundle, thresholds=threshold).classify_levels(levels)
    assert [r.exit_level for r in got] == [k for k, *_ in ref]
    assert [r.label for r in got] == [bundle.labels[c] for _, c, *_ in ref]
    np.testing.assert_allclose([r.margin for r in got], [m for *_, m, _ in ref], atol=1e-4)
    assert len({r.exit_level for r in got}) > 1, "threshold should split the images across levels"


def test_threshold_zero_exits_at_level_zero(tiny_bundle, images):
    results = Cascade(tiny_bundle, thresholds=0.0).classify(images)
    assert {r.exit_level for r in results} == {0}
    assert all(len(r.level_ms) == 1 for r in results)


def test_threshold_above_one_runs_everything_and_equals_full_model(tiny_bundle, tiny_checkpoint, images):
    cascade = Cascade(tiny_bundle, thresholds=1.01)
    levels = preprocess(images, cascade.bundle.preprocessing)
    results = cascade.classify_levels(levels, keep_embeddings=True)
    assert {r.exit_level for r in results} == {3}
    ref = torch_reference(tiny_checkpoint, levels, [1.01] * 3)
    np.testing.assert_allclose(np.stack([r.embedding for r in results]), np.stack([e for *_, e in ref]), atol=1e-4)


def test_max_level_and_per_level_thresholds(tiny_bundle, images):
    results = Cascade(tiny_bundle, thresholds=[1.01, 1.01, 1.01], max_level=1).classify(images[:8])
    assert {r.exit_level for r in results} == {1}
    with pytest.raises(ValueError, match="need 3 thresholds"):
        Cascade(tiny_bundle, thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match="max level"):
        Cascade(tiny_bundle, max_level=7)


def test_batched_equals_one_by_one(tiny_bundle, images):
    cascade = Cascade(tiny_bundle, max_level=0)
    cascade.thresholds = [float(np.median([r.margin for r in cascade.classify(images)]))] * 3
    cascade.max_level = 3
    batched = cascade.classify(images)
    single = [cascade.classify([im])[0] for im in images]
    assert [(r.label, r.exit_level) for r in batched] == [(r.label, r.exit_level) for r in single]
    np.testing.assert_allclose([r.score for r in batched], [r.score for r in single], atol=1e-5)


def test_io_binding_equals_numpy_round_trip(tiny_bundle, images):
    a = Cascade(tiny_bundle, thresholds=0.01).classify(images[:16])
    b = Cascade(tiny_bundle, thresholds=0.01, io_binding=False).classify(images[:16])
    assert [(r.label, r.exit_level) for r in a] == [(r.label, r.exit_level) for r in b]


def test_wrong_kv_length_is_refused(tiny_bundle):
    cascade = Cascade(tiny_bundle)
    patches = np.zeros((1, 16, cascade.bundle.manifest["model"]["channels"] * 3 * 4 * 4), np.float32)
    wrong = [np.zeros((1, 2, 17, 32), np.float32)] * 4
    with pytest.raises(BackendError, match="past length 34"):
        cascade.backend.run_level(2, patches, wrong)


def test_openvino_agrees_with_onnxruntime(tiny_bundle, data_dir):
    pytest.importorskip("openvino")
    from runtime.data import read_image_list

    records = read_image_list(data_dir / "tiny-imagenet-200" / "labels.csv", split="val", limit=400)
    paths = [r.path for r in records]
    ort_res = Cascade(tiny_bundle, thresholds=0.01).classify(paths)
    ov_res = Cascade(tiny_bundle, backend="openvino", thresholds=0.01).classify(paths)
    agree = np.mean([a.label == b.label for a, b in zip(ort_res, ov_res)])
    assert agree >= 0.999


def test_label_subset(tiny_bundle, images):
    cascade = Cascade(tiny_bundle, labels=["class 1", "c3", "class 7"], top_k=3)
    results = cascade.classify(images[:4])
    assert all(r.class_name in {"class 1", "class 3", "class 7"} for r in results)
    assert all(abs(sum(s for _, s in r.top_k) - 1) < 1e-5 for r in results)
    with pytest.raises(ValueError, match="not in the bundle"):
        Cascade(tiny_bundle, labels=["class 1", "zebra"])


def test_softmax_margin():
    p = softmax(np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(p.sum(-1), 1)
    np.testing.assert_allclose(margins(p), [p[0, 0] - p[0, 1], 0.0], atol=1e-7)


def test_runtime_never_imports_torch(tiny_bundle):
    code = (
        "import sys; from runtime.cascade import Cascade; import runtime.classify;"
        f"r = Cascade({str(tiny_bundle)!r}).classify([{str(EXAMPLES[0])!r}]);"
        "assert r[0].label; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime.classify", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def test_cli_json(tiny_bundle):
    out = run_cli(tiny_bundle, REPO / "examples" / "images", "--json", "--threshold", "0.01", "--top-k", "3")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["results"]) == len(EXAMPLES)
    assert sum(doc["summary"]["exit_histogram"].values()) == len(EXAMPLES)
    r = doc["results"][0]
    assert len(r["top_k"]) == 3 and len(r["level_ms"]) == r["exit_level"] + 1


def test_cli_pool_gives_the_batch_answers_in_input_order(tiny_bundle):
    """--pool (undecided images wait for later batches' at the same level): the same labels and exits as the
    batch-by-batch run, --json in input order, an image given twice answered twice."""
    images = [*EXAMPLES, EXAMPLES[0]]
    runs = {}
    for extra in ([], ["--pool"]):
        out = run_cli(tiny_bundle, *images, "--json", "--threshold", "0.01", "0.02", "0.05", "--batch-size", "3",
                      *extra)
        assert out.returncode == 0, out.stderr
        runs[bool(extra)] = [(r["image"], r["label"], r["exit_level"]) for r in json.loads(out.stdout)["results"]]
    assert [r[0] for r in runs[True]] == [str(p) for p in images]
    assert runs[True] == runs[False] and len({r[2] for r in runs[True]}) > 1
    out = run_cli(tiny_bundle, *images, "--threshold", "0.01", "0.02", "0.05", "--batch-size", "3", "--pool")
    assert out.returncode == 0 and out.stdout.count(" exit level ") == len(images)


def test_cli_weights_picks_the_graphs_an_int8_bundle_runs():
    """An int8 bundle's level graphs and split body are quantized apart: --weights levels runs the level graphs,
    split the split body (the default); each equals the Cascade of that mode, and the two differ."""
    int8 = REPO / "models" / "waveclip-demo" / "bundle-int8"
    margins_by_mode = {}
    for mode in ("levels", "split"):
        out = run_cli(int8, REPO / "examples" / "images", "--json", "--weights", mode)
        assert out.returncode == 0, out.stderr
        got = {Path(r["image"]).name: (r["label"], r["exit_level"], r["margin"])
               for r in json.loads(out.stdout)["results"]}
        results = Cascade(int8, weights=mode).classify(EXAMPLES)
        want = {p.name: (r.label, r.exit_level, r.margin) for p, r in zip(EXAMPLES, results)}
        assert got.keys() == want.keys()
        for name in got:
            assert got[name][:2] == want[name][:2] and got[name][2] == pytest.approx(want[name][2], abs=1e-4), name
        margins_by_mode[mode] = [got[n][2] for n in sorted(got)]
    assert np.abs(np.subtract(margins_by_mode["levels"], margins_by_mode["split"])).max() > 1e-3
    out = run_cli(int8, EXAMPLES[0], "--weights", "levels", "--backend", "tensorrt")
    assert out.returncode == 2 and out.stderr.strip() == "error: --weights applies to --backend onnxruntime or openvino"


def test_cli_bad_images_are_skipped_and_the_rest_classified(tiny_bundle, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(EXAMPLES[0], folder / "good.jpg")
    data = EXAMPLES[1].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "garbage.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    bomb = folder / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb, optimize=True)  # 81 MP of zeros: a few KB on disk
    out = run_cli(tiny_bundle, folder, "--json")
    doc = json.loads(out.stdout)
    names = {Path(r["image"]).name for r in doc["results"]}
    assert names == {"good.jpg", "tiny.png"}
    assert doc["summary"]["skipped"] == 3
    assert "Traceback" not in out.stderr
    assert "decompression bomb" in out.stderr and "truncated.jpg" in out.stderr


def test_zero_sized_array_is_refused():
    from runtime.preprocess import ImageError, image_to_array

    with pytest.raises(ImageError, match="zero-sized"):
        image_to_array(np.zeros((0, 5, 3), np.uint8), {"image_size": 64})


@pytest.mark.parametrize("damage", ["missing", "tampered", "version"])
def test_cli_refuses_broken_bundles(tiny_bundle, tmp_path, damage):
    broken = tmp_path / "b"
    shutil.copytree(tiny_bundle, broken)
    if damage == "missing":
        (broken / "level2.onnx").unlink()
    elif damage == "tampered":
        with open(broken / "level1.onnx", "ab") as f:
            f.write(b"\0")
    else:
        m = json.loads((broken / "manifest.json").read_text())
        m["format_version"] = 2
        (broken / "manifest.json").write_text(json.dumps(m))
    out = run_cli(broken, EXAMPLES[0])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    expected = {"missing": "missing file level2.onnx", "tampered": "sha256", "version": "format version 2"}[damage]
    assert expected in out.stderr
    with pytest.raises(BundleError):
        load_bundle(broken)


def test_example_app_once(tiny_bundle):
    out = subprocess.run([sys.executable, "examples/watch_folder.py", str(tiny_bundle), "examples/images", "--once",
                          "--labels", "class 0,class 1,class 2"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("exit level") == len(EXAMPLES)


def test_missing_backend_names_its_extra(tiny_bundle, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'", name="tensorrt")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    monkeypatch.delitem(sys.modules, "runtime.backends.tensorrt", raising=False)
    with pytest.raises(BackendError, match=r"pip install 'waveclip-edge\[tensorrt\]'"):
        Cascade(tiny_bundle, backend="tensorrt")


@pytest.mark.gpu
def test_tensorrt_matches_onnxruntime(tiny_bundle, images):
    """Runs where an NVIDIA GPU, TensorRT and cuda-python exist; skips cleanly elsewhere."""
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    ref = Cascade(tiny_bundle, thresholds=1.01).classify_levels(
        preprocess(images, load_bundle(tiny_bundle).preprocessing), keep_embeddings=True)
    trt = Cascade(tiny_bundle, backend="tensorrt", thresholds=1.01, precision="fp32")
    got = trt.classify_levels(preprocess(images, trt.bundle.preprocessing), keep_embeddings=True)
    np.testing.assert_allclose(np.stack([r.embedding for r in got]), np.stack([r.embedding for r in ref]), atol=1e-3)
