"""The speed baseline every WaveCLIP claim is a ratio against: the teacher-sized full-resolution ViT (open_clip
ViT-B-16 image tower) exported to ONNX the standard way, and a timer that runs any single-input ONNX graph with the
same backend, provider and threads as the bundle under test.

torch and open_clip are imported here only, and only to export the baseline once: with a cached or given ONNX file
(or no baseline at all) the profiler runs without them.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.errors import one_line

BASELINE_NAME = "ViT-B-16"
BASELINE_ARCH = "open_clip:ViT-B-16"
CACHE_DIR = Path(os.environ.get("WAVECLIP_EDGE_CACHE", Path.home() / ".cache" / "waveclip-edge")) / "baselines"
CACHE_FILE = "vit-b-16.onnx"
OPSET = 17
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


class BaselineError(ValueError):
    """A baseline that cannot be made or run; one-line message."""


def default_path() -> Path:
    return CACHE_DIR / CACHE_FILE


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))


def export_vit_b16(path: str | os.PathLike | None = None, opset: int = OPSET) -> Path:
    """Export open_clip ViT-B-16's image tower (random weights: timing only) to ONNX, written atomically.

    The standard way: ``torch.onnx.export`` (TorchScript tracer) of ``model.visual`` on a [1, 3, 224, 224] input with a
    dynamic batch axis, constant folding on; nothing else (no fusion, no quantisation).
    """
    import warnings

    import torch

    from model.teachers import load_teacher

    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    visual = load_teacher(BASELINE_ARCH).model.visual.eval()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX symbolic
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(visual, (torch.randn(1, 3, 224, 224),), tmp, dynamo=False, opset_version=opset,
                              input_names=["pixels"], output_names=["embedding"],
                              dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
                              do_constant_folding=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        Path(tmp).unlink(missing_ok=True)
    return path


@dataclass
class BaselineChoice:
    """The ONNX file to time (None: skipped) and a note on where it came from or why it is missing."""

    path: Path | None
    note: str


def resolve_baseline(spec: str, log: Callable[[str], None] = lambda s: None) -> BaselineChoice:
    """``none`` -> skipped; a path -> that file; ``auto`` -> the cached ViT-B-16 export, made now when torch and
    open_clip are installed, else skipped with a note."""
    if spec == "none":
        return BaselineChoice(None, "baseline skipped (--baseline none)")
    if spec != "auto":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BaselineError(f"{path}: no such baseline ONNX file")
        return BaselineChoice(path, f"given file {path}")
    path = default_path()
    if path.is_file():
        return BaselineChoice(path, f"open_clip ViT-B-16 image tower (random init), torch.onnx.export, cached {path}")
    if not torch_available():
        return BaselineChoice(None, "ViT-B-16 baseline skipped: torch and open_clip are not installed (pip install "
                                    "'waveclip-edge[train]' to export it once, or pass --baseline PATH.onnx)")
    log(f"exporting the ViT-B-16 baseline once to {path} ...")
    t0 = time.perf_counter()
    try:
        export_vit_b16(path)
    except Exception as e:  # export failures: skip the baseline, keep the profile
        return BaselineChoice(None, f"ViT-B-16 baseline skipped: export failed ({' '.join(str(e).split())[:200]})")
    return BaselineChoice(path, f"open_clip ViT-B-16 image tower (random init), torch.onnx.export, exported to {path} "
                                f"in {time.perf_counter() - t0:.0f} s")


def quantized_baseline(fp32: str | os.PathLike, backend: str, images: np.ndarray,
                       log: Callable[[str], None] = lambda s: None, method: str | None = None) -> Path:
    """The ViT-B-16 baseline quantized to int8 the same way calibration.quantize quantizes a bundle for ``backend``
    (onnxruntime: quant_pre_process + quantize_static QDQ with the bundle's scheme; openvino: nncf.quantize,
    TRANSFORMER; ``method`` weight-only: MatMulNBits, no images), calibrated on ``images`` (uint8 [N, S, S, 3]);
    cached beside the fp32 file."""
    from calibration.backends import (DEFAULT_OPS, SCHEMES, WEIGHT_ONLY, quantize_onnx, quantize_openvino,
                                      quantize_weight_only)

    fp32 = Path(fp32)
    if method == WEIGHT_ONLY:
        out = fp32.with_name(f"{fp32.stem}-int8-{WEIGHT_ONLY}.onnx")
        if not out.is_file():
            import onnx

            log(f"quantizing the {BASELINE_NAME} baseline weight-only once ...")
            with tempfile.TemporaryDirectory(dir=fp32.parent, prefix=".quant-") as tmp:
                onnx.save(quantize_weight_only(fp32), str(Path(tmp) / out.name))
                os.replace(Path(tmp) / out.name, out)
        return out
    out = fp32.with_name(f"{fp32.stem}-int8-{backend}" + (".xml" if backend == "openvino" else ".onnx"))
    if out.is_file():
        return out
    log(f"quantizing the {BASELINE_NAME} baseline for {backend} once ({len(images)} calibration images) ...")
    x = vit_input(images, 224)
    items = [{"pixels": x[i:i + 1]} for i in range(len(x))]
    with tempfile.TemporaryDirectory(dir=fp32.parent, prefix=".quant-") as tmp:
        tmp = Path(tmp)
        if backend == "openvino":
            quantize_openvino(fp32, items, tmp / out.name, "minmax", None, progress=False)
            for suffix in (".bin", ".xml"):  # the weights first: an .xml never points at a missing .bin
                os.replace(tmp / out.with_suffix(suffix).name, out.with_suffix(suffix))
        else:
            import onnx

            class Reader:
                def __init__(self) -> None:
                    self.it = iter(items)

                def get_next(self):
                    return next(self.it, None)

                def rewind(self) -> None:
                    self.it = iter(items)

            # (symbolic shape inference cannot follow the traced ViT's reshapes; ONNX shape inference does)
            proto = quantize_onnx(fp32, Reader(), tmp / "q.onnx", SCHEMES[backend], "minmax", list(DEFAULT_OPS), tmp,
                                  skip_symbolic_shape=True)
            onnx.save(proto, str(tmp / out.name))
            os.replace(tmp / out.name, out)
    return out


def vit_input(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [B, S, S, 3] images -> CLIP-normalised float32 [B, 3, size, size] (bicubic resize when S != size)."""
    if images.shape[1] != size:
        from PIL import Image

        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
    x = (images.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class OnnxTimer:
    """Runs one single-input ONNX graph with the profile's backend: ``run(batch)`` times one inference."""

    def __init__(self, path: str | os.PathLike, backend: str, provider: str, threads: int | None,
                 precision: str = "fp32", inference_precision: str | None = None, spinning: bool = True) -> None:
        self.path = Path(path)
        self.backend = backend
        if backend == "onnxruntime":
            import onnxruntime as ort

            from runtime.backends.ort import set_spinning

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            set_spinning(opts, spinning)  # as the bundle's backend: workers spin within a run, never between runs
            opts.log_severity_level = 3
            providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
            try:
                self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
            except Exception as e:
                raise BaselineError(f"{self.path}: onnxruntime cannot load it: {one_line(e)}") from None
            inputs = self.session.get_inputs()
            if len(inputs) != 1:
                raise BaselineError(f"{self.path}: a baseline graph must have exactly one input, it has {len(inputs)}")
            self.input_name, self.shape = inputs[0].name, list(inputs[0].shape)
            self.dtype = _ORT_TYPES.get(inputs[0].type, np.float32)
        elif backend == "openvino":
            import openvino as ov

            config = {"PERFORMANCE_HINT": "LATENCY"}
            if inference_precision or precision == "fp32":  # the same rule as the bundle's OpenVINO backend
                config["INFERENCE_PRECISION_HINT"] = inference_precision or "f32"
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            try:
                model = ov.Core().read_model(str(self.path))
                if len(model.inputs) != 1:
                    raise BaselineError(f"{self.path}: a baseline graph must have exactly one input, "
                                        f"it has {len(model.inputs)}")
                inp = model.inputs[0]
                self.input_name = inp.get_any_name()
                self.shape = [d.get_length() if d.is_static else None for d in inp.get_partial_shape()]
                self.dtype = np.dtype(inp.get_element_type().to_dtype()).type
                self.compiled = ov.Core().compile_model(model, provider, config)
            except BaselineError:
                raise
            except Exception as e:
                raise BaselineError(f"{self.path}: openvino cannot compile it on {provider}: "
                                    f"{one_line(e)}") from None
            self.request = self.compiled.create_infer_request()
        else:
            raise BaselineError(f"timing a plain ONNX baseline with backend {backend!r} is not supported here "
                                "(on TensorRT time it with trtexec)")

    def feed(self, batch: int, images: np.ndarray | None = None) -> np.ndarray:
        """An input of the graph's shape at ``batch``: real images when it takes [B, 3, H, W] pixels, else noise."""
        dims = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 1) for i, d in enumerate(self.shape)]
        if (images is not None and len(dims) == 4 and dims[1] == 3 and dims[2] == dims[3]
                and np.issubdtype(self.dtype, np.floating)):
            reps = -(-batch // len(images))
            return vit_input(np.concatenate([images] * reps)[:batch], dims[2]).astype(self.dtype)
        rng = np.random.default_rng(0)
        if np.issubdtype(self.dtype, np.floating):
            return rng.standard_normal(dims).astype(self.dtype)
        return rng.integers(0, 2, dims).astype(self.dtype)

    def run(self, x: np.ndarray) -> None:
        if self.backend == "onnxruntime":
            self.session.run(None, {self.input_name: x})
        else:
            self.request.infer({0: x})
