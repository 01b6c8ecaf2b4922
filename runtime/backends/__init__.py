"""Inference backends behind one small interface.

A backend runs one level graph: ``run_level(level, patches, past) -> (embedding, present)`` where ``past``/``present``
are the backend's own KV-cache handles (kept in the backend's memory where it allows: ONNX Runtime OrtValues,
OpenVINO tensors, TensorRT device buffers), and ``take_rows(present, rows)`` keeps the cache rows of the inputs that go
on to the next level. ``to_numpy(present)`` exposes a cache for tests and debugging. Optionally,
``run_full(levels) -> [embedding per level]`` runs the bundle's one-pass graph (export/full.py) where it has one
(``load_full()`` makes its session ahead of the first call).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from runtime.bundle import Bundle

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
ONE_PASS = ("onnxruntime", "openvino")  # backends with run_full / load_full and the load_levels option
EXTRA = {"onnxruntime": "runtime", "openvino": "openvino", "tensorrt": "tensorrt"}


KV_PRECISIONS = ("auto", "f32", "bf16", "f16")  # the OpenVINO backend's kv_precision choices


class BackendError(RuntimeError):
    """A backend that cannot be created or run; one-line message."""


class Backend(Protocol):
    name: str

    def run_level(self, level: int, patches: np.ndarray, past: Any | None) -> tuple[np.ndarray, Any]: ...

    def take_rows(self, present: Any, rows: np.ndarray) -> Any: ...  # a copy the backend never overwrites

    def gather_rows(self, parts: list[tuple[Any, np.ndarray]]) -> Any: ...  # (cache, rows) of one level -> one

    fresh_outputs: bool  # run_level returns new present tensors (False: a later run may overwrite them)

    def to_numpy(self, present: Any) -> list[np.ndarray]: ...


def gather_numpy(parts: list[tuple[np.ndarray, np.ndarray]], out: np.ndarray | None = None) -> np.ndarray:
    """``rows`` of each array (same trailing shape), in order, copied once into ``out`` (new if None)."""
    first = parts[0][0]
    if out is None:
        out = np.empty((sum(len(rows) for _, rows in parts), *first.shape[1:]), first.dtype)
    start = 0
    for array, rows in parts:
        np.take(array, rows, axis=0, out=out[start:start + len(rows)])
        start += len(rows)
    return out


def check_kv_shapes(bundle: Bundle, level: int, batch: int, shapes: list[tuple[int, ...]]) -> None:
    """Refuse a KV cache whose shapes do not match what the level graph declares (clear error instead of a crash)."""
    names, _ = bundle.kv_names(level)
    if len(shapes) != len(names):
        raise BackendError(f"level {level} takes {len(names)} KV tensors, got {len(shapes)}")
    cfg = bundle.manifest["kv_cache"]
    want = (batch, cfg["num_heads"], bundle.manifest["levels"][level]["past_length"], cfg["head_dim"])
    for name, shape in zip(names, shapes):
        if tuple(shape) != want:
            raise BackendError(f"level {level}: {name} must have shape {list(want)} (past length {want[2]}), got {list(shape)}")


def create_backend(bundle: Bundle, name: str = "onnxruntime", **options) -> Backend:
    """Instantiate a backend by name; a backend whose package is missing names the extra to install."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "tensorrt" and "MatMulNBits" in str((bundle.manifest.get("quantization") or {}).get("format")):
        raise BackendError(f"{bundle.path}: weight-only int8 (ONNX Runtime MatMulNBits) cannot be parsed by TensorRT; "
                           "use the fp32 bundle (fp16 engines) or calibration.quantize --backend tensorrt")
    try:
        if name == "onnxruntime":
            from runtime.backends.ort import OnnxRuntimeBackend as cls
        elif name == "openvino":
            from runtime.backends.openvino import OpenVINOBackend as cls
        else:
            from runtime.backends.tensorrt import TensorRTBackend as cls
    except ImportError as e:
        raise BackendError(f"backend {name!r} is not installed ({e.name or e}): pip install 'waveclip-edge[{EXTRA[name]}]'") from None
    return cls(bundle, **options)
