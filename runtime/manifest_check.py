"""The manifest check the runtime runs on every bundle it loads (torch-free, no optional dependency).

Types, ranges and cross-field consistency: the model config fixes the preprocessing levels, the KV-cache layout and
every level graph's input/output names and shapes; the head's rows, labels and class names agree; the gate has one
threshold >= 0 per level before the last; every file the manifest names is a plain relative path with a sha256.
``runtime/manifest.schema.json`` stays the published contract; a test keeps the two in step (whatever the schema
refuses, this refuses too, and more). Every failure is one :class:`BundleError` line naming the field.
"""
from __future__ import annotations

import math
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from runtime.errors import BundleError

BUNDLE_FORMAT = "waveclip-edge/bundle"
BUNDLE_FORMAT_VERSION = 1
RESAMPLE = ("bicubic", "bilinear", "nearest", "lanczos")
PRECISIONS = ("fp32", "fp16", "int8")
GRAPH_FORMATS = ("onnx", "openvino")
KV_KINDS = ("key", "value")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Bounds that keep every loop over the config finite (the real presets are far inside them).
_MAX = {"image_size": 16384, "dwt_levels": 8, "grid": 1024, "width": 65536, "layers": 1024, "heads": 1024,
        "embed_dim": 65536}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


class _Fields:
    """Typed field access that fails with ``WHERE: FIELD: reason``."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, reason: str) -> None:
        raise BundleError(f"{self.where}: {field}: {reason}")

    def get(self, data: dict, key: str, field: str) -> Any:
        if key not in data:
            self.fail(field, "missing")
        return data[key]

    def obj(self, data: dict, key: str, prefix: str = "", required: bool = True) -> dict | None:
        field = prefix + key
        if not required and key not in data:
            return None
        value = self.get(data, key, field)
        if not isinstance(value, dict):
            self.fail(field, f"expected an object, got {_show(value)}")
        return value

    def array(self, data: dict, key: str, prefix: str = "") -> list:
        value = self.get(data, key, prefix + key)
        if not isinstance(value, list):
            self.fail(prefix + key, f"expected an array, got {_show(value)}")
        return value

    def integer(self, data: dict, key: str, prefix: str = "", minimum: int = 0, maximum: int | None = None,
                equal: int | None = None, required: bool = True) -> int | None:
        field = prefix + key
        if not required and key not in data:
            return None
        value = self.get(data, key, field)
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            self.fail(field, f"expected an integer {bound}, got {_show(value)}")
        if equal is not None and value != equal:
            self.fail(field, f"is {value}, expected {equal} (from the model config)")
        return value

    def number(self, data: dict, key: str, prefix: str = "", minimum: float | None = None) -> float:
        field = prefix + key
        value = self.get(data, key, field)
        if not _is_number(value) or (minimum is not None and value < minimum):
            bound = f" >= {minimum:g}" if minimum is not None else ""
            self.fail(field, f"expected a finite number{bound}, got {_show(value)}")
        return value

    def string(self, data: dict, key: str, prefix: str = "", required: bool = True,
               choices: tuple[str, ...] | None = None) -> str | None:
        field = prefix + key
        if not required and key not in data:
            return None
        value = self.get(data, key, field)
        if not isinstance(value, str):
            self.fail(field, f"expected a string, got {_show(value)}")
        if choices is not None and value not in choices:
            self.fail(field, f"unknown value {_show(value)} (expected {' or '.join(map(repr, choices))})")
        return value

    def path(self, data: dict, key: str, prefix: str = "") -> str:
        """A file of the bundle: a non-empty relative POSIX path inside the bundle folder."""
        value = self.string(data, key, prefix)
        self.relative(prefix + key, value)
        return value

    def relative(self, field: str, value: str) -> None:
        posix, win = PurePosixPath(value), PureWindowsPath(value)
        if (not value or "\\" in value or "\0" in value or posix.is_absolute() or win.drive
                or ".." in posix.parts or value != posix.as_posix()):
            self.fail(field, f"{_show(value)} is not a plain relative path inside the bundle")


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_manifest(manifest: Any, where: str = "manifest.json") -> None:
    """Raise :class:`BundleError` (one line: ``WHERE: FIELD: reason``) unless ``manifest`` is a usable bundle
    manifest. File existence and sha256 are checked by :func:`runtime.bundle.load_bundle`."""
    f = _Fields(where)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where}: not a waveclip-edge bundle manifest")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION or not _is_int(version):
        raise BundleError(f"{where}: bundle format version {version!r} is not supported "
                          f"(this runtime reads version {BUNDLE_FORMAT_VERSION})")
    f.string(manifest, "name", required=False)
    model = _check_model(f, manifest)
    pre_levels = _check_preprocessing(f, manifest, model)
    _check_kv_cache(f, manifest, model)
    levels = _check_levels(f, manifest, model, pre_levels)
    _check_head(f, manifest, model)
    gate = f.obj(manifest, "gate")
    f.string(gate, "metric", "gate.", choices=("softmax_margin",))
    f.string(gate, "source", "gate.")
    f.obj(gate, "calibration", "gate.", required=False)
    thresholds = f.array(gate, "thresholds", "gate.")
    for i, t in enumerate(thresholds):
        if not _is_number(t) or t < 0:
            f.fail(f"gate.thresholds[{i}]", f"expected a finite number >= 0 (a softmax margin), got {_show(t)}")
    if len(thresholds) != len(levels) - 1:
        f.fail("gate.thresholds", f"has {len(thresholds)} values, expected {len(levels) - 1} (one per level before "
                                  "the last)")
    f.string(manifest, "precision", choices=PRECISIONS)
    f.string(manifest, "graph_format", required=False, choices=GRAPH_FORMATS)
    for key in ("optimization", "export"):
        f.obj(manifest, key, required=False)
    if manifest.get("quantization") is not None:
        f.obj(manifest, "quantization")
    _check_split(f, manifest, len(levels))
    _check_full(f, manifest, len(levels))
    _check_files(f, manifest)


def _check_split(f: _Fields, manifest: dict, num_levels: int) -> None:
    """The optional split graphs (export/split.py): one embedding graph per level and one shared body."""
    split = f.obj(manifest, "split", required=False)
    if split is None:
        return
    embed = f.array(split, "embed", "split.")
    if len(embed) != num_levels:
        f.fail("split.embed", f"has {len(embed)} entries, expected {num_levels} (one per level)")
    for k, e in enumerate(embed):
        if not isinstance(e, dict):
            f.fail(f"split.embed[{k}]", f"expected an object, got {_show(e)}")
        f.integer(e, "level", f"split.embed[{k}].", equal=k)
        f.path(e, "file", f"split.embed[{k}].")
    f.path(f.obj(split, "body", "split."), "file", "split.body.")


def _check_model(f: _Fields, manifest: dict) -> dict:
    model = f.obj(manifest, "model")
    for key, maximum in _MAX.items():
        f.integer(model, key, "model.", minimum=1, maximum=maximum)
    f.integer(model, "channels", "model.", minimum=3, maximum=3, required=False)  # Y, Cb, Cr
    f.string(model, "wavelet", "model.", required=False, choices=("haar",))
    f.string(model, "name", "model.", required=False)
    if "mlp_ratio" in model:
        f.number(model, "mlp_ratio", "model.", minimum=0)
    if model["width"] % model["heads"]:
        f.fail("model.heads", f"{model['heads']} does not divide model.width {model['width']}")
    step = 2 ** model["dwt_levels"] * model["grid"]
    if model["image_size"] % step:
        f.fail("model.image_size", f"{model['image_size']} is not a multiple of 2**dwt_levels * grid = {step}")
    grids = model.get("level_grids") or []
    if not isinstance(grids, list):
        f.fail("model.level_grids", f"expected an array, got {_show(grids)}")
    if grids and len(grids) != model["dwt_levels"] + 1:
        f.fail("model.level_grids", f"has {len(grids)} entries, expected dwt_levels + 1 = {model['dwt_levels'] + 1}")
    for k, g in enumerate(grids):
        band = _band_size(model, k)
        if not _is_int(g) or g < 1 or g % model["grid"] or band % g:
            f.fail(f"model.level_grids[{k}]", f"{_show(g)} must be a multiple of model.grid that divides the "
                                              f"level's {band}-wide bands")
    return model


def level_grid(model: dict, k: int) -> int:
    """The token grid of level ``k`` of a (checked) manifest's model: its ``level_grids`` entry, else ``grid``."""
    return model["level_grids"][k] if model.get("level_grids") else model["grid"]


def _band_size(model: dict, k: int) -> int:
    """Side of level ``k``'s wavelet band(s): the LL band of the coarsest scale, or the details of scale j - k + 1."""
    j = model["dwt_levels"]
    return model["image_size"] >> (j if k == 0 else j - k + 1)


def _expected_level(model: dict, k: int) -> dict:
    """Bands, band size, patch size and values per token of preprocessing level ``k`` from the model config."""
    j = model["dwt_levels"]
    scale = j if k == 0 else j - k + 1
    bands = [f"LL{j}"] if k == 0 else [f"LH{scale}", f"HL{scale}", f"HH{scale}"]
    band = _band_size(model, k)
    patch = band // level_grid(model, k)
    return {"bands": bands, "band_size": band, "patch_size": patch, "tokens": level_grid(model, k) ** 2,
            "values_per_token": 3 * len(bands) * patch * patch}


def _check_preprocessing(f: _Fields, manifest: dict, model: dict) -> list[dict]:
    pre, p = f.obj(manifest, "preprocessing"), "preprocessing."
    f.integer(pre, "image_size", p, minimum=1, equal=model["image_size"])
    f.integer(pre, "resize_shorter", p, minimum=model["image_size"], maximum=4 * _MAX["image_size"])
    f.string(pre, "resample", p, choices=RESAMPLE)
    f.string(pre, "crop", p, choices=("center",))
    f.string(pre, "color", p, choices=("ycbcr_bt601_full",))
    norm = f.obj(pre, "normalize", p)
    f.number(norm, "scale", p + "normalize.")
    f.number(norm, "offset", p + "normalize.")
    f.string(pre, "wavelet", p, choices=("haar",))
    f.string(pre, "dwt_mode", p, choices=("periodization",))
    f.integer(pre, "dwt_levels", p, equal=model["dwt_levels"])
    f.integer(pre, "grid", p, minimum=1, equal=model["grid"])
    f.string(pre, "patch_order", p, required=False)
    levels = f.array(pre, "levels", p)
    if len(levels) != model["dwt_levels"] + 1:
        f.fail(p + "levels", f"has {len(levels)} entries, expected dwt_levels + 1 = {model['dwt_levels'] + 1}")
    for k, lv in enumerate(levels):
        q = f"{p}levels[{k}]"
        if not isinstance(lv, dict):
            f.fail(q, f"expected an object, got {_show(lv)}")
        want = _expected_level(model, k)
        if f.get(lv, "bands", q + ".bands") != want["bands"]:
            f.fail(q + ".bands", f"is {_show(lv['bands'])}, expected {want['bands']} (from the model config)")
        for key in ("band_size", "patch_size", "tokens", "values_per_token"):
            f.integer(lv, key, q + ".", equal=want[key])
        f.integer(lv, "grid", q + ".", equal=level_grid(model, k), required=bool(model.get("level_grids")))
    return levels


def _pattern(f: _Fields, kv: dict, key: str) -> str:
    value = f.string(kv, key, "kv_cache.")
    if value.count("%d") != 1 or "%" in value.replace("%d", "", 1):
        f.fail(f"kv_cache.{key}", f"{_show(value)} must hold exactly one %d (the layer) and no other %")
    return value


def _check_kv_cache(f: _Fields, manifest: dict, model: dict) -> None:
    """``tokens_per_level``: required where every level has the same grid, absent where they differ (each level's
    ``tokens`` and ``past_length`` say it)."""
    kv, p = f.obj(manifest, "kv_cache"), "kv_cache."
    f.integer(kv, "num_layers", p, equal=model["layers"])
    f.integer(kv, "num_heads", p, equal=model["heads"])
    f.integer(kv, "head_dim", p, equal=model["width"] // model["heads"])
    uniform = len({level_grid(model, k) for k in range(model["dwt_levels"] + 1)}) == 1
    if uniform:
        f.integer(kv, "tokens_per_level", p, equal=model["grid"] ** 2 + 1)
    elif "tokens_per_level" in kv:
        f.fail(p + "tokens_per_level", "must be absent where the levels' grids differ (model.level_grids)")
    f.string(kv, "layout", p, choices=("batch,heads,length,head_dim",))
    patterns = {key: _pattern(f, kv, key) for key in
                (f"{w}_{kind}_pattern" for w in ("past", "present") for kind in KV_KINDS)}
    if len({v % 0 for v in patterns.values()}) != len(patterns):
        f.fail(p + "past_key_pattern", "the four KV name patterns must give four different names")


def _tensors(f: _Fields, lv: dict, key: str, prefix: str, expected: dict[str, list]) -> None:
    """``lv[key]`` lists exactly the ``expected`` names (each once), float32, with the expected shapes (the first,
    batch, dimension free: a name or an integer >= 1)."""
    items = f.array(lv, key, prefix)
    seen = set()
    for i, t in enumerate(items):
        q = f"{prefix}{key}[{i}]"
        if not isinstance(t, dict):
            f.fail(q, f"expected an object, got {_show(t)}")
        name = f.string(t, "name", q + ".")
        f.string(t, "dtype", q + ".", choices=("float32",))
        shape = f.array(t, "shape", q + ".")
        if name not in expected or name in seen:
            f.fail(q + ".name", f"{_show(name)} is " + ("listed twice" if name in seen else
                                                         "not an input/output this level has"))
        seen.add(name)
        batch_ok = bool(shape) and (isinstance(shape[0], str) or (_is_int(shape[0]) and shape[0] >= 1))
        if not batch_ok or shape[1:] != expected[name]:
            f.fail(q + ".shape", f"is {_show(shape)}, expected [batch, {', '.join(map(str, expected[name]))}] "
                                 "(from the model config)")
    missing = [n for n in expected if n not in seen]
    if missing:
        f.fail(prefix + key, f"lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def _check_levels(f: _Fields, manifest: dict, model: dict, pre_levels: list[dict]) -> list:
    levels, kv = f.array(manifest, "levels"), manifest["kv_cache"]
    if not 1 <= len(levels) <= len(pre_levels):
        f.fail("levels", f"has {len(levels)} entries, expected 1..{len(pre_levels)} (a prefix of the levels)")
    heads, head_dim, previous = model["heads"], model["width"] // model["heads"], 0.0
    for k, lv in enumerate(levels):
        p = f"levels[{k}]."
        if not isinstance(lv, dict):
            f.fail(p[:-1], f"expected an object, got {_show(lv)}")
        f.integer(lv, "level", p, equal=k)
        f.path(lv, "file", p)
        tokens = level_grid(model, k) ** 2 + 1
        past = f.integer(lv, "past_length", p, equal=sum(level_grid(model, j) ** 2 + 1 for j in range(k)))
        f.integer(lv, "tokens", p, equal=tokens)
        gflops = f.number(lv, "gflops", p, minimum=0)
        cumulative = f.number(lv, "cumulative_gflops", p, minimum=0)
        if not math.isclose(cumulative, previous + gflops, rel_tol=1e-4, abs_tol=1e-5):
            f.fail(p + "cumulative_gflops", f"{cumulative:g} is not the previous level's plus this level's gflops "
                                            f"({previous + gflops:g})")
        previous = cumulative
        names = [(i, kind) for i in range(model["layers"]) for kind in KV_KINDS]
        inputs = {"patches": [pre_levels[k]["tokens"], pre_levels[k]["values_per_token"]]}
        if k:
            inputs |= {kv[f"past_{kind}_pattern"] % i: [heads, past, head_dim] for i, kind in names}
        outputs = {"embedding": [model["embed_dim"]]}
        outputs |= {kv[f"present_{kind}_pattern"] % i: [heads, past + tokens, head_dim] for i, kind in names}
        _tensors(f, lv, "inputs", p, inputs)
        _tensors(f, lv, "outputs", p, outputs)
    return levels


def _check_head(f: _Fields, manifest: dict, model: dict) -> None:
    head, p = f.obj(manifest, "head"), "head."
    for key in ("class_names", "labels"):
        values = f.array(head, key, p)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                f.fail(f"{p}{key}[{i}]", f"expected a string, got {_show(v)}")
    n = len(head["labels"])
    if n < 1:
        f.fail(p + "labels", "is empty")
    if len(head["class_names"]) != n:
        f.fail(p + "class_names", f"has {len(head['class_names'])} names for {n} labels")
    f.number(head, "logit_scale", p)
    for key, shape in (("weight", [n, model["embed_dim"]]), ("bias", [n])):
        arr, q = f.obj(head, key, p), f"{p}{key}."
        f.path(arr, "file", q)
        f.string(arr, "dtype", q, choices=("float32",))
        got = f.array(arr, "shape", q)
        if got != shape:
            f.fail(q + "shape", f"is {_show(got)}, expected {shape} (labels x model.embed_dim)")


def _check_full(f: _Fields, manifest: dict, num_levels: int) -> None:
    """The optional one-pass graph (export/full.py): patches.{k} in, embedding.{k} out, for every level."""
    full = f.obj(manifest, "full", required=False)
    if full is None:
        return
    f.path(full, "file", "full.")
    for key, stem in (("inputs", "patches"), ("outputs", "embedding")):
        names = f.array(full, key, "full.")
        if names != [f"{stem}.{k}" for k in range(num_levels)]:
            f.fail(f"full.{key}", f"expected {stem}.0 .. {stem}.{num_levels - 1}, got {_show(names)}")


def _check_files(f: _Fields, manifest: dict) -> None:
    files = f.obj(manifest, "files")
    for name, digest in files.items():
        f.relative(f"files[{name!r}]", name)
        if not isinstance(digest, str) or not _SHA256.match(digest):
            f.fail(f"files[{name!r}]", f"expected a sha256 (64 lowercase hex digits), got {_show(digest)}")
    extra = f.obj(manifest, "external_data", required=False)
    needed = [lv["file"] for lv in manifest["levels"]]
    needed += [manifest["head"]["weight"]["file"], manifest["head"]["bias"]["file"]]
    if manifest.get("split") is not None:
        needed += [e["file"] for e in manifest["split"]["embed"]] + [manifest["split"]["body"]["file"]]
    if manifest.get("full") is not None:
        needed.append(manifest["full"]["file"])
    if extra is not None:
        needed.append(f.path(extra, "file", "external_data."))
        for key in ("bytes", "unique_tensors", "tensor_references"):
            f.integer(extra, key, "external_data.", required=False)
    for name in needed:
        if name not in files:
            f.fail("files", f"{name} has no sha256 in 'files'")
