"""TensorRT backend: engines built on the target from the bundle's level graphs, KV cache in device buffers.

Engines are cached in ``BUNDLE/tensorrt/<device-name>-<precision>/level{k}.engine`` (built on first use, never
shipped). Needs an NVIDIA GPU, ``tensorrt`` (8.5-10.x with precision flags, 11.x strongly typed: see
``runtime.backends.trt_precision``) and ``cuda-python``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import tensorrt as trt

try:
    from cuda.bindings import runtime as cudart
except ImportError:  # cuda-python < 12.6
    from cuda import cudart

from runtime.backends import BackendError, check_kv_shapes
from runtime.backends.trt_precision import build_plan, engine_precision, fp16_graph, tensorrt_major
from runtime.bundle import Bundle

_LOGGER = trt.Logger(trt.Logger.WARNING)


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class DeviceArray:
    """A float32 array in GPU memory (freed when garbage-collected)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.nbytes = int(np.prod(shape)) * 4
        self.ptr = _check(cudart.cudaMalloc(max(self.nbytes, 4)))

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "DeviceArray":
        array = np.ascontiguousarray(array, dtype=np.float32)
        out = cls(array.shape)
        _check(cudart.cudaMemcpy(out.ptr, array.ctypes.data, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return out

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        _check(cudart.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    @classmethod
    def gather(cls, parts: list[tuple["DeviceArray", np.ndarray]]) -> "DeviceArray":
        """Chosen rows of several arrays (same trailing shape), in order, on the device."""
        first = parts[0][0]
        out = cls((sum(len(rows) for _, rows in parts),) + first.shape[1:])
        row_bytes = first.nbytes // first.shape[0]
        i = 0
        for array, rows in parts:
            for r in rows:
                _check(cudart.cudaMemcpy(out.ptr + i * row_bytes, array.ptr + int(r) * row_bytes, row_bytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice))
                i += 1
        return out

    def __del__(self) -> None:
        if getattr(self, "ptr", None):
            cudart.cudaFree(self.ptr)


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict[str, tuple[tuple, tuple, tuple]],
                 precision: str = "fp16", workspace_mib: int = 1024, bundle_precision: str = "fp32") -> None:
    """Parse an ONNX level graph and serialise a TensorRT engine (explicit quantization for QDQ int8 graphs; on
    TensorRT 11, strongly typed, an fp16 engine of an fp32 bundle is built from the graph's fp16 copy)."""
    plan = build_plan(precision, tensorrt_major(trt.__version__), bundle_precision)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=engine_path.parent) as tmp:
        source = fp16_graph(onnx_path, Path(tmp) / onnx_path.name) if plan.fp16_graph else onnx_path
        serialized = _build(source, shapes, plan.flags, workspace_mib)
    if serialized is None:
        raise BackendError(f"TensorRT engine build failed for {onnx_path}")
    engine_path.write_bytes(bytes(serialized))


def _build(onnx_path: Path, shapes: dict[str, tuple[tuple, tuple, tuple]], flags: tuple[str, ...],
           workspace_mib: int):
    builder = trt.Builder(_LOGGER)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse_from_file(str(onnx_path)):
        raise BackendError(f"TensorRT cannot parse {onnx_path}: {parser.get_error(0).desc() if parser.num_errors else '?'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config)


class TensorRTBackend:
    """One engine + execution context per level; present outputs are device buffers bound as the next past inputs."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str | None = None, max_batch: int = 32, opt_batch: int = 1,
                 device_name: str | None = None, workspace_mib: int = 1024) -> None:
        self.bundle = bundle
        self.fresh_outputs = True  # every run allocates its present outputs
        try:
            precision = engine_precision(precision, bundle.manifest["precision"])
        except ValueError as e:
            raise BackendError(f"{bundle.path}: {e}") from None
        props = _check(cudart.cudaGetDeviceProperties(0))
        device_name = device_name or props.name.decode(errors="ignore").replace(" ", "-").lower()
        cache = bundle.path / "tensorrt" / f"{device_name}-{precision}"
        self.runtime = trt.Runtime(_LOGGER)
        self.engines, self.contexts = [], []
        for k, level in enumerate(bundle.manifest["levels"]):
            engine_path = cache / f"level{k}.engine"
            if not engine_path.exists():
                shapes = {t["name"]: tuple(tuple(b if d == "batch" else d for d in t["shape"])
                                           for b in (1, opt_batch, max_batch)) for t in level["inputs"]}
                build_engine(bundle.level_path(k), engine_path, shapes, precision, workspace_mib,
                             bundle.manifest["precision"])
            engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if engine is None:
                raise BackendError(f"cannot deserialize {engine_path} (built by another TensorRT version? delete it)")
            self.engines.append(engine)
            self.contexts.append(engine.create_execution_context())
        self.stream = _check(cudart.cudaStreamCreate())

    def run_level(self, level: int, patches: np.ndarray, past: list | None):
        past = past or []
        batch = patches.shape[0]
        if level:
            check_kv_shapes(self.bundle, level, batch, [v.shape for v in past])
        ctx = self.contexts[level]
        names, present_names = self.bundle.kv_names(level)
        inputs = {"patches": DeviceArray.from_numpy(patches), **dict(zip(names, past))}
        for name, arr in inputs.items():
            ctx.set_input_shape(name, arr.shape)
            ctx.set_tensor_address(name, arr.ptr)
        outputs = {}
        for name in ["embedding"] + present_names:
            outputs[name] = DeviceArray(tuple(ctx.get_tensor_shape(name)))
            ctx.set_tensor_address(name, outputs[name].ptr)
        if not ctx.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT execution of level {level} failed")
        _check(cudart.cudaStreamSynchronize(self.stream))
        return outputs["embedding"].numpy(), [outputs[n] for n in present_names]

    def take_rows(self, present: list, rows: np.ndarray) -> list:
        return self.gather_rows([(present, rows)])

    def gather_rows(self, parts: list[tuple[list, np.ndarray]]) -> list:
        return [DeviceArray.gather([(p[i], rows) for p, rows in parts]) for i in range(len(parts[0][0]))]

    def to_numpy(self, present: list) -> list[np.ndarray]:
        return [v.numpy() for v in present]
