"""Calibration inputs for every level graph: real image patches and, for level k > 0, the real KV cache that the fp32
levels < k produce for those same images (never random KV: level k's activations depend on it)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from tqdm import tqdm

from runtime.backends.ort import OnnxRuntimeBackend
from runtime.bundle import Bundle

CHUNK = 32  # rows per fp32 run while walking the cascade


def level_feeds(bundle: Bundle, patches: list[np.ndarray], progress: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Walk the fp32 cascade and yield, level by level, every input of that level's graph for all N images:
    ``{"patches": [N, ...], "past_key_values.{i}.key": [N, heads, past, head_dim], ...}``. Only one level's KV is held
    at a time."""
    backend = OnnxRuntimeBackend(bundle, providers=["CPUExecutionProvider"], io_binding=False)
    n = patches[0].shape[0]
    past: list[np.ndarray] = []
    for k in tqdm(range(bundle.num_levels), desc="fp32 cascade", unit="level", disable=not progress):
        names, _ = bundle.kv_names(k)
        feeds = {"patches": np.ascontiguousarray(patches[k], dtype=np.float32), **dict(zip(names, past))}
        yield feeds
        if k + 1 < bundle.num_levels:
            chunks = [backend.run_level(k, feeds["patches"][i:i + CHUNK], [p[i:i + CHUNK] for p in past] or None)[1]
                      for i in range(0, n, CHUNK)]
            past = [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


class RangedReader(CalibrationDataReader):
    """ONNX Runtime calibration reader over :meth:`items` (feed dicts; their shapes may differ from item to item),
    restricted to ``[start, end)`` by ORT's strided calibration."""

    start: int
    end: int
    items_total: int

    def items(self) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.items())

    def __len__(self) -> int:
        return self.end - self.start

    def set_range(self, start_index: int, end_index: int) -> None:
        """Items [start_index, end_index) only (ORT's strided calibration)."""
        self.start, self.end = max(0, start_index), min(self.items_total, end_index)
        self.rewind()


class ItemsReader(RangedReader):
    """A reader over a list of feed dicts."""

    def __init__(self, items: list[dict[str, np.ndarray]]) -> None:
        self._items = items
        self.items_total = len(items)
        self.start, self.end = 0, len(items)
        self.rewind()

    def items(self) -> list[dict[str, np.ndarray]]:
        return self._items[self.start:self.end]


class CascadeCalibrationReader(RangedReader):
    """ONNX Runtime calibration reader over one level's full inputs (see :func:`level_feeds`), ``batch_size`` rows
    per item. Iterating it (or :meth:`items`) gives the same dicts to other tools (NNCF)."""

    def __init__(self, feeds: dict[str, np.ndarray], batch_size: int = 1) -> None:
        self.feeds = feeds
        self.batch_size = batch_size
        self.rows = next(iter(feeds.values())).shape[0]
        self.items_total = -(-self.rows // batch_size)
        self.start, self.end = 0, self.items_total  # in items, as ORT's strided calibration counts
        self.rewind()

    @classmethod
    def for_level(cls, bundle: Bundle, patches: list[np.ndarray], level: int, batch_size: int = 1
                  ) -> "CascadeCalibrationReader":
        """Reader of one level (runs the fp32 levels before it); to quantize every level, walk :func:`level_feeds`."""
        for k, feeds in enumerate(level_feeds(bundle, patches)):
            if k == level:
                return cls(feeds, batch_size)
        raise ValueError(f"level {level} out of range 0..{bundle.num_levels - 1}")

    def items(self) -> list[dict[str, np.ndarray]]:
        b = self.batch_size
        return [{name: v[i * b:(i + 1) * b] for name, v in self.feeds.items()} for i in range(self.start, self.end)]
