"""Latency of level graphs: each level alone at batch 1, fed the real KV cache of the levels before it."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import numpy as np

from runtime.backends import Backend

Wrap = Callable[[Iterable[int], str], Iterable[int]]  # e.g. a progress bar: (iterable, description) -> iterable


def time_calls(fn: Callable[[], Any], runs: int, warmup: int, wrap: Wrap = lambda it, desc: it,
               desc: str = "") -> list[float]:
    """``warmup`` untimed calls, then the milliseconds of each of ``runs`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in wrap(range(runs), desc):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def level_times(backend: Backend, levels: list[np.ndarray], runs: int, warmup: int,
                wrap: Wrap = lambda it, desc: it) -> list[list[float]]:
    """Per level, the ms of each run of that level alone on ``levels`` (per-level patches of one image)."""
    pasts: list[Any] = [None]
    for k in range(len(levels) - 1):
        _, present = backend.run_level(k, levels[k], pasts[k])
        # an own copy: a backend may reuse its output memory when another level runs
        pasts.append(backend.take_rows(present, np.arange(levels[k].shape[0])))
    return [time_calls(lambda k=k: backend.run_level(k, levels[k], pasts[k]), runs, warmup, wrap, f"level {k}")
            for k in range(len(levels))]
