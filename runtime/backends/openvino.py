"""OpenVINO backend: reads the bundle's ONNX graphs (or IR .xml); the KV cache stays in OpenVINO tensors."""
from __future__ import annotations

import numpy as np
import openvino as ov

from runtime.backends import BackendError, check_kv_shapes
from runtime.bundle import Bundle
from runtime.errors import one_line


class OpenVINOBackend:
    """One compiled model + infer request per level. The present tensors of level k are set as level k+1's inputs."""

    name = "openvino"

    def __init__(self, bundle: Bundle, device: str = "CPU", threads: int | None = None,
                 hint: str = "LATENCY", inference_precision: str | None = None) -> None:
        self.bundle = bundle
        core = ov.Core()
        config = {"PERFORMANCE_HINT": hint}
        # OpenVINO runs fp32 graphs in bf16 on CPUs that have it unless told otherwise; keep the bundle's precision.
        if inference_precision or bundle.manifest["precision"] == "fp32":
            config["INFERENCE_PRECISION_HINT"] = inference_precision or "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = [core.compile_model(str(bundle.level_path(k)), device, config)
                             for k in range(bundle.num_levels)]
        except Exception as e:  # openvino raises RuntimeError subclasses with long messages
            raise BackendError(f"openvino cannot compile the bundle graphs on {device}: {one_line(e)}") from None
        self.requests = [c.create_infer_request() for c in self.compiled]

    def run_level(self, level: int, patches: np.ndarray, past: list | None):
        req = self.requests[level]
        past = past or []
        if level:
            check_kv_shapes(self.bundle, level, patches.shape[0], [tuple(v.shape) for v in past])
        names, present_names = self.bundle.kv_names(level)
        req.set_tensor("patches", ov.Tensor(np.ascontiguousarray(patches, dtype=np.float32)))
        for name, value in zip(names, past):
            req.set_tensor(name, value if isinstance(value, ov.Tensor) else ov.Tensor(np.ascontiguousarray(value)))
        req.infer()
        emb = req.get_tensor("embedding").data.copy()
        # Own copies of the outputs' memory are not needed: the next level reads them before this request runs again.
        return emb, [req.get_tensor(n) for n in present_names]

    def take_rows(self, present: list, rows: np.ndarray) -> list:
        return [ov.Tensor(np.ascontiguousarray(t.data[rows])) for t in present]

    def to_numpy(self, present: list) -> list[np.ndarray]:
        return [np.array(t.data) if isinstance(t, ov.Tensor) else np.asarray(t) for t in present]
