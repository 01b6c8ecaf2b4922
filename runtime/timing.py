"""Latency of level graphs and of the cascade at an operating point (exits forced on the real cascade)."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

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


# --- the cost model of an operating point: exits forced on the real cascade -----------------------------------------
def parse_exit_mix(text: str | Sequence[float], num_levels: int) -> np.ndarray:
    """'40,30,20,10' (percent or fractions, any positive scale) -> exit fractions per level summing to 1."""
    try:
        values = [float(x) for x in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise ValueError(f"exit mix {text!r}: expected comma-separated numbers such as 40,30,20,10") from None
    if len(values) != num_levels:
        raise ValueError(f"exit mix {text!r}: needs {num_levels} values (one per level), got {len(values)}")
    mix = np.asarray(values, dtype=np.float64)
    if (mix < 0).any() or not np.isfinite(mix).all() or mix.sum() <= 0:
        raise ValueError(f"exit mix {text!r}: values must be >= 0 with a positive sum")
    return mix / mix.sum()


def exit_plan(mix: Sequence[float], n: int, seed: int = 0) -> np.ndarray:
    """``n`` exit levels whose counts follow ``mix`` as closely as integers allow (largest remainder), in a fixed
    shuffled order so that the levels alternate as they would on real images."""
    mix = np.asarray(mix, dtype=np.float64)
    counts = np.floor(mix * n).astype(int)
    rest = np.argsort(-(mix * n - counts), kind="stable")[: n - counts.sum()]
    counts[rest] += 1
    plan = np.repeat(np.arange(len(mix)), counts)
    np.random.default_rng(seed).shuffle(plan)
    return plan


def exit_cost_times(cascade, levels: list[np.ndarray], runs: int, warmup: int,
                    wrap: Wrap = lambda it, desc: it) -> list[list[float]]:
    """Per level k, the ms of each run of the real cascade (``Cascade.classify_levels``: levels, head, softmax, KV
    rows) on ``levels`` with every row forced to exit at k: the cost of an image that exits at k."""
    rows = levels[0].shape[0]
    return [time_calls(lambda k=k: cascade.classify_levels(levels, exit_levels=np.full(rows, k)), runs, warmup,
                       wrap, f"exit at {k}") for k in range(cascade.max_level + 1)]


def expected_ms(mix: Sequence[float], exit_cost_ms: Sequence[float]) -> float:
    """Expected latency per image of an exit mix: sum over k of P(exit at k) x cost of exiting at k."""
    return float(np.dot(np.asarray(mix, dtype=np.float64), np.asarray(exit_cost_ms, dtype=np.float64)))
