"""Property-based fuzzing (hypothesis) of every loader a user feeds: image bytes, bundle manifests (mutated valid
ones), data CSVs, device-profile TOML, label files, checkpoints.

The property: a valid result or a one-line error of the project's own type; never another exception, never a hang
(each example is timed out by hypothesis' health checks and pytest-timeout), never a file written half-way (a loader
writes nothing). CI runs a bounded, derandomised number of examples per loader; the long run is

    WAVECLIP_FUZZ_EXAMPLES=2000 nice -n 19 python -m pytest -m fuzz tests/test_fuzz.py
"""
import copy
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtime.bundle import BundleError, load_bundle
from runtime.data import DataError, read_image_list
from runtime.preprocess import ImageError, image_to_array

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "waveclip-demo"
EXAMPLES = int(os.environ.get("WAVECLIP_FUZZ_EXAMPLES", "0"))  # 0: the bounded CI run
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", parent=settings.get_profile("ci"), derandomize=False, max_examples=EXAMPLES or 1)
settings.load_profile("long" if EXAMPLES else "ci")

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(1800 if EXAMPLES else 600)]  # a hang detector, not a timing


def examples(ci: int):
    """``ci`` examples in CI, $WAVECLIP_FUZZ_EXAMPLES in the long run."""
    return settings(max_examples=EXAMPLES or ci)


def one_line(err: Exception) -> None:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")}


# --- JSON-ish values and mutations of a valid document ----------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["", "batch", "../x", "/etc/passwd", "%d", "%s", "level0.onnx", "float32",
                                     "0" * 64]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=8)


def paths_of(node, prefix=()):
    """Every (container path) of a JSON document, lists cut to their first 3 items (keeps the choice space small)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated(draw, document):
    """``document`` with 1-3 edits: a value replaced, a key deleted or added, a list item dropped or duplicated."""
    doc = copy.deepcopy(document)
    all_paths = [p for p in paths_of(doc) if p]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(all_paths))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            parent[last]
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "delete":
            del parent[last]
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(st.text(max_size=8))] = draw(json_values)
        elif action == "duplicate" and isinstance(parent[last], list) and parent[last]:
            parent[last].append(copy.deepcopy(parent[last][0]))
    return doc


# --- image bytes ---------------------------------------------------------------------------------------------------
SPEC = json.loads((DEMO / "bundle" / "manifest.json").read_text())["preprocessing"]
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA", "YCbCr"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]


@st.composite
def image_bytes(draw):
    from PIL import Image

    kind = draw(st.sampled_from(["encoded", "mutated", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    w, h = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    seed = draw(st.integers(0, 2 ** 16))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    try:
        im = Image.fromarray(pixels).convert(mode)
        buf = io.BytesIO()
        im.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@examples(150)
@given(data=image_bytes(), suffix=st.sampled_from([".jpg", ".png", ".gif", ".tiff", ".webp", ".bmp"]))
def test_image_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"image{suffix}"
        path.write_bytes(data)
        try:
            arr = image_to_array(path, SPEC)
        except ImageError as e:
            one_line(e)
        else:
            assert arr.dtype == np.uint8 and arr.shape == (SPEC["image_size"], SPEC["image_size"], 3)
        assert snapshot(Path(d)) == {f"image{suffix}": len(data)}


# --- manifests -----------------------------------------------------------------------------------------------------
MANIFEST = json.loads((DEMO / "bundle" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> Path:
    """The demo bundle's files, hard-linked into a fresh folder with each mutated manifest."""
    folder = tmp_path_factory.mktemp("demo-files")
    for p in (DEMO / "bundle").iterdir():
        if p.name != "manifest.json":  # copies: ONNX refuses external data with several hard links
            shutil.copy2(p, folder / p.name)
    return folder


def _bundle_with(files: Path, text: str, root: Path) -> Path:
    bundle = root / "b"
    bundle.mkdir()
    for p in files.iterdir():
        os.link(p, bundle / p.name)
    (bundle / "manifest.json").write_text(text)
    return bundle


@examples(40)
@given(manifest=mutated(MANIFEST))
def test_mutated_manifests_load_or_refuse(manifest, demo_files):
    from runtime.cascade import Cascade

    with tempfile.TemporaryDirectory() as d:
        bundle = _bundle_with(demo_files, json.dumps(manifest), Path(d))
        before = snapshot(bundle)
        try:
            b = load_bundle(bundle)
        except BundleError as e:
            one_line(e)
        else:  # a manifest that passes the check runs
            result = Cascade(b).classify([REPO / "examples" / "images" / "coffee.jpg"])[0]
            assert result.label in b.labels and 0 <= result.exit_level < b.num_levels
        assert snapshot(bundle) == before


@examples(80)
@given(manifest=mutated(MANIFEST))
def test_schema_rejections_are_checker_rejections(manifest):
    """In step with the published schema: whatever it refuses, the runtime's check refuses too."""
    import jsonschema

    from runtime.manifest_check import check_manifest

    schema = json.loads((REPO / "runtime" / "manifest.schema.json").read_text())
    if jsonschema.Draft202012Validator(schema).is_valid(manifest):
        return
    with pytest.raises(BundleError) as e:
        check_manifest(manifest)
    one_line(e.value)


@examples(60)
@given(text=st.text(max_size=300))
def test_manifest_text(text):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "manifest.json").write_text(text)
        with pytest.raises(BundleError) as e:
            load_bundle(d)
        one_line(e.value)


# --- data CSVs -----------------------------------------------------------------------------------------------------
cells = st.one_of(st.sampled_from(["path", "file", "wnid", "label", "split", "train", "val", "", "a.jpg", '"',
                                   "x,y", "\ufeff", "\r"]), st.text(max_size=8))


@examples(150)
@example(rows=[["path", "path"], ["path"]], raw=b"", split=None, limit=None)  # found in CI: a row short of its path
@example(rows=[['"'], []], raw=b"", split=None, limit=None)  # found by the long run: a header cell with a newline
@given(rows=st.lists(st.lists(cells, max_size=5), max_size=6), raw=st.binary(max_size=64),
       split=st.sampled_from([None, "train", "val", ""]), limit=st.sampled_from([None, 1, 3]))
def test_data_csv(rows, raw, split, limit):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.csv"
        path.write_bytes("\n".join(",".join(r) for r in rows).encode("utf-8", "surrogatepass") + raw)
        try:
            records = read_image_list(path, split, limit)
        except DataError as e:
            one_line(e)
        else:
            assert records and all(isinstance(r.path, Path) for r in records)
            assert limit is None or len(records) <= limit
        assert snapshot(Path(d)) == {"data.csv": path.stat().st_size}


# --- device-profile TOML -------------------------------------------------------------------------------------------
PROFILE_TEXTS = [p.read_text() for p in sorted((REPO / "devices" / "profiles").glob("*.toml"))]
toml_values = st.one_of(st.integers(-5, 2 ** 40), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=10).map(json.dumps), st.sampled_from(["[1, 2]", "[]", "[0]", '"GPU"', '"DLA"',
                                                                             "[1, 1]", '"CPUExecutionProvider"']))


@st.composite
def profile_text(draw):
    """A shipped profile with lines replaced, dropped or added, or plain text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))
    lines = draw(st.sampled_from(PROFILE_TEXTS)).splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["value", "drop", "add", "table"]))
        key = lines[i].split("=")[0].strip() if "=" in lines[i] else draw(st.sampled_from(["threads", "backend"]))
        if action == "value":
            lines[i] = f"{key} = {draw(toml_values)}"
        elif action == "drop":
            del lines[i]
        elif action == "add":
            lines.insert(i, f"{draw(st.sampled_from(['tensorrt', 'jetson', 'x', key]))} = {draw(toml_values)}")
        else:
            lines.insert(i, draw(st.sampled_from(["[tensorrt]", "[jetson]", "[x]", "[[batch_sizes]]"])))
        if not lines:
            lines = [""]
    return "\n".join(lines)


@examples(150)
@given(text=profile_text())
def test_device_profile_toml(text):
    from devices.profile_config import DeviceProfile, ProfileError, load_profile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            profile = load_profile(str(path))
        except ProfileError as e:
            one_line(e)
        else:
            assert isinstance(profile, DeviceProfile) and profile.batch_sizes and profile.threads >= 0


# --- label files (train.distill --labels FILE) ---------------------------------------------------------------------
@examples(100)
@example(data=b"\x80")  # found in CI: not UTF-8
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_label_file(data):
    from train.distill import DistillError, choose_labels

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "labels.txt"
        path.write_bytes(data)
        try:
            labels = choose_labels(str(path), [], "data")
        except DistillError as e:
            one_line(e)
        else:
            assert labels and all(isinstance(s, str) and s.strip() == s and s for s in labels)


# --- checkpoints ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ckpt(tiny_checkpoint) -> dict:
    import torch

    return torch.load(tiny_checkpoint, weights_only=True)


@st.composite
def checkpoint_bytes(draw, ckpt: dict, raw: bytes):
    """A checkpoint whose dict is mutated (config fields, head, keys) and saved, or whose bytes are damaged."""
    import torch

    if draw(st.booleans()):
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data[:draw(st.integers(0, len(data)))])
    c = {k: v for k, v in ckpt.items() if k != "state_dict"}
    c = copy.deepcopy(c) | {"state_dict": ckpt["state_dict"]}
    target = draw(st.sampled_from(["config", "config", "head", "top", "state_dict"]))
    if target == "config":
        key = draw(st.sampled_from(sorted(c["config"]) + ["extra"]))
        value = draw(st.one_of(st.integers(-3, 2 ** 62), st.floats(), st.text(max_size=5), st.none()))
        c["config"] = {**c["config"], key: value}
    elif target == "head":
        key = draw(st.sampled_from(sorted(c["head"])))
        c["head"] = {**c["head"], key: draw(st.one_of(st.none(), st.integers(), st.just([]),
                                                      st.just(torch.zeros(3)), st.text(max_size=4)))}
    elif target == "top":
        key = draw(st.sampled_from(sorted(c)))
        if draw(st.booleans()):
            del c[key]
        else:
            c[key] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=4)))
    else:
        name = draw(st.sampled_from(sorted(c["state_dict"])))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        c["state_dict"] = {**c["state_dict"], name: torch.zeros(shape)}
    buf = io.BytesIO()
    torch.save(c, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt_raw(tiny_checkpoint) -> bytes:
    return tiny_checkpoint.read_bytes()


@examples(60)
@given(data=st.data())
def test_checkpoints(data, small_ckpt, ckpt_raw):
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.waveclip import WaveCLIP

    blob = data.draw(checkpoint_bytes(small_ckpt, ckpt_raw))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt.pt"
        path.write_bytes(blob)
        try:
            model, ckpt = load_checkpoint(path)
        except CheckpointError as e:
            one_line(e)
        else:  # usable as export uses it
            head = ckpt["head"]
            assert isinstance(model, WaveCLIP)
            assert len(head["class_names"]) == len(head["labels"]) == head["weight"].shape[0] == head["bias"].shape[0]
            assert head["weight"].shape[1] == model.config.embed_dim and np.isfinite(float(head["logit_scale"]))
        assert snapshot(Path(d)) == {"ckpt.pt": len(blob)}
