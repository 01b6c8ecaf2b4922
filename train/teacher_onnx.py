"""Run a teacher's forward through an exported ONNX graph for the teacher pass, in fp32: OpenVINO where it is
installed (efficientnet-lite0 at 224 px, batch 64, 2 cores: 1.7x ONNX Runtime's throughput, which is itself about
1.7x torch's), else ONNX Runtime.

The teacher is exported once per process with ``torch.onnx.export`` (through a temporary folder, removed after); the
first batch is checked against torch (``PARITY_ATOL`` relative to the output scale) and any failure falls back to the
next backend and at last to torch, so the cache never holds outputs of a graph that was not verified. OpenVINO runs
with ``INFERENCE_PRECISION_HINT=f32`` (its CPU default is bf16 where the CPU has it), so its targets are the fp32
ones and the cache key does not depend on the backend.

``openvino-bf16`` asks for OpenVINO in bf16 on a CPU that has it (AMX or AVX512-BF16): 1.75x the fp32 pass's
throughput on an AMX Xeon (``bench/teacher_pass.py``), at targets within bf16's rounding (checked on the first batch:
every embedding at cosine ``BF16_MIN_COSINE`` or more to torch's, the map within ``BF16_MAP_ATOL`` of its scale). Its
targets are not the fp32 ones, so the cache keeps them apart (``train.teacher_cache``), and it never falls back to
another backend: where it cannot run, it is a one-line error.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.teachers import Teacher, TeacherError
from runtime.errors import one_line

log = logging.getLogger(__name__)
PARITY_ATOL = 1e-3  # of max |output|
Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
BACKENDS = ("auto", "openvino", "onnxruntime", "torch", "openvino-bf16")
BF16 = "openvino-bf16"
# bf16 keeps 8 bits of mantissa through efficientnet-lite0's 60-odd layers: on the demo's student views its
# embeddings came out at cosine 0.996-0.9995 to fp32's and its maps within 0.11 of their scale (24 images)
BF16_MIN_COSINE = 0.99  # per embedding, to torch's fp32
BF16_MAP_ATOL = 0.2  # of max |map|


class _WithMap(torch.nn.Module):
    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher
        self.model = teacher.model  # registered, so the export sees the weights

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, fmap = self.teacher.encode_with_map(pixels)
        return emb, fmap


def _close(a: np.ndarray, b: torch.Tensor) -> bool:
    ref = b.detach().cpu().float().numpy()
    return a.shape == ref.shape and float(np.abs(a - ref).max()) <= PARITY_ATOL * max(1.0, float(np.abs(ref).max()))


def _close_bf16(emb: np.ndarray, ref_emb: torch.Tensor, fmap: np.ndarray, ref_map: torch.Tensor) -> bool:
    e, r = torch.from_numpy(emb).float(), ref_emb.detach().float()
    if e.shape != r.shape or fmap.shape != tuple(ref_map.shape):
        return False
    cosine = torch.nn.functional.cosine_similarity(e, r, dim=-1).min().item()
    scale = max(1.0, float(ref_map.abs().max()))
    map_diff = float(np.abs(fmap - ref_map.detach().float().numpy()).max())
    return cosine >= BF16_MIN_COSINE and map_diff <= BF16_MAP_ATOL * scale


def _ort_runner(model: bytes, threads: int | None) -> Callable[[np.ndarray], list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"pixels": pixels})


def _openvino_runner(path: Path, threads: int | None, precision: str = "f32"
                     ) -> Callable[[np.ndarray], list[np.ndarray]]:
    import openvino as ov

    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise TeacherError("--teacher-backend openvino-bf16: this CPU has no bf16 (AMX or AVX512-BF16); use openvino")
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = core.compile_model(str(path), "CPU", config).create_infer_request()

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        request.infer({"pixels": pixels})  # outputs copied: the request reuses its tensors on the next batch
        return [request.get_output_tensor(i).data.copy() for i in range(2)]

    return run


def onnx_encoder(teacher: Teacher, sample: torch.Tensor, threads: int | None = None, backend: str = "auto"
                 ) -> tuple[Encoder, str]:
    """(an ``encode_with_map`` twin run by OpenVINO or ONNX Runtime, its name), or (the torch one, "torch") where that
    is impossible or not exact (a GPU teacher, a teacher without a map, a failed export or parity check).
    ``backend``: "auto" (OpenVINO when installed, then ONNX Runtime), or one of them (falling back to torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"teacher backend {backend!r}: choose from {', '.join(BACKENDS)}")
    torch_encoder: Encoder = teacher.encode_with_map
    if backend == BF16:
        if teacher.device.type != "cpu" or not importlib.util.find_spec("openvino"):
            raise TeacherError("--teacher-backend openvino-bf16 runs the teacher on the CPU with OpenVINO: install "
                               "waveclip-edge[openvino] and keep --device cpu")
    elif teacher.device.type != "cpu" or backend == "torch":
        return torch_encoder, "torch"
    with torch.no_grad():
        ref_emb, ref_map = teacher.encode_with_map(sample)
    if ref_map is None:
        if backend == BF16:
            raise TeacherError(f"--teacher-backend openvino-bf16: teacher {teacher.name} has no exportable map")
        return torch_encoder, "torch"
    order = [BF16] if backend == BF16 else [
        b for b in ("openvino", "onnxruntime") if backend in ("auto", b) and importlib.util.find_spec(b)]
    with tempfile.TemporaryDirectory(prefix="waveclip-teacher-") as folder:
        path = Path(folder) / "teacher.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(_WithMap(teacher).eval(), (sample[:1],), str(path), input_names=["pixels"],
                                  output_names=["embedding", "map"], dynamic_axes={"pixels": {0: "batch"}},
                                  opset_version=17, dynamo=False)
        except Exception as err:  # the torch path is always right
            if backend == BF16:
                raise TeacherError(f"--teacher-backend openvino-bf16: the teacher does not export ({one_line(err)})")
            log.warning("teacher: ONNX export failed (%s); using torch", one_line(err))
            return torch_encoder, "torch"
        for name in order:
            try:  # made while the file exists: both keep the graph in memory, so the folder can go
                run = (_ort_runner(path.read_bytes(), threads) if name == "onnxruntime"
                       else _openvino_runner(path, threads, "bf16" if name == BF16 else "f32"))
                emb, fmap = run(sample.numpy())
            except TeacherError:
                raise
            except Exception as err:
                if name == BF16:
                    raise TeacherError(f"--teacher-backend openvino-bf16: {one_line(err)}") from None
                log.warning("teacher: %s unavailable (%s)", name, one_line(err))
                continue
            if name == BF16 and not _close_bf16(emb, ref_emb, fmap, ref_map):
                raise TeacherError("--teacher-backend openvino-bf16: its outputs are further from torch's than bf16 "
                                   "rounding allows; use openvino")
            if name == BF16 or (_close(emb, ref_emb) and _close(fmap, ref_map)):
                def encode(pixels: torch.Tensor, run=run) -> tuple[torch.Tensor, torch.Tensor]:
                    e, m = run(pixels.contiguous().numpy())
                    return torch.from_numpy(e), torch.from_numpy(m)

                return encode, name
            log.warning("teacher: %s outputs differ from torch", name)
    log.warning("teacher: no exported backend matched torch; using torch")
    return torch_encoder, "torch"
