"""The measurements of ``devices.profile``: per-level latency with the real KV cache, the cascade per image, the cost
of each exit, forced exit mixes, batch throughput and the ViT-B-16 baseline at the bundle's backend and precision."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devices.baseline import BASELINE_NAME, BaselineError, OnnxTimer, quantized_baseline, resolve_baseline
from devices.profile_config import DeviceProfile
from devices.profile_report import STAT_KEYS
from runtime.bundle import Bundle
from runtime.cascade import Cascade, Result
from runtime.errors import one_line
from runtime.preprocess import image_to_array
from runtime.timing import exit_cost_times, exit_plan, expected_ms, level_times, time_calls
from runtime.wavelet import images_to_levels


# --- statistics ---------------------------------------------------------------------------------------------------
def summarize(ms: Sequence[float]) -> dict[str, float | int]:
    """min / p50 / p90 / p99 / max / mean (ms) and the number of samples."""
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return {**{k: None for k in STAT_KEYS}, "runs": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"min_ms": _r(a.min()), "p50_ms": _r(p50), "p90_ms": _r(p90), "p99_ms": _r(p99), "max_ms": _r(a.max()),
            "mean_ms": _r(a.mean()), "runs": int(a.size)}


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(float(a) / float(b), 4)


class Progress:
    """tqdm bars on stderr (auto-off when stderr is not a terminal, or with --quiet)."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = enabled

    def __call__(self, iterable, desc: str, total: int | None = None):
        try:
            from tqdm import tqdm
        except ImportError:
            return iterable
        disable = None if self.enabled is None else not self.enabled
        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, disable=disable,
                    dynamic_ncols=True)


def time_runs(fn: Callable[[], Any], runs: int, warmup: int, desc: str, progress: Progress) -> list[float]:
    """``warmup`` untimed calls, then the ms of each of ``runs`` calls (with a progress bar)."""
    return time_calls(fn, runs, warmup, progress, desc)


# --- measurements -------------------------------------------------------------------------------------------------
def level_latency(bundle: Bundle, backend, levels: list[np.ndarray], runs: int, warmup: int,
                  progress: Progress) -> list[dict]:
    """Each level alone at batch 1 on one real image, with the real KV cache of the levels before it."""
    times = level_times(backend, levels, runs, warmup, progress)
    return [{"level": k, "batch": 1, "gflops": _r(lv.get("gflops"), 5),
             "cumulative_gflops": _r(lv.get("cumulative_gflops"), 5), **summarize(t)}
            for k, (lv, t) in enumerate(zip(bundle.manifest["levels"], times))]


def cascade_latency(gated: Cascade, full: Cascade, paths: list[Path], spec: dict, warmup: int,
                    progress: Progress) -> dict:
    """Per image at batch 1: preprocess ms (decode + resize + wavelet), gated cascade ms, always-full cascade ms
    (interleaved image by image so background load hits both alike)."""
    def one(path: Path) -> tuple[float, float, float, Result]:
        t0 = time.perf_counter()
        levels = images_to_levels(image_to_array(path, spec)[None], spec)
        t1 = time.perf_counter()
        result = gated.classify_levels(levels)[0]
        t2 = time.perf_counter()
        full.classify_levels(levels)
        t3 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, result

    for i in range(warmup):
        one(paths[i % len(paths)])
    pre, casc, full_ms, exits = [], [], [], []
    for path in progress(paths, "cascade"):
        p, c, f, r = one(path)
        pre.append(p)
        casc.append(c)
        full_ms.append(f)
        exits.append(r.exit_level)
    return {"preprocess": pre, "cascade": casc, "always_full": full_ms, "exits": exits}


def exit_histogram(exits: Sequence[int], num_levels: int) -> list[dict]:
    n = max(len(exits), 1)
    counts = np.bincount(np.asarray(exits, dtype=int), minlength=num_levels)[:num_levels]
    reach = np.cumsum(counts[::-1])[::-1]  # images that ran level k = exits at k or later
    return [{"level": k, "count": int(counts[k]), "fraction": _r(counts[k] / n), "reach_fraction": _r(reach[k] / n)}
            for k in range(num_levels)]


def exit_costs(cascade: Cascade, levels: list[np.ndarray], runs: int, warmup: int, progress: Progress) -> list[dict]:
    """The cost of an image that exits at each level: the real cascade at batch 1 (levels, head, softmax, KV rows)
    with the exit forced there. The cost model of the expected latency here and of calibration.gate --budget-ms."""
    times = exit_cost_times(cascade, levels, runs, warmup, progress)
    return [{"level": k, "batch": 1, **summarize(t)} for k, t in enumerate(times)]


def expected_latency(hist: list[dict], costs: list[dict], measured_mean: float | None, bundle: Bundle) -> dict:
    """sum_k P(exit at k) * mean cost of exiting at k, next to the measured mean; plus the expected GFLOPs."""
    fractions = [h["fraction"] for h in hist]
    expected = expected_ms(fractions, [c["mean_ms"] for c in costs])
    cum = [lv.get("cumulative_gflops") for lv in bundle.manifest["levels"]]
    gflops = (sum(f * c for f, c in zip(fractions, cum)) if all(c is not None for c in cum) else None)
    return {"expected_ms": _r(expected), "measured_mean_ms": _r(measured_mean),
            "expected_vs_measured": _ratio(expected, measured_mean), "expected_gflops": _r(gflops, 5),
            "formula": "sum over levels k of P(exit at level k) * mean ms of the real cascade with the exit forced at "
                       "k (batch 1: levels, head, softmax and KV rows included)"}


def exit_mix_latency(cascade: Cascade, paths: list[Path], spec: dict, mix: np.ndarray, costs: list[dict],
                     images: np.ndarray, batch: int, runs: int, warmup: int, progress: Progress) -> dict:
    """The real cascade end to end with the exits forced to ``mix``: per image at batch 1 (each image of ``paths``
    forced to its exit in a plan whose counts follow the mix), and throughput at ``batch`` over 5 batches."""
    plan = exit_plan(mix, len(paths))
    levels = [images_to_levels(image_to_array(p, spec)[None], spec) for p in paths]
    for i in range(min(warmup, len(paths))):
        cascade.classify_levels(levels[i], exit_levels=[plan[i]])
    ms = []
    for lv, k in zip(progress(levels, "exit mix"), plan):
        t0 = time.perf_counter()
        cascade.classify_levels(lv, exit_levels=[k])
        ms.append((time.perf_counter() - t0) * 1e3)
    counts = np.bincount(plan, minlength=len(mix))
    expected = expected_ms(counts / counts.sum(), [c["mean_ms"] for c in costs])
    measured = summarize(ms)
    reps = -(-batch // len(images))
    big = images_to_levels(np.concatenate([images] * reps)[:batch], spec)
    bplan = exit_plan(mix, 5 * batch)
    chunks = [bplan[i:i + batch] for i in range(0, len(bplan), batch)]
    tb = time_runs(lambda: [cascade.classify_levels(big, exit_levels=c) for c in chunks], runs, min(warmup, 2),
                   f"exit mix b{batch}", progress)
    stats = summarize([t / len(chunks) for t in tb])
    return {"mix": [_r(m) for m in mix], "images": len(paths), "plan_counts": counts.tolist(), "cascade": measured,
            "expected_ms": _r(expected), "expected_vs_measured": _ratio(expected, measured["mean_ms"]),
            "throughput": {"batch": batch, "images_per_s": _r(batch * 1e3 / stats["mean_ms"], 3), **stats}}


def batch_throughput(cascade: Cascade, images: np.ndarray, batch: int, spec: dict, runs: int, warmup: int,
                     desc: str, progress: Progress) -> dict:
    """images/s of ``cascade.classify_levels`` on ``batch`` real images (preprocessed once)."""
    reps = -(-batch // len(images))
    levels = images_to_levels(np.concatenate([images] * reps)[:batch], spec)
    times = time_runs(lambda: cascade.classify_levels(levels), runs, warmup, desc, progress)
    stats = summarize(times)
    return {"batch": batch, "images_per_s": _r(batch * 1e3 / stats["mean_ms"], 3), **stats}


def vit_baseline(spec: str, profile: DeviceProfile, threads: int | None, images: np.ndarray, batch: int, runs: int,
                 warmup: int, progress: Progress, log: Callable[[str], None], bundle: Bundle | None = None,
                 inference_precision: str | None = None, spinning: bool = True) -> dict:
    """ViT-B-16 (or a given single-input ONNX graph) at batch 1 and ``batch`` with the same backend, threads and
    precision as the bundle (ONNX Runtime workers spin within a run as the cascade's do): an int8 bundle's baseline is
    ViT-B-16 quantized the same way (``auto`` only)."""
    choice = resolve_baseline(spec, log)
    precision = bundle.manifest.get("precision", "fp32") if bundle is not None else profile.precision
    if spec == "auto" and choice.path is not None and precision == "int8":
        q = bundle.manifest.get("quantization", {})
        target, method = q.get("backend", profile.backend), q.get("method")
        try:
            path = quantized_baseline(choice.path, target, images[:16], log, method)
            how = "weight-only (MatMulNBits)" if method == "weight-only" else "(16 calibration images)"
            choice = type(choice)(path, f"{choice.note}; quantized to int8 for {target} as calibration.quantize does "
                                        f"{how}, cached {path}")
        except Exception as e:  # quantization failures: time nothing rather than an unfair baseline
            return {"name": BASELINE_NAME, "note": f"int8 baseline skipped: {one_line(e)}", "path": None,
                    "skipped": True}
    out: dict[str, Any] = {"name": BASELINE_NAME if spec in ("auto", "none") else Path(spec).stem, "note": choice.note,
                           "path": str(choice.path) if choice.path else None, "skipped": choice.path is None}
    if choice.path is None:
        return out
    if spec == "auto":
        from model.config import vit_gflops  # model.config needs no torch

        out["gflops"] = _r(vit_gflops(), 5)
    else:
        out["gflops"] = None
    try:
        timer = OnnxTimer(choice.path, profile.backend, profile.execution_provider, threads, precision,
                          inference_precision, spinning)
    except BaselineError as e:
        if profile.backend == "tensorrt":
            return {**out, "skipped": True, "note": str(e)}
        raise
    x1 = timer.feed(1, images)
    out["batch1"] = {"batch": 1, **summarize(time_runs(lambda: timer.run(x1), runs, warmup, f"{out['name']} b1",
                                                       progress))}
    out["batch1"]["images_per_s"] = _r(1e3 / out["batch1"]["mean_ms"], 3)
    if batch != 1:
        xb = timer.feed(batch, images)
        s = summarize(time_runs(lambda: timer.run(xb), runs, warmup, f"{out['name']} b{batch}", progress))
        out["batch_b"] = {"batch": batch, "images_per_s": _r(batch * 1e3 / s["mean_ms"], 3), **s}
    else:
        out["batch_b"] = out["batch1"]
    return out
