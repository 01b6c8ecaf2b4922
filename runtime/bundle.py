"""Read (and write) a WaveCLIP bundle: ``manifest.json`` + per-level graphs + head arrays, checked by sha256."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from runtime.atomic import replace_dir
from runtime.cli import unwritable
from runtime.errors import BundleError  # noqa: F401  (re-exported: callers import it from here)
from runtime.manifest_check import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, check_manifest  # noqa: F401

MANIFEST = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def past_key_name(manifest: dict, layer: int, kind: str) -> str:
    """Name of a KV-cache graph input, e.g. ``past_key_values.3.key`` (kind: 'key' or 'value')."""
    return manifest["kv_cache"][f"past_{kind}_pattern"] % layer


def present_name(manifest: dict, layer: int, kind: str) -> str:
    """Name of a KV-cache graph output, e.g. ``present.3.value``."""
    return manifest["kv_cache"][f"present_{kind}_pattern"] % layer


@dataclass
class Bundle:
    """A loaded bundle: its folder, manifest and head arrays."""

    path: Path
    manifest: dict
    head_weight: np.ndarray  # [N, D]
    head_bias: np.ndarray  # [N]

    @property
    def num_levels(self) -> int:
        return len(self.manifest["levels"])

    @property
    def class_names(self) -> list[str]:
        return self.manifest["head"]["class_names"]

    @property
    def labels(self) -> list[str]:
        return self.manifest["head"]["labels"]

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["head"]["logit_scale"])

    @property
    def thresholds(self) -> list[float]:
        return list(self.manifest["gate"]["thresholds"])

    @property
    def preprocessing(self) -> dict:
        return self.manifest["preprocessing"]

    def level_path(self, level: int) -> Path:
        return self.path / self.manifest["levels"][level]["file"]

    @property
    def has_split(self) -> bool:
        """Whether the bundle holds the split graphs (per-level embeddings + one shared body, export/split.py)."""
        return self.manifest.get("split") is not None

    def embed_path(self, level: int) -> Path:
        return self.path / self.manifest["split"]["embed"][level]["file"]

    def body_path(self) -> Path:
        return self.path / self.manifest["split"]["body"]["file"]

    @property
    def has_full(self) -> bool:
        """Whether the bundle holds the one-pass graph (every level in one block-causal pass, export/full.py)."""
        return self.manifest.get("full") is not None

    def full_path(self) -> Path:
        return self.path / self.manifest["full"]["file"]

    def kv_names(self, level: int) -> tuple[list[str], list[str]]:
        """(past input names, present output names) of a level graph, in layer order key, value, key, value..."""
        layers = self.manifest["kv_cache"]["num_layers"]
        past = [past_key_name(self.manifest, i, kind) for i in range(layers) for kind in ("key", "value")] if level else []
        present = [present_name(self.manifest, i, kind) for i in range(layers) for kind in ("key", "value")]
        return past, present

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Head logits for L2-normalised embeddings [B, D] -> [B, N]."""
        return self.logit_scale * (embeddings @ self.head_weight.T) + self.head_bias


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Load a bundle folder. The manifest is always checked (:func:`runtime.manifest_check.check_manifest`) and every
    file it lists must exist; with ``verify``, each is also checked against its sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST})" if path.exists() else
                          f"{path}: no such bundle folder")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    except OSError as e:
        raise BundleError(f"{mpath}: cannot read ({e.strerror or e})") from None
    check_manifest(manifest, str(mpath))
    for name, digest in manifest["files"].items():
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"{path}: missing file {name}")
        if verify and sha256_file(fpath) != digest:
            raise BundleError(f"{path}: {name} does not match its sha256 in the manifest (tampered or corrupt)")
    head = manifest["head"]
    weight = _read_array(path, head["weight"])
    bias = _read_array(path, head["bias"])
    return Bundle(path=path, manifest=manifest, head_weight=weight, head_bias=bias)


def _read_array(folder: Path, spec: dict) -> np.ndarray:
    try:
        data = np.fromfile(folder / spec["file"], dtype=np.dtype(spec["dtype"]).newbyteorder("<"))
    except OSError as e:
        raise BundleError(f"{folder / spec['file']}: cannot read ({e.strerror or e})") from None
    if data.size != int(np.prod(spec["shape"])):
        raise BundleError(f"{folder / spec['file']}: holds {data.size} values, manifest says shape {spec['shape']}")
    return data.reshape(spec["shape"]).astype(np.float32)


def write_array(folder: Path, name: str, array: np.ndarray) -> dict:
    """Write a raw little-endian float32 array file and return its manifest entry."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    arr.tofile(folder / name)
    return {"file": name, "dtype": "float32", "shape": list(arr.shape)}


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    """Fill ``files`` with the sha256 of every file in the folder (but the manifest) and write manifest.json."""
    folder = Path(folder)
    manifest["files"] = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def validate_manifest(manifest: dict) -> None:
    """Validate against the published JSON schema kept beside this module (needs the ``jsonschema`` package; tests
    only: the runtime's own check is :func:`runtime.manifest_check.check_manifest`)."""
    import jsonschema

    jsonschema.validate(manifest, json.loads(SCHEMA_PATH.read_text()))


def check_replaceable(out: str | os.PathLike, force: bool, hint: str = "use --force to replace it") -> None:
    """An existing output is replaced only with ``force``, and then only where it is a bundle or an empty folder:
    ``-o ~ --force`` must never delete a folder that holds something else."""
    out = Path(out)
    if not out.exists():
        return
    if not force:
        raise BundleError(f"{out} already exists ({hint})")
    if not out.is_dir():
        raise BundleError(f"{out} is a file, not a bundle folder: --force replaces bundles only")
    if not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise BundleError(f"{out} is not a bundle folder (no {MANIFEST}): --force replaces bundles only; choose "
                          "another output or empty it yourself")


@contextmanager
def staged_output(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Write into a temporary sibling folder; move it to ``out`` only if the block succeeds (never a half bundle)."""
    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"{out} already exists (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:  # name the output asked for, not the staging folder
        raise BundleError(f"cannot create {out}: {unwritable(out, folder=True) or e.strerror or e}") from None
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        yield tmp
        replace_dir(tmp, out)  # the old bundle stays complete until the new one is in place
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
