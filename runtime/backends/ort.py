"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when present; KV cache kept as OrtValues."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime.backends import BackendError, check_kv_shapes
from runtime.bundle import Bundle
from runtime.errors import one_line

_DEVICE = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU. (TensorRT EP is opt-in: it builds engines on first run.)"""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeBackend:
    """One InferenceSession per level graph.

    With ``io_binding`` (default) the present KV outputs stay OrtValues on the provider's device and are bound as the
    next level's past inputs without a copy; without it every level round-trips the cache through numpy.
    """

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None,
                 io_binding: bool = True, graph_optimization: bool = True, spinning: bool = False) -> None:
        self.bundle = bundle
        self.providers = providers or default_providers()
        self.io_binding = io_binding
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if graph_optimization
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        opts.log_severity_level = 3
        # One session per level: spinning worker threads of idle sessions would fight the running one for cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.sessions = [ort.InferenceSession(str(bundle.level_path(k)), opts, providers=self.providers)
                             for k in range(bundle.num_levels)]
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime cannot load the bundle graphs: {one_line(e)}") from None
        self.device = _DEVICE.get(self.sessions[0].get_providers()[0], "cpu")
        self.output_names = [[o.name for o in s.get_outputs()] for s in self.sessions]

    def run_level(self, level: int, patches: np.ndarray, past: list | None):
        sess = self.sessions[level]
        past = past or []
        if level:
            check_kv_shapes(self.bundle, level, patches.shape[0], [tuple(_shape(v)) for v in past])
        names, _ = self.bundle.kv_names(level)
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        if not self.io_binding:
            outs = sess.run(None, {"patches": patches, **{n: _as_numpy(v) for n, v in zip(names, past)}})
            return outs[0], outs[1:]
        binding = sess.io_binding()
        binding.bind_cpu_input("patches", patches)
        for name, value in zip(names, past):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names[level]:
            binding.bind_output(name, self.device if name != "embedding" else "cpu")
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(outs[1:])

    def take_rows(self, present: list, rows: np.ndarray) -> list:
        if not self.io_binding:
            return [np.ascontiguousarray(v[rows]) for v in present]
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows]), self.device, 0) for v in present]

    def to_numpy(self, present: list) -> list[np.ndarray]:
        return [_as_numpy(v) for v in present]


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, ort.OrtValue):
        return value.numpy()
    raise BackendError(f"unsupported KV value type {type(value).__name__}")
