"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when present; KV cache kept as OrtValues."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime.backends import BackendError, check_kv_shapes, gather_numpy
from runtime.bundle import Bundle
from runtime.errors import one_line

_DEVICE = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU. (TensorRT EP is opt-in: it builds engines on first run.)"""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


WEIGHTS = ("auto", "levels", "split")


def set_spinning(opts: ort.SessionOptions, spinning: bool) -> None:
    """``spinning``: worker threads spin while a run lasts (the next kernel starts at once) and stop when it returns
    (``session.force_spinning_stop``), so an idle session never takes the cores from the one that runs nor from the
    host work between levels; else they never spin (each kernel wakes them)."""
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")


class OnnxRuntimeBackend:
    """The bundle's level graphs in ONNX Runtime; ``weights`` says how they hold the weights in memory (``auto``,
    the default: ``split`` when the bundle has its split graphs, else ``levels``):

    - ``levels``: one session per level graph, each with its own prepacked copy of the weights (one copy of the
      weights per level);
    - ``split``: the bundle's split graphs (export/split.py): a small embedding session per level and ONE body
      session for every level (past KV of any length, fed ``level``; an empty past at level 0): the transformer
      weights once in memory, prepacked once, run by the same kernels as the level graphs.

    With ``io_binding`` (default) the present KV outputs stay OrtValues on the provider's device and are bound as the
    next level's past inputs without a copy; without it every level round-trips the cache through numpy.
    ``load_levels=False`` makes the level sessions on first use (``load_levels()``), as the one-pass graph's.
    """

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None,
                 io_binding: bool = True, graph_optimization: bool = True, spinning: bool = True,
                 weights: str = "auto", load_levels: bool = True) -> None:
        if weights not in WEIGHTS:
            raise BackendError(f"onnxruntime weights mode {weights!r}: choose from {', '.join(WEIGHTS)}")
        if weights == "auto":
            weights = "split" if bundle.has_split else "levels"
        self.bundle = bundle
        self.providers = providers or default_providers()
        self.io_binding = io_binding
        self.fresh_outputs = True  # every run binds new present outputs: a cache stays valid while others run
        self.weights = weights
        self.spinning = spinning
        self._empty_past: dict[int, list] = {}

        def options() -> ort.SessionOptions:
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if graph_optimization
                                             else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            opts.log_severity_level = 3
            set_spinning(opts, spinning)
            return opts

        if weights == "split" and not bundle.has_split:
            raise BackendError(f"{bundle.path}: onnxruntime weights='split' needs the bundle's split graphs "
                               "(export it again without --no-split), or use weights='levels'")
        self.device = "cpu"  # the level sessions' device, once they exist
        self._options, self._full = options, None
        self.sessions: list[ort.InferenceSession] = []
        self.embeds: list[ort.InferenceSession] = []
        if load_levels:
            self.load_levels()

    def load_levels(self) -> None:
        """Make the level sessions unless made (``load_levels=False`` defers them to the first ``run_level``: a
        process that only runs the one-pass graph then holds the weights once)."""
        if self.sessions:
            return
        bundle, options = self.bundle, self._options
        try:
            if self.weights == "split":
                embeds = [ort.InferenceSession(str(bundle.embed_path(k)), options(), providers=self.providers)
                          for k in range(bundle.num_levels)]
                sessions = [ort.InferenceSession(str(bundle.body_path()), options(),
                                                 providers=self.providers)] * bundle.num_levels
            else:
                embeds, sessions = [], [ort.InferenceSession(str(bundle.level_path(k)), options(),
                                                             providers=self.providers)
                                        for k in range(bundle.num_levels)]
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime cannot load the bundle graphs: {one_line(e)}") from None
        self.device = _DEVICE.get(sessions[0].get_providers()[0], "cpu")
        self.output_names = [[o.name for o in s.get_outputs()] for s in sessions]
        self.sessions, self.embeds = sessions, embeds

    def load_full(self) -> None:
        """Make the one-pass graph's session (export/full.py) unless made: on first use, so that a cascade that never
        needs it holds no second copy of the weights."""
        if not self.bundle.has_full:
            raise BackendError(f"{self.bundle.path}: no one-pass graph (export it again without --no-full)")
        if self._full is None:
            try:
                self._full = ort.InferenceSession(str(self.bundle.full_path()), self._options(),
                                                  providers=self.providers)
            except Exception as e:
                raise BackendError(f"onnxruntime cannot load the one-pass graph: {one_line(e)}") from None

    def run_full(self, levels: list[np.ndarray]) -> list[np.ndarray]:
        """Every level's embedding from the bundle's one-pass graph."""
        self.load_full()
        names = self.bundle.manifest["full"]["inputs"]
        return self._full.run(None, {n: np.ascontiguousarray(p, dtype=np.float32) for n, p in zip(names, levels)})

    def _level_feeds(self, level: int, batch: int, past: list) -> tuple[list[str], list]:
        """Past input names and values for ``level``; the split body also takes ``level`` and, at level 0, empty past
        tensors."""
        names, _ = self.bundle.kv_names(level)
        if self.weights != "split":
            return names, list(past)
        if not level:
            if batch not in self._empty_past:
                cfg = self.bundle.manifest["kv_cache"]
                empty = np.zeros((batch, cfg["num_heads"], 0, cfg["head_dim"]), np.float32)
                self._empty_past[batch] = [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0)
                                           for _ in self.bundle.kv_names(1)[0]]
            names, past = self.bundle.kv_names(1)[0], self._empty_past[batch]
        return ["level", *names], [np.array(level, np.int64), *past]

    def run_level(self, level: int, patches: np.ndarray, past: list | None):
        self.load_levels()
        sess = self.sessions[level]
        past = past or []
        if level:
            check_kv_shapes(self.bundle, level, patches.shape[0], [tuple(_shape(v)) for v in past])
        names, values = self._level_feeds(level, patches.shape[0], past)
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        first, value = ("tokens", self._tokens(level, patches)) if self.embeds else ("patches", patches)
        if not self.io_binding:
            outs = sess.run(None, {first: _as_numpy(value), **{n: _as_numpy(v) for n, v in zip(names, values)}})
            return outs[0], outs[1:]
        binding = sess.io_binding()
        if isinstance(value, np.ndarray):
            binding.bind_cpu_input(first, value)
        else:
            binding.bind_ortvalue_input(first, value)
        for name, value in zip(names, values):
            if name == "level":
                binding.bind_cpu_input(name, value)
                continue
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names[level]:
            binding.bind_output(name, self.device if name != "embedding" else "cpu")
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(outs[1:])

    def _tokens(self, level: int, patches: np.ndarray):
        """Level ``level``'s embedding graph (split mode): its tokens, kept on the provider's device with I/O binding."""
        embed = self.embeds[level]
        if not self.io_binding:
            return embed.run(None, {"patches": patches})[0]
        binding = embed.io_binding()
        binding.bind_cpu_input("patches", patches)
        binding.bind_output("tokens", self.device)
        embed.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def take_rows(self, present: list, rows: np.ndarray) -> list:
        return self.gather_rows([(present, rows)])

    def gather_rows(self, parts: list[tuple[list, np.ndarray]]) -> list:
        """Chosen rows of several caches of one level (same past length) -> one cache, in order, one copy."""
        joined = [gather_numpy([(_as_numpy(present[i]), rows) for present, rows in parts])
                  for i in range(len(parts[0][0]))]
        if not self.io_binding:
            return joined
        return [ort.OrtValue.ortvalue_from_numpy(v, self.device, 0) for v in joined]

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
