"""OpenVINO backend: reads the bundle's ONNX graphs (or IR .xml); the KV cache stays in OpenVINO tensors."""
from __future__ import annotations

import numpy as np
import openvino as ov
from openvino.preprocess import PrePostProcessor

from runtime.backends import KV_PRECISIONS, BackendError, check_kv_shapes, gather_numpy
from runtime.bundle import Bundle
from runtime.errors import one_line


WEIGHTS = ("auto", "levels", "split")
HALF_TYPES = {"bf16": ov.Type.bf16, "f16": ov.Type.f16}


def kv_element_type(core: ov.Core, device: str, config: dict) -> ov.Type:
    """The element type of the KV cache between levels: bf16 or f16 where the models run at that precision by request
    (``INFERENCE_PRECISION_HINT``) and the device has it: their keys and values are computed in it, so an f32 cache
    only converts each level's present to f32 and its next past back, losslessly and slowly (43% of a level-3 pass in
    bf16 on AMX). Else f32 (a device without it computes in f32; int8 IR computes parts of them in f32)."""
    name = str(config.get("INFERENCE_PRECISION_HINT")).lower()
    if name not in HALF_TYPES:
        return ov.Type.f32
    try:
        capabilities = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # a device that does not say
        return ov.Type.f32
    return HALF_TYPES[name] if name.upper() in capabilities else ov.Type.f32


def as_float32(t: ov.Tensor) -> np.ndarray:
    """A tensor's values as float32 (bf16 arrives from OpenVINO as 16-bit words labelled float16: widen the bits)."""
    if t.get_element_type() == ov.Type.bf16:
        return (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(t.data, dtype=np.float32)


class OpenVINOBackend:
    """One compiled model + infer request per level (``weights="levels"``), or with ``weights="split"`` (``auto``, the
    default, when the bundle has them) the bundle's
    split graphs: a small compiled embedding model per level and ONE compiled body (dynamic past length) for every
    level, so that the transformer weights are in memory once; two infer requests of the body alternate by level,
    so a level never reads the tensors its own request is writing. The present tensors of level k are set as level
    k+1's inputs, held in the models' inference precision (``kv_element_type``: bf16 where OpenVINO computes in bf16).

    ``kv_precision``: the cache's element type; ``auto`` (default) as ``kv_element_type`` says. ``bf16`` / ``f16``
    ask for a half cache where the models compute parts of it in f32 (int8 IR): half the bytes that every level reads,
    concatenates and writes, at a rounding of the keys and values (measured in docs/performance.md: embeddings at cosine
    0.9998 to an f32 cache, faster batches); refused where the device lacks that type.

    ``properties``: further OpenVINO properties for every compiled model, applied last (e.g.
    ``{"CPU_RUNTIME_CACHE_CAPACITY": 0}`` keeps no per-shape kernel cache: less memory for the split body, whose past
    length changes by level, at some latency; see docs/perf-history.md)."""

    name = "openvino"

    def __init__(self, bundle: Bundle, device: str = "CPU", threads: int | None = None,
                 hint: str = "LATENCY", inference_precision: str | None = None, weights: str = "auto",
                 properties: dict | None = None, load_levels: bool = True, kv_precision: str = "auto") -> None:
        if kv_precision not in KV_PRECISIONS:
            raise BackendError(f"openvino kv_precision {kv_precision!r}: choose from {', '.join(KV_PRECISIONS)}")
        if weights not in WEIGHTS:
            raise BackendError(f"openvino weights mode {weights!r}: choose from {', '.join(WEIGHTS)}")
        if weights == "auto":
            weights = "split" if bundle.has_split else "levels"
        if weights == "split" and not bundle.has_split:
            raise BackendError(f"{bundle.path}: openvino weights='split' needs the bundle's split graphs (export it "
                               "again without --no-split), or use weights='levels'")
        self.bundle, self.weights = bundle, weights
        self.fresh_outputs = False  # a request's next run overwrites the present tensors it returned
        core = ov.Core()
        config = {"PERFORMANCE_HINT": hint}
        # OpenVINO runs fp32 graphs in bf16 on CPUs that have it unless told otherwise; keep the bundle's precision.
        if inference_precision or bundle.manifest["precision"] == "fp32":
            config["INFERENCE_PRECISION_HINT"] = inference_precision or "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        config.update(properties or {})
        self._empty_past: dict[int, list] = {}
        self._core, self._device, self._config, self._full = core, device, config, None
        self.kv_type = kv_element_type(core, device, config)
        if kv_precision == "f32":
            self.kv_type = ov.Type.f32
        elif kv_precision in HALF_TYPES:
            if kv_precision.upper() not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):
                raise BackendError(f"openvino kv_precision {kv_precision}: {device} has no {kv_precision.upper()}")
            self.kv_type = HALF_TYPES[kv_precision]
        self.compiled: list = []
        self.requests: list = []
        self.embeds: list = []
        if load_levels:
            self.load_levels()

    def load_levels(self) -> None:
        """Compile the level graphs unless compiled (``load_levels=False`` defers them to the first ``run_level``)."""
        if self.compiled:
            return
        core, bundle, device, config = self._core, self.bundle, self._device, self._config
        try:
            if self.weights == "split":
                body = self._compile(bundle.body_path())
                pair = [body.create_infer_request() for _ in range(2)]
                requests = [pair[k % 2] for k in range(bundle.num_levels)]
                embeds = [core.compile_model(str(bundle.embed_path(k)), device, config).create_infer_request()
                          for k in range(bundle.num_levels)]
                compiled = [body]
            else:
                compiled = [self._compile(bundle.level_path(k)) for k in range(bundle.num_levels)]
                requests, embeds = [c.create_infer_request() for c in compiled], []
        except Exception as e:  # openvino raises RuntimeError subclasses with long messages
            raise BackendError(f"openvino cannot compile the bundle graphs on {device}: {one_line(e)}") from None
        self.compiled, self.requests, self.embeds = compiled, requests, embeds

    def _compile(self, path) -> ov.CompiledModel:
        """Compile a graph with KV cache ports, their tensors of ``kv_type``."""
        if self.kv_type == ov.Type.f32:
            return self._core.compile_model(str(path), self._device, self._config)
        model = self._core.read_model(str(path))
        kv = {name for k in range(self.bundle.num_levels) for names in self.bundle.kv_names(k) for name in names}
        ppp = PrePostProcessor(model)
        for port in model.inputs:
            if port.get_any_name() in kv:
                ppp.input(port.get_any_name()).tensor().set_element_type(self.kv_type)
        for port in model.outputs:
            if port.get_any_name() in kv:
                ppp.output(port.get_any_name()).tensor().set_element_type(self.kv_type)
        return self._core.compile_model(ppp.build(), self._device, self._config)

    def load_full(self) -> None:
        """Compile the one-pass graph (export/full.py) unless compiled: on first use, as ONNX Runtime's backend."""
        if not self.bundle.has_full:
            raise BackendError(f"{self.bundle.path}: no one-pass graph (export it again without --no-full)")
        if self._full is None:
            try:
                self._full = self._core.compile_model(str(self.bundle.full_path()), self._device,
                                                      self._config).create_infer_request()
            except Exception as e:
                raise BackendError(f"openvino cannot compile the one-pass graph: {one_line(e)}") from None

    def run_full(self, levels: list[np.ndarray]) -> list[np.ndarray]:
        """Every level's embedding from the bundle's one-pass graph."""
        self.load_full()
        names = self.bundle.manifest["full"]["inputs"]
        self._full.infer({n: np.ascontiguousarray(p, dtype=np.float32) for n, p in zip(names, levels)})
        return [self._full.get_tensor(n).data.copy() for n in self.bundle.manifest["full"]["outputs"]]

    def run_level(self, level: int, patches: np.ndarray, past: list | None):
        self.load_levels()
        req = self.requests[level]
        past = past or []
        if level:
            check_kv_shapes(self.bundle, level, patches.shape[0], [tuple(v.shape) for v in past])
        names, present_names = self.bundle.kv_names(level)
        patches = ov.Tensor(np.ascontiguousarray(patches, dtype=np.float32))
        if self.weights == "split":
            embed = self.embeds[level]
            embed.set_tensor("patches", patches)
            embed.infer()
            req.set_tensor("tokens", embed.get_tensor("tokens"))
            req.set_tensor("level", ov.Tensor(np.array(level, np.int64)))
            if not level:
                names, past = self.bundle.kv_names(1)[0], self._empty(patches.shape[0])
        else:
            req.set_tensor("patches", patches)
        for name, value in zip(names, past):
            req.set_tensor(name, value if isinstance(value, ov.Tensor) else self._kv_tensor(np.asarray(value)))
        req.infer()
        emb = req.get_tensor("embedding").data.copy()
        # Own copies of the outputs' memory are not needed: the next level reads them before this request runs again.
        return emb, [req.get_tensor(n) for n in present_names]

    def _empty(self, batch: int) -> list:
        """Level 0's past for the body: zero-length KV tensors."""
        if batch not in self._empty_past:
            kv = self.bundle.manifest["kv_cache"]
            shape = (batch, kv["num_heads"], 0, kv["head_dim"])
            self._empty_past[batch] = [ov.Tensor(self.kv_type, shape) for _ in self.bundle.kv_names(1)[0]]
        return self._empty_past[batch]

    def _kv_tensor(self, values: np.ndarray) -> ov.Tensor:
        """A cache given as float values (not this backend's own tensors) in ``kv_type``."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.kv_type == ov.Type.f32:
            return ov.Tensor(values)
        t = ov.Tensor(self.kv_type, list(values.shape))
        if self.kv_type == ov.Type.bf16:  # round to nearest even, as the conversion inside OpenVINO
            bits = values.view(np.uint32)
            t.data.view(np.uint16)[...] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            t.data[...] = values
        return t

    def take_rows(self, present: list, rows: np.ndarray) -> list:
        return self.gather_rows([(present, rows)])

    def gather_rows(self, parts: list[tuple[list, np.ndarray]]) -> list:
        """Chosen rows of several caches of one level (same past length) -> one cache, in order, the bits as they are."""
        out = []
        for i in range(len(parts[0][0])):
            tensors = [(p[i] if isinstance(p[i], ov.Tensor) else self._kv_tensor(np.asarray(p[i])), rows)
                       for p, rows in parts]
            shape = list(tensors[0][0].shape)
            joined = ov.Tensor(tensors[0][0].get_element_type(), [sum(len(r) for _, r in tensors), *shape[1:]])
            gather_numpy([(np.asarray(t.data).view(np.uint8), rows) for t, rows in tensors],
                         out=np.asarray(joined.data).view(np.uint8))
            out.append(joined)
        return out

    def to_numpy(self, present: list) -> list[np.ndarray]:
        return [as_float32(t) if isinstance(t, ov.Tensor) else np.asarray(t) for t in present]
