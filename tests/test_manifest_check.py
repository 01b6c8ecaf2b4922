"""The manifest check the runtime runs at every load, and that it stays in step with the published JSON schema."""
import copy
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.bundle import BundleError, load_bundle, validate_manifest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "waveclip-demo"
SCHEMA = json.loads((REPO / "runtime" / "manifest.schema.json").read_text())
SHIPPED = [DEMO / "bundle", DEMO / "bundle-int8"]


def demo_manifest() -> dict:
    return json.loads((DEMO / "bundle" / "manifest.json").read_text())


def linked_bundle(src: Path, dst: Path, manifest: dict | None = None) -> Path:
    """A bundle folder with ``src``'s files and ``manifest`` (default: src's) written fresh. Files are hard-linked,
    except the repository's own (copied: ONNX refuses external data with several hard links)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "manifest.json":
            (shutil.copy2 if p.resolve().is_relative_to(REPO) else os.link)(p, dst / p.name)
    text = json.dumps(manifest) if manifest is not None else (src / "manifest.json").read_text()
    (dst / "manifest.json").write_text(text)
    return dst


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(SCHEMA)


def schema_rejects(manifest) -> bool:
    return not _validator().is_valid(manifest)


@pytest.mark.parametrize("bundle", SHIPPED, ids=lambda p: p.name)
def test_valid_bundles_pass_both(bundle):
    from runtime.manifest_check import check_manifest

    manifest = json.loads((bundle / "manifest.json").read_text())
    validate_manifest(manifest)
    check_manifest(manifest)
    assert load_bundle(bundle).num_levels == 4


def test_exported_bundle_passes_both(tiny_bundle):
    from runtime.manifest_check import check_manifest

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    validate_manifest(manifest)
    check_manifest(manifest)


def test_issue_thresholds_are_refused_at_load(tmp_path):
    """The issue's hand edit: it used to load and classify every image at level 0 without a word."""
    m = demo_manifest()
    m["gate"]["thresholds"] = [-1, "x", 5]
    bundle = linked_bundle(DEMO / "bundle", tmp_path / "b", m)
    with pytest.raises(BundleError, match=r"gate\.thresholds\[0\]: expected a finite number >= 0"):
        load_bundle(bundle)
    out = subprocess.run([sys.executable, "-m", "runtime.classify", str(bundle), str(REPO / "examples" / "images")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "gate.thresholds[0]" in out.stderr and "Traceback" not in out.stderr


def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is KeyError:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


# (edit, field named in the error): every cross-field rule of the brief, each of which loaded silently before.
CROSS_FIELD = {
    "threshold negative": (_set("gate.thresholds.1", -0.5), "gate.thresholds[1]"),
    "threshold NaN": (_set("gate.thresholds.0", float("nan")), "gate.thresholds[0]"),
    "threshold bool": (_set("gate.thresholds.0", True), "gate.thresholds[0]"),
    "one threshold too many": (lambda m: m["gate"]["thresholds"].append(0.2), "gate.thresholds"),
    "one threshold too few": (lambda m: m["gate"]["thresholds"].pop(), "gate.thresholds"),
    "head rows != labels": (lambda m: m["head"]["labels"].pop(), "head.class_names"),
    "class names != labels": (lambda m: m["head"]["class_names"].append("extra"), "head.class_names"),
    "weight rows != labels": (_set("head.weight.shape", [201, 1280]), "head.weight.shape"),
    "bias rows != labels": (_set("head.bias.shape", [203]), "head.bias.shape"),
    "embedding width != head width": (lambda m: m["levels"][1]["outputs"][0].update(shape=["batch", 512]),
                                      "levels[1].outputs[0].shape"),
    "model embed_dim != graphs": (_set("model.embed_dim", 512), "levels[0].outputs[0].shape"),
    "head width != model": (_set("head.weight.shape", [202, 512]), "head.weight.shape"),
    "patch shape != config": (lambda m: m["levels"][2]["inputs"][0].update(shape=["batch", 16, 36]),
                              "levels[2].inputs[0].shape"),
    "past length != config": (_set("levels.1.past_length", 16), "levels[1].past_length"),
    "KV shape != config": (lambda m: m["levels"][1]["inputs"][1].update(shape=["batch", 3, 16, 64]),
                           "levels[1].inputs[1].shape"),
    "KV name not the pattern's": (lambda m: m["levels"][1]["inputs"][1].update(name="past.0.key"),
                                  "levels[1].inputs[1].name"),
    "KV input missing": (lambda m: m["levels"][3]["inputs"].pop(), "levels[3].inputs"),
    "pattern without %d": (_set("kv_cache.present_key_pattern", "present.key"), "kv_cache.present_key_pattern"),
    "heads != config": (_set("kv_cache.num_heads", 4), "kv_cache.num_heads"),
    "level numbers out of order": (_set("levels.1.level", 2), "levels[1].level"),
    "more levels than the config": (lambda m: m["levels"].append(copy.deepcopy(m["levels"][-1])), "levels"),
    "preprocessing != model": (_set("preprocessing.image_size", 224), "preprocessing.image_size"),
    "band size != config": (_set("preprocessing.levels.2.band_size", 8), "preprocessing.levels[2].band_size"),
    "dwt levels != model": (_set("preprocessing.dwt_levels", 2), "preprocessing.dwt_levels"),
    "resize smaller than crop": (_set("preprocessing.resize_shorter", 32), "preprocessing.resize_shorter"),
    "cumulative gflops inconsistent": (_set("levels.2.cumulative_gflops", 9.0), "levels[2].cumulative_gflops"),
    "file outside the bundle": (_set("levels.0.file", "../level0.onnx"), "levels[0].file"),
    "absolute file": (_set("head.bias.file", "/etc/passwd"), "head.bias.file"),
    "level file without sha256": (lambda m: m["files"].pop("level2.onnx"), "level2.onnx has no sha256"),
    "external data without sha256": (lambda m: m["files"].pop("weights.bin"), "weights.bin has no sha256"),
    "bad sha256": (lambda m: m["files"].update({"level0.onnx": "abc"}), "files['level0.onnx']"),
    "huge layer count": (_set("model.layers", 10 ** 12), "model.layers"),
    "dtype the runtime cannot feed": (lambda m: m["levels"][0]["inputs"][0].update(dtype="float16"),
                                      "levels[0].inputs[0].dtype"),
}


@pytest.fixture(scope="module")
def demo_links(tmp_path_factory) -> Path:
    return linked_bundle(DEMO / "bundle", tmp_path_factory.mktemp("links") / "demo")


@pytest.mark.parametrize("case", CROSS_FIELD, ids=str)
def test_cross_field_rules_are_checked_at_load(case, demo_links, tmp_path):
    """Each loaded silently before (even with verify=False the check runs: the manifest has no sha256)."""
    edit, field = CROSS_FIELD[case]
    m = demo_manifest()
    edit(m)
    bundle = linked_bundle(demo_links, tmp_path / "b", m)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle, verify=False)
    message = str(e.value)
    assert message.startswith(f"{bundle / 'manifest.json'}: ") and "\n" not in message and field in message, message


def test_listed_files_must_exist_and_match(tmp_path):
    m = demo_manifest()
    m["files"]["extra.txt"] = "0" * 64
    with pytest.raises(BundleError, match="missing file extra.txt"):
        load_bundle(linked_bundle(DEMO / "bundle", tmp_path / "a", m))
    b = linked_bundle(DEMO / "bundle", tmp_path / "b")
    (b / "validation.json").unlink()
    (b / "validation.json").write_text("{}")
    with pytest.raises(BundleError, match="validation.json does not match its sha256"):
        load_bundle(b)


def test_unreadable_manifests_are_one_line_bundle_errors(tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    for text in ["[" * 100000, "{", "\xff", "null", "[]", '{"format": "waveclip-edge/bundle", "format_version": 1}']:
        (b / "manifest.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(BundleError) as e:
            load_bundle(b)
        assert "\n" not in str(e.value)


# --- in step with the schema: every rule the schema states, the checker enforces ---------------------------------
def _schema_mutations(schema: dict, node, path: tuple, defs: dict):
    """(path, new value or KeyError) for each required key (deleted), each type (a wrong one), each const/enum."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].split("/")[-1]]
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds or []
    if kinds:  # the first value of another JSON type than every one allowed
        yield path, next(v for v, t in [([1], "array"), ({}, "object"), ("7", "string"), (7.5, "number"),
                                        (None, "null")]
                         if t not in kinds)
    if "const" in schema:
        yield path, "not-" + str(schema["const"])
    if "enum" in schema:
        yield path, "not-one-of-them"
    if "minimum" in schema:
        yield path, schema["minimum"] - 1
    if isinstance(node, dict):
        for key in schema.get("required", []):
            if key in node:
                yield path + (key,), KeyError
        for key, sub in schema.get("properties", {}).items():
            if key in node:
                yield from _schema_mutations(sub, node[key], path + (key,), defs)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in list(node)[:2]:
                yield from _schema_mutations(extra, node[key], path + (key,), defs)
    if isinstance(node, list) and "items" in schema:
        for i, item in enumerate(node[:2]):
            yield from _schema_mutations(schema["items"], item, path + (i,), defs)


def _apply(manifest: dict, path: tuple, value):
    m = copy.deepcopy(manifest)
    if not path:
        return value
    node = m
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return m


def test_every_schema_rule_is_enforced_by_the_checker():
    from runtime.manifest_check import check_manifest

    base = demo_manifest()
    mutations = list(_schema_mutations(SCHEMA, base, (), SCHEMA["$defs"]))
    assert len(mutations) > 150
    for path, value in mutations:
        m = _apply(base, path, value)
        assert schema_rejects(m), (path, value)  # the mutation breaks a rule the schema states
        with pytest.raises(BundleError):
            check_manifest(m)
