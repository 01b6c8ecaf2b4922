"""apps/web: the JavaScript cascade matches the Python runtime (under Node), and the page works in headless Chromium.

What is compared, and why it is a fair comparison:
- Patch parity: Pillow decodes each image once (``runtime.preprocess.load_image``: EXIF, RGB); the same decoded RGB
  goes to the JS module (resize, crop, YCbCr, DWT, patches) and to ``runtime.preprocess.preprocess``. The 8-bit crops
  must be identical (the JS reimplements Pillow's resampling) and every patch value within 1e-5. Image decoding itself
  is left out on purpose: JPEG decoders may differ by design, and that is not the manifest's contract.
- Decisions: the JS cascade (onnxruntime-node) on those patches against ``python -m runtime.classify --json`` on the
  image files: same label and exit level, except where the gate margin is within 1e-5 of its threshold (two float
  implementations may legitimately disagree there; such cases are counted and must stay rare).
- Browser: the page, served from 127.0.0.1, gets files through its file input as a user would, decodes them itself,
  and its model input (the 8-bit crop) must equal Pillow's, its label and exit level runtime.classify's: for a PNG
  (lossless) and for the shipped JPEGs (Chromium and Pillow both decode with libjpeg-turbo).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.data import read_image_list, spread
from runtime.preprocess import image_to_array, load_image, preprocess

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "apps" / "web"
BUNDLE = REPO / "models" / "waveclip-demo" / "bundle"
BUNDLE_INT8 = REPO / "models" / "waveclip-demo" / "bundle-int8"
EXAMPLES = sorted((REPO / "examples" / "images").glob("*.jpg"))
PATCH_ATOL = 1e-5
BORDERLINE = 1e-5  # a margin this close to its threshold may fall either way
SAMPLE_IMAGES = 300


def _missing(reason: str):
    """Skip where a tool is missing, but fail in CI, which must have it (.ci/run installs it)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if not path:
        _missing("node not found: install Node.js >= 18 (Debian: apt-get install nodejs npm)")
    if not (WEB / "node_modules" / "onnxruntime-node").is_dir():
        _missing("apps/web/node_modules missing: run `npm ci` in apps/web")
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get("WAVECLIP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _missing("chromium not found: install it (Debian: apt-get install chromium) or set WAVECLIP_CHROMIUM")
    return path


def decode_all(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(load_image(p), dtype=np.uint8) for p in paths]


def run_js(node: str, paths: list[Path], arrays: list[np.ndarray], work: Path, *extra: str, bundle: Path = BUNDLE
           ) -> Path:
    """Hand the decoded RGB to apps/web/test/parity.js; returns its output folder."""
    work.mkdir(parents=True, exist_ok=True)
    index, offset = [], 0
    with open(work / "rgb.bin", "wb") as f:
        for path, a in zip(paths, arrays):
            index.append({"name": str(path), "width": a.shape[1], "height": a.shape[0], "offset": offset})
            f.write(a.tobytes())
            offset += a.nbytes
    (work / "index.json").write_text(json.dumps(index))
    out = work / "js"
    subprocess.run([node, str(WEB / "test" / "parity.js"), "--bundle", str(bundle), "--pixels", str(work / "rgb.bin"),
                    "--index", str(work / "index.json"), "--out", str(out), *extra], check=True, cwd=WEB,
                   stdout=subprocess.DEVNULL)
    return out


def python_classify(paths: list[Path], bundle: Path = BUNDLE, *extra: str) -> dict:
    """``python -m runtime.classify BUNDLE IMAGES --json``, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "runtime.classify", str(bundle), *map(str, paths), "--json", *extra],
                          check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(proc.stdout)


def compare_decisions(js: list[dict], py: dict, tolerance: float = BORDERLINE) -> tuple[list[str], list[str]]:
    """(real mismatches, borderline ones: a margin within ``tolerance`` of its threshold) between JS results and
    runtime.classify's, by image."""
    thresholds = py["thresholds"]
    by_image = {r["image"]: r for r in py["results"]}
    mismatches, borderline = [], []
    for j in js:
        p = by_image[j["name"]]
        if (j["label"], j["exit_level"]) == (p["label"], p["exit_level"]):
            continue
        k = min(j["exit_level"], p["exit_level"])
        near = (k < len(thresholds) and abs(j["level_margins"][k] - thresholds[k]) < tolerance) or \
               (j["exit_level"] == p["exit_level"] and j["margin"] < tolerance)
        line = (f"{j['name']}: js {j['label']}@{j['exit_level']} vs python {p['label']}@{p['exit_level']} "
                f"(js margin at level {k}: {j['level_margins'][k]:.6f}"
                + (f", threshold {thresholds[k]:.6f})" if k < len(thresholds) else ")"))
        (borderline if near else mismatches).append(line)
    return mismatches, borderline


def check_parity(node: str, paths: list[Path], work: Path, bundle: Path = BUNDLE, weights: str = "auto",
                 tolerance: float = BORDERLINE) -> None:
    """The JS module and runtime.classify on the same decoded pixels, both holding the graphs as ``weights`` says
    (auto: the split graphs; an int8 bundle quantizes its level graphs and split body apart)."""
    arrays = decode_all(paths)
    out = run_js(node, paths, arrays, work, "--weights", weights, bundle=bundle)
    spec = json.loads((bundle / "manifest.json").read_text())["preprocessing"]
    size = spec["image_size"]
    crops = np.fromfile(out / "crops.bin", np.uint8).reshape(len(paths), size, size, 3)
    expected = np.stack([image_to_array(a, spec) for a in arrays])
    differing = [str(p) for p, c, e in zip(paths, crops, expected) if not np.array_equal(c, e)]
    assert not differing, f"JS resize/crop differs from Pillow on {len(differing)} images, e.g. {differing[:3]}"
    levels = preprocess(arrays, spec)
    for k, ref in enumerate(levels):
        js = np.fromfile(out / f"level{k}.bin", np.float32).reshape(ref.shape)
        err = float(np.abs(js - ref).max())
        assert err <= PATCH_ATOL, f"level {k}: JS patches differ by {err:.2e} (> {PATCH_ATOL})"
    js_results = json.loads((out / "results.json").read_text())
    mismatches, borderline = compare_decisions(js_results, python_classify(paths, bundle, "--weights", weights),
                                               tolerance)
    assert not mismatches, f"{len(mismatches)} of {len(paths)} decisions differ: {mismatches[:5]}"
    assert len(borderline) <= max(1, len(paths) // 100), f"too many borderline decisions: {borderline}"


@pytest.mark.parametrize("bundle", [BUNDLE, BUNDLE_INT8], ids=["fp32", "int8"])
@pytest.mark.parametrize("weights", ["auto", "levels"])
def test_js_matches_python_on_shipped_images(node, tmp_path, bundle, weights):
    check_parity(node, EXAMPLES, tmp_path, bundle, weights)


@pytest.fixture(scope="module")
def weight_only_bundle(tmp_path_factory) -> Path:
    """The demo bundle with int8 weights (``calibration.quantize --method weight-only``: ONNX Runtime's
    MatMulNBits, a com.microsoft op that onnxruntime-node and onnxruntime-web must both run)."""
    out = tmp_path_factory.mktemp("weight-only") / "bundle"
    subprocess.run([sys.executable, "-m", "calibration.quantize", str(BUNDLE), "--data",
                    str(REPO / "examples" / "images"), "-o", str(out), "--method", "weight-only",
                    "--eval-samples", "8", "--min-agreement", "0", "-q"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def test_js_runs_a_weight_only_bundle(node, weight_only_bundle, tmp_path):
    for graph in ("level0.onnx", "body.onnx"):  # the graphs really hold the weight-only op
        assert b"MatMulNBits" in (weight_only_bundle / graph).read_bytes(), graph
    # MatMulNBits' accuracy level is a hint: Python's onnxruntime quantizes the activations per block (int8 compute),
    # onnxruntime-node may compute in float. The bell pepper's level-2 margin with the head refit alone: fp32 0.0626,
    # Python 0.0705, JS 0.0663 (threshold 0.0699), so decisions may differ where a margin is within 0.01 of its threshold.
    check_parity(node, EXAMPLES, tmp_path, weight_only_bundle, tolerance=0.01)


@pytest.mark.slow
def test_js_matches_python_on_imagenet_sample(node, data_dir, tmp_path):
    records = spread(read_image_list(data_dir / "imagenet-sample"), SAMPLE_IMAGES, seed=0)
    check_parity(node, [r.path for r in records], tmp_path)


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_js_resize_matches_pillow_for_every_manifest_filter(node, tmp_path, resample):
    """Photos and noise (which no rounding slip survives) of shapes that take every pass order, up and down."""
    spec = dict(json.loads((BUNDLE / "manifest.json").read_text())["preprocessing"], resample=resample)
    rng = np.random.default_rng(0)
    shapes = [(500, 241), (241, 500), (300, 40), (40, 300), (7, 5), (64, 64), (65, 129), (1000, 998)]
    arrays = decode_all(EXAMPLES) + [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    paths = EXAMPLES + [Path(f"noise{h}x{w}") for h, w in shapes]
    out = run_js(node, paths, arrays, tmp_path, "--resample", resample, "--no-cascade")
    size = spec["image_size"]
    crops = np.fromfile(out / "crops.bin", np.uint8).reshape(len(arrays), size, size, 3)
    for path, crop, a in zip(paths, crops, arrays):
        np.testing.assert_array_equal(crop, image_to_array(a, spec), err_msg=str(path))


def test_js_refuses_a_tampered_bundle(node, tmp_path):
    tampered = tmp_path / "bundle"
    shutil.copytree(BUNDLE, tampered)
    data = bytearray((tampered / "level2.onnx").read_bytes())
    data[-1] ^= 1
    (tampered / "level2.onnx").write_bytes(bytes(data))
    script = ("import {openBundle} from './src/node.js';"
              f"openBundle({json.dumps(str(tampered))}).then(() => console.log('loaded'), e => console.log(e.message));")
    proc = subprocess.run([node, "--input-type=module", "-e", script], cwd=WEB, capture_output=True, text=True,
                          check=True)
    assert "level2.onnx does not match its sha256" in proc.stdout


def test_js_refuses_an_openvino_bundle_in_one_line(node, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "graph_format": "openvino"}))
    script = ("import {openBundle} from './src/node.js';"
              f"openBundle({json.dumps(str(bundle))}).then(() => console.log('loaded'), e => console.log(e.message));")
    proc = subprocess.run([node, "--input-type=module", "-e", script], cwd=WEB, capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == ('manifest.json: graph format "openvino" is not supported: the browser runs ONNX '
                                   'bundles (this one needs the Python runtime)')


class StaticServer:
    """apps/web/serve.js on 127.0.0.1 (a free port), with extra folders mounted."""

    def __init__(self, node: str, mounts: dict[str, Path]):
        args = [node, str(WEB / "serve.js"), "--port", "0"]
        for prefix, folder in mounts.items():
            args += ["--mount", f"{prefix}={folder}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line
        self.url = line.split(" at ")[1].strip()

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_browser(node: str, chromium: str, url: str, cases: list[dict], work: Path) -> dict:
    (work / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([node, str(WEB / "test" / "browser.js"), "--chromium", chromium, "--url", url,
                           "--cases", str(work / "cases.json"), "--out", str(work / "out.json")], cwd=WEB,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"browser driver failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return {c["name"]: c for c in json.loads((work / "out.json").read_text())}


@pytest.mark.slow
def test_page_in_headless_chromium(node, chromium, weight_only_bundle, tmp_path):
    png = tmp_path / "chelsea_cat.png"
    load_image(REPO / "examples" / "images" / "chelsea_cat.jpg").save(png)
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "fake.jpg").write_bytes(b"this is text, named like a JPEG\n" * 10)
    Image.new("RGB", (8000, 6000), (40, 90, 160)).save(tmp_path / "huge.png")  # 48 MP
    tampered = tmp_path / "tampered"
    shutil.copytree(BUNDLE, tampered)
    weights = bytearray((tampered / "head_weight.bin").read_bytes())
    weights[100] ^= 0xFF
    (tampered / "head_weight.bin").write_bytes(bytes(weights))
    broken = tmp_path / "no-node-modules"  # the page without `npm ci`: its scripts cannot load
    shutil.copytree(WEB / "src", broken / "src")
    shutil.copy(WEB / "index.html", broken)

    uploads = [{"name": p.name, "file": str(p)} for p in EXAMPLES]
    uploads[0]["screenshot"] = str(tmp_path / "page.png")
    uploads += [{"name": "png", "file": str(png)},
                {"name": "text", "file": str(tmp_path / "notes.txt")},
                {"name": "fake-jpeg", "file": str(tmp_path / "fake.jpg")},
                {"name": "huge", "file": str(tmp_path / "huge.png")},
                {"name": "after-errors", "file": str(png)}]  # the page still works after bad input
    cases = [{"name": "demo-bundle", "uploads": uploads},
             {"name": "int8-folder", "bundle_files": [str(BUNDLE_INT8)],
              "uploads": [{"name": "int8", "file": str(png)}]},
             {"name": "weight-only-folder", "bundle_files": [str(weight_only_bundle)],
              "uploads": [{"name": "weight-only", "file": str(png)}]},
             {"name": "tampered", "query": "?bundle=/tampered/"},
             {"name": "missing-bundle", "query": "?bundle=/no-such-bundle/"},
             {"name": "no-scripts", "query": "/broken/index.html"}]
    server = StaticServer(node, {"/tampered/": tampered, "/broken/": broken})
    try:
        out = run_browser(node, chromium, server.url, cases, tmp_path)
    finally:
        server.close()

    py = python_classify(EXAMPLES + [png])
    by_image = {Path(r["image"]).name: r for r in py["results"]}
    assert out["demo-bundle"]["state"] == "ready" and "verified" in out["demo-bundle"]["bundle_status"]
    for name in [p.name for p in EXAMPLES] + ["png", "after-errors"]:
        page, ref = out[name], by_image[name if name.endswith(".jpg") else png.name]
        assert page["state"] == "done" and page["result_visible"], (name, page["message"], page["console"])
        assert (page["label"], page["exit_level"]) == (ref["label"], ref["exit_level"]), name
        assert page["class_name"] == ref["class_name"]
        assert len(page["result"]["level_ms"]) == ref["exit_level"] + 1
    # a bundle folder chosen in the page (the int8 one): its own manifest, graphs and decisions
    folder = out["int8-folder"]
    assert folder["state"] == "ready" and "(int8, 4 levels" in folder["bundle_name"], folder
    int8 = python_classify([png], BUNDLE_INT8)["results"][0]  # both run the split graphs by default
    assert (out["int8"]["label"], out["int8"]["exit_level"]) == (int8["label"], int8["exit_level"])
    # weight-only int8 (MatMulNBits) runs in onnxruntime-web's WASM too, with runtime.classify's decision
    assert out["weight-only-folder"]["state"] == "ready", out["weight-only-folder"]
    wo = python_classify([png], weight_only_bundle)["results"][0]
    assert (out["weight-only"]["label"], out["weight-only"]["exit_level"]) == (wo["label"], wo["exit_level"])
    spec = json.loads((BUNDLE / "manifest.json").read_text())["preprocessing"]
    for name, source in [("png", png)] + [(p.name, p) for p in EXAMPLES]:
        expected_crop = image_to_array(load_image(source), spec)
        crop = np.array(out[name]["crop"], np.uint8).reshape(expected_crop.shape)
        # PNG: lossless, so any difference is the page's; JPEG: Chromium's libjpeg-turbo decodes as Pillow's does
        np.testing.assert_array_equal(crop, expected_crop, err_msg=f"{name}: the page's model input differs")
    assert (tmp_path / "page.png").stat().st_size > 20_000

    expected_messages = {"text": "is not an image", "fake-jpeg": "is not an image this browser can decode",
                         "huge": "megapixels", "tampered": "head_weight.bin does not match its sha256",
                         "missing-bundle": "missing from the bundle (HTTP 404)",
                         "no-scripts": "scripts could not load (run npm ci in apps/web)"}
    for name, words in expected_messages.items():
        page = out[name]
        assert page["state"] == "error" and words in page["message"], (name, page["message"])
        assert not page["result_visible"] and page["visible_text_chars"] > 200, name  # a message, never a blank page


def test_js_runs_a_model_with_a_finer_last_level(node, tmp_path):
    """A model whose finest level has its own grid (model.level_grids, each preprocessing level its ``grid``): the
    JS patches and decisions match Python's, in both weights modes (the split body takes either token count)."""
    import torch

    from export.onnx import main as export
    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.waveclip import WaveCLIP

    torch.manual_seed(0)
    cfg = get_preset("waveclip-tiny", level_grids=[4, 4, 4, 8])
    head = {"class_names": [f"class {i}" for i in range(5)], "labels": [f"c{i}" for i in range(5)],
            "weight": torch.nn.functional.normalize(torch.randn(5, cfg.embed_dim), dim=-1), "bias": torch.zeros(5),
            "logit_scale": 100.0}
    save_checkpoint(tmp_path / "c.pt", WaveCLIP(cfg).eval(), head, teacher="random-init")
    bundle = tmp_path / "bundle"
    assert export([str(tmp_path / "c.pt"), "-o", str(bundle), "-q", "--images", *map(str, EXAMPLES[:2])]) == 0
    for weights in ("auto", "levels"):
        check_parity(node, EXAMPLES, tmp_path / weights, bundle, weights)
