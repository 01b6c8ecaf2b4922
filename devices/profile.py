"""``python -m devices.profile BUNDLE --device PROFILE``: time a bundle on this machine the way DESIGN.md asks.

One run measures, with the device profile's backend, provider, threads and precision:

- each level graph ALONE at batch 1 (fed with a real image's patches and the real KV cache of the levels before it,
  computed once), warm-up excluded: min / p50 / p90 / p99 / max / mean over ``--runs``;
- the early-exit cascade end to end over real images at batch 1 with the bundle's thresholds: preprocessing
  (decode, resize, wavelet) and the cascade timed separately, the exit histogram, and the latency the exit rates
  predict (sum over levels of P(reach level k) x p50 of level k) next to the measured mean;
- throughput at ``--batch`` B (images/s) of the cascade and of the always-full cascade;
- baselines in the same run: WaveCLIP forced to run every level (thresholds > 1), and the teacher-sized
  full-resolution ViT (open_clip ViT-B-16 image tower, plain ``torch.onnx.export``) at batch 1 and B; speed is
  reported as ratios against them;
- the machine record (devices/machine.py).

Writes a Markdown report (stdout, ``--markdown``), every number as JSON (``--json``; its ``levels[].p50_ms`` feeds
``python -m calibration.gate --latency-json``) and a chart (``--png``). torch is needed only to export the ViT-B-16
baseline once (``--baseline auto``); with ``--baseline none`` or a path the profiler runs on the runtime alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devices.baseline import BASELINE_NAME, BaselineError, OnnxTimer, quantized_baseline, resolve_baseline
from devices.machine import describe, machine_record
from devices.profile_config import DeviceProfile, ProfileError, check_backend_available, load_profile
from runtime.backends import BackendError, create_backend
from runtime.bundle import Bundle, BundleError, load_bundle
from runtime.atomic import write_atomic, write_text_atomic
from runtime.cascade import Cascade, Result
from runtime.cli import ArgumentParser, integer
from runtime.data import DataError, load_images, read_image_list
from runtime.errors import one_line
from runtime.preprocess import ImageError, image_to_array
from runtime.timing import exit_cost_times, exit_plan, expected_ms, level_times, parse_exit_mix, time_calls
from runtime.wavelet import images_to_levels

REPO = Path(__file__).resolve().parents[1]
ALWAYS_FULL = 2.0  # a softmax margin is <= 1, so thresholds above it never exit early
STAT_KEYS = ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")
RATIO_BASIS = "mean model latency at batch 1 (preprocessing excluded); < 1 means faster than the reference"


class ProfilerError(ValueError):
    """A request the profiler refuses (precision mismatch, bad flag values); one-line message."""


def default_data() -> Path:
    """../shared/data/imagenet-sample (or $WAVECLIP_DATA/imagenet-sample) when present, else examples/images."""
    shared = Path(os.environ.get("WAVECLIP_DATA", REPO.parent / "shared" / "data")) / "imagenet-sample"
    return shared if shared.is_dir() else REPO / "examples" / "images"


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


# --- setup --------------------------------------------------------------------------------------------------------
def check_precision(bundle: Bundle, profile: DeviceProfile, allow: bool) -> bool:
    """True when the bundle's precision differs from the profile's (allowed); raises unless ``allow``."""
    have, want = bundle.manifest.get("precision"), profile.precision
    if have == want:
        return False
    if not allow:
        hint = {"int8": "quantize it with calibration.quantize", "fp16": "export it with --fp16",
                "fp32": "export it without --fp16/quantization"}.get(want, "")
        raise ProfilerError(f"{bundle.path}: bundle precision is {have}, profile {profile.name!r} expects {want} "
                            f"({hint}; or pass --allow-precision-mismatch to time it anyway)")
    return True


def make_backend(bundle: Bundle, profile: DeviceProfile, threads: int | None, batch: int, weights: str = "levels",
                 inference_precision: str | None = None):
    """The bundle's backend configured as the profile says."""
    if profile.backend == "onnxruntime":
        ep = profile.execution_provider
        providers = [ep] + (["CPUExecutionProvider"] if ep != "CPUExecutionProvider" else [])
        return create_backend(bundle, "onnxruntime", providers=providers, threads=threads, io_binding=True,
                              weights=weights)
    if profile.backend == "openvino":
        return create_backend(bundle, "openvino", device=profile.execution_provider, threads=threads,
                              inference_precision=inference_precision)
    trt = profile.tensorrt
    return create_backend(bundle, "tensorrt", precision=profile.precision, max_batch=max(batch, profile.max_batch),
                          opt_batch=trt.opt_batch if trt else 1, device_name=profile.name,
                          workspace_mib=trt.workspace_mib if trt else 1024)


def load_real_images(source: str | os.PathLike, count: int, spec: dict, notes: list[str]
                     ) -> tuple[list[Path], np.ndarray]:
    """Up to ``count`` readable images of a folder/CSV (a deterministic spread) as uint8 [N, S, S, 3]."""
    records = read_image_list(source, limit=count)
    arrays, kept, bad = load_images(records, spec)
    paths = [r.path for r in kept]
    if bad:
        notes.append(f"{bad} unreadable image(s) in {source} skipped")
    if not paths:
        raise DataError(f"{source}: none of the {len(records)} images could be read")
    if len(paths) < count:
        notes.append(f"{source} has {len(paths)} readable images (asked for {count})")
    return paths, arrays


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
                 inference_precision: str | None = None) -> dict:
    """ViT-B-16 (or a given single-input ONNX graph) at batch 1 and ``batch`` with the same backend, threads and
    precision as the bundle: an int8 bundle's baseline is ViT-B-16 quantized the same way (``auto`` only)."""
    choice = resolve_baseline(spec, log)
    precision = bundle.manifest.get("precision", "fp32") if bundle is not None else profile.precision
    if spec == "auto" and choice.path is not None and precision == "int8":
        target = bundle.manifest.get("quantization", {}).get("backend", profile.backend)
        try:
            path = quantized_baseline(choice.path, target, images[:16], log)
            choice = type(choice)(path, f"{choice.note}; quantized to int8 for {target} as calibration.quantize does "
                                        f"(16 calibration images), cached {path}")
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
                          inference_precision)
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


def profile_bundle(args: argparse.Namespace, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run every measurement and return the report (the JSON document)."""
    profile = load_profile(args.device)
    check_backend_available(profile)
    if not Path(args.bundle).is_dir():
        raise BundleError(f"{args.bundle}: no such bundle folder")
    bundle = load_bundle(args.bundle)
    mismatch = check_precision(bundle, profile, args.allow_precision_mismatch)
    if args.exit_mix is not None and len(args.exit_mix) != bundle.num_levels:
        raise ProfilerError(f"--exit-mix has {len(args.exit_mix)} values, the bundle has {bundle.num_levels} levels")
    notes: list[str] = []
    if mismatch:
        notes.append(f"precision mismatch allowed: bundle {bundle.manifest.get('precision')}, profile "
                     f"{profile.precision}")
    threads = profile.threads if args.threads is None else args.threads
    runs = args.runs or profile.iterations
    batch = args.batch or profile.max_batch
    machine = machine_record(threads or None, power_sample=not args.no_power_sample)
    usable = machine.get("cpu", {}).get("usable_cpus")
    if threads and usable and threads > usable:
        notes.append(f"{threads} threads on {usable} usable CPUs: oversubscribed, latencies are pessimistic "
                     "(pass --threads to match the machine)")
    spec = bundle.preprocessing
    data = args.data or default_data()
    paths, images = load_real_images(data, args.images, spec, notes)
    progress = Progress(False if args.quiet else None)

    backend = make_backend(bundle, profile, threads or None, batch, args.ort_weights, args.inference_precision)
    gated = Cascade(bundle, backend)
    full = Cascade(bundle, backend, thresholds=ALWAYS_FULL)

    log(f"profiling {bundle.manifest.get('name', bundle.path.name)} ({bundle.manifest.get('precision')}) on "
        f"{profile.name}: {profile.backend}/{profile.execution_provider}, threads {threads or 'all'}, "
        f"{runs} runs after {args.warmup} warm-up, {len(paths)} images, batch {batch}")
    first = images_to_levels(images[:1], spec)
    levels = level_latency(bundle, backend, first, runs, args.warmup, progress)
    costs = exit_costs(full, first, runs, args.warmup, progress)
    per_image = cascade_latency(gated, full, paths, spec, min(args.warmup, len(paths)), progress)
    hist = exit_histogram(per_image["exits"], bundle.num_levels)
    totals = [p + c for p, c in zip(per_image["preprocess"], per_image["cascade"])]
    cascade = {"batch": 1, "images": len(paths), "data": str(data), "thresholds": gated.thresholds,
               "preprocess": summarize(per_image["preprocess"]), "cascade": summarize(per_image["cascade"]),
               "total": summarize(totals)}
    always_full = {"batch": 1, "images": len(paths), "thresholds": full.thresholds,
                   "cascade": summarize(per_image["always_full"]),
                   "total": summarize([p + f for p, f in zip(per_image["preprocess"], per_image["always_full"])]),
                   "gflops": _r(bundle.manifest["levels"][-1].get("cumulative_gflops"), 5)}
    expected = expected_latency(hist, costs, cascade["cascade"]["mean_ms"], bundle)
    mixed = (exit_mix_latency(full, paths, spec, args.exit_mix, costs, images, batch, runs, args.warmup, progress)
             if args.exit_mix is not None else None)
    throughput = {"batch": batch,
                  "cascade": batch_throughput(gated, images, batch, spec, runs, args.warmup, f"cascade b{batch}",
                                              progress),
                  "always_full": batch_throughput(full, images, batch, spec, runs, args.warmup,
                                                  f"always-full b{batch}", progress)}
    vit = vit_baseline(args.baseline, profile, threads or None, images, batch, runs, args.warmup, progress, log,
                       bundle, args.inference_precision)
    if not vit["skipped"]:
        throughput["vit_b16"] = vit["batch_b"]

    load_end = _load_average()
    # the 1-min load average counts this run's own threads at the end: what is left is other work
    start = (machine.get("load_average") or [0.0])[0]
    other = max(start, (load_end or [0.0])[0] - (threads or usable or 0))
    if usable and other > 0.5 * usable:
        notes.append(f"the machine was busy (1-min load average {start:.1f} at the start, "
                     f"{(load_end or [0.0])[0]:.1f} at the end, on {usable} CPUs): absolute times are inflated by "
                     "other work; ratios suffer less, but the measurements are timed one block after another")
    def latency_ratios(stat: str) -> dict:
        vit_ms = vit.get("batch1", {}).get(stat)
        casc_ms, full_ms = cascade["cascade"][stat], always_full["cascade"][stat]
        return {"cascade_vs_vit_b16": _ratio(casc_ms, vit_ms), "always_full_vs_vit_b16": _ratio(full_ms, vit_ms),
                "cascade_vs_always_full": _ratio(casc_ms, full_ms),
                "level0_vs_vit_b16": _ratio(levels[0][stat], vit_ms)}

    vit_ips = vit.get("batch_b", {}).get("images_per_s")
    ratios = {"basis": RATIO_BASIS, **latency_ratios("mean_ms"),
              "p50": {"basis": "p50 model latency at batch 1 (robust to bursts of other work)",
                      **latency_ratios("p50_ms")},
              "throughput_basis": f"images/s at batch {batch}; > 1 means more images/s than the reference",
              "throughput_cascade_vs_vit_b16": _ratio(throughput["cascade"]["images_per_s"], vit_ips),
              "throughput_always_full_vs_vit_b16": _ratio(throughput["always_full"]["images_per_s"], vit_ips),
              "throughput_cascade_vs_always_full": _ratio(throughput["cascade"]["images_per_s"],
                                                          throughput["always_full"]["images_per_s"])}
    if mixed is not None:
        ratios["exit_mix_vs_vit_b16"] = _ratio(mixed["cascade"]["mean_ms"], vit.get("batch1", {}).get("mean_ms"))
        ratios["throughput_exit_mix_vs_vit_b16"] = _ratio(mixed["throughput"]["images_per_s"], vit_ips)
    return {
        "tool": "devices.profile",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m devices.profile " + " ".join(args.argv),
        "bundle": {"path": str(bundle.path), "name": bundle.manifest.get("name"),
                   "precision": bundle.manifest.get("precision"), "levels": bundle.num_levels,
                   "model": bundle.manifest.get("model"), "optimization": bundle.manifest.get("optimization")},
        "thresholds": gated.thresholds,
        "device": profile_dict(profile),
        "settings": {"backend": profile.backend, "execution_provider": profile.execution_provider,
                     "threads": threads, "runs": runs, "warmup": args.warmup, "batch": batch, "images": len(paths),
                     "data": str(data), "baseline": args.baseline, "precision_mismatch": mismatch,
                     "load_average_start": machine.get("load_average"), "load_average_end": load_end,
                     "level_input": f"{paths[0]} (batch 1, KV cache of the levels before each level computed once)"},
        "machine": machine,
        "levels": levels,
        "exit_costs": costs,
        "exit_mix": mixed,
        "cascade": cascade,
        "exit_histogram": hist,
        "expected_latency": expected,
        "throughput": throughput,
        "baselines": {"always_full": always_full, "vit_b16": vit},
        "ratios": ratios,
        "notes": notes,
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def profile_dict(p: DeviceProfile) -> dict:
    return {"name": p.name, "description": p.description, "backend": p.backend,
            "execution_provider": p.execution_provider, "precision": p.precision, "threads": p.threads,
            "batch_sizes": list(p.batch_sizes), "iterations": p.iterations,
            "tensorrt": None if p.tensorrt is None else vars(p.tensorrt).copy(),
            "jetson": None if p.jetson is None else vars(p.jetson).copy(),
            "path": str(p.path) if p.path else None}


# --- output -------------------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}x"


def format_markdown(r: dict) -> str:
    """The report as Markdown tables."""
    s, b, d = r["settings"], r["bundle"], r["device"]
    lines = [f"# {b['name']} ({b['precision']}) on {d['name']}", "",
             f"- backend: {s['backend']} / {s['execution_provider']}, threads: {s['threads'] or 'all'}, "
             f"runs: {s['runs']} after {s['warmup']} warm-up, batch B = {s['batch']}",
             f"- data: {s['data']} ({s['images']} images); thresholds: {', '.join(f'{t:g}' for t in r['thresholds'])}",
             f"- machine: {describe(r['machine'])}", "",
             "## Each level alone (batch 1, real image, real KV cache)", "",
             "| level | GFLOPs | min ms | p50 ms | p90 ms | p99 ms | max ms | mean ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in r["levels"]:
        lines.append(f"| {lv['level']} | {_g(lv['gflops'])} | " + " | ".join(_f(lv[k]) for k in STAT_KEYS) + " |")
    c, full, vit = r["cascade"], r["baselines"]["always_full"], r["baselines"]["vit_b16"]
    lines += ["", "## End to end (batch 1, per image)", "",
              "| what | GFLOPs | min ms | p50 ms | p90 ms | p99 ms | max ms | mean ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name: str, g: float | None, st: dict) -> str:
        return f"| {name} | {_g(g)} | " + " | ".join(_f(st.get(k)) for k in STAT_KEYS) + " |"
    e = r["expected_latency"]
    lines += [row("preprocess (decode, resize, wavelet)", None, c["preprocess"]),
              row("cascade (bundle thresholds)", e["expected_gflops"], c["cascade"]),
              row("preprocess + cascade", None, c["total"]),
              row("always-full WaveCLIP (all levels)", full["gflops"], full["cascade"])]
    if not vit["skipped"]:
        lines.append(row(f"{vit['name']} baseline", vit.get("gflops"), vit["batch1"]))
    m = r.get("exit_mix")
    if m:
        lines.append(row(f"cascade at exit mix {'/'.join(f'{100 * x:g}' for x in m['mix'])} (forced)", None,
                         m["cascade"]))
    lines += ["", f"Expected cascade latency from the exit rates: {_f(e['expected_ms'])} ms "
                  f"(sum of P(exit at k) x cost of exiting at k); measured mean: {_f(e['measured_mean_ms'])} ms."]
    if m:
        lines.append(f"At the forced exit mix: expected {_f(m['expected_ms'])} ms, measured mean "
                     f"{_f(m['cascade']['mean_ms'])} ms (expected / measured {_x(m['expected_vs_measured'])}); "
                     f"batch {m['throughput']['batch']}: {_f(m['throughput']['images_per_s'], 1)} images/s.")
    lines += ["", "## Cost of exiting at each level (batch 1, real cascade, exit forced)", "",
              "| exit at | p50 ms | mean ms |", "|---:|---:|---:|"]
    lines += [f"| {c['level']} | {_f(c['p50_ms'])} | {_f(c['mean_ms'])} |" for c in r.get("exit_costs", [])]
    lines += ["",
              "## Exits", "", "| level | images | fraction | reached |", "|---:|---:|---:|---:|"]
    lines += [f"| {h['level']} | {h['count']} | {h['fraction']:.3f} | {h['reach_fraction']:.3f} |"
              for h in r["exit_histogram"]]
    t = r["throughput"]
    lines += ["", f"## Throughput (batch {t['batch']})", "", "| what | p50 ms / batch | mean ms / batch | images/s |",
              "|---|---:|---:|---:|"]
    for key, name in (("cascade", "cascade"), ("always_full", "always-full WaveCLIP"),
                      ("vit_b16", f"{vit.get('name')} baseline")):
        if key in t:
            x = t[key]
            lines.append(f"| {name} | {_f(x['p50_ms'])} | {_f(x['mean_ms'])} | {_f(x['images_per_s'], 1)} |")
    q = r["ratios"]
    q, n = r["ratios"], vit.get("name")
    lines += ["", "## Ratios", "", f"Latency at batch 1, model time (preprocessing excluded); < 1 means faster than "
              f"the reference. Throughput at batch {t['batch']}; > 1 means more images/s.", "",
              "| ratio | on means | on p50s |", "|---|---:|---:|"]
    for key, name in (("cascade_vs_vit_b16", f"cascade / {n}"), ("always_full_vs_vit_b16", f"always-full / {n}"),
                      ("cascade_vs_always_full", "cascade / always-full"), ("level0_vs_vit_b16", f"level 0 / {n}")):
        lines.append(f"| {name} | {_x(q[key])} | {_x(q['p50'][key])} |")
    if "exit_mix_vs_vit_b16" in q:
        lines.append(f"| cascade at exit mix / {n} | {_x(q['exit_mix_vs_vit_b16'])} | |")
        lines.append(f"| throughput: exit mix / {n} | {_x(q['throughput_exit_mix_vs_vit_b16'])} | |")
    for key, name in (("throughput_cascade_vs_vit_b16", f"throughput: cascade / {n}"),
                      ("throughput_always_full_vs_vit_b16", f"throughput: always-full / {n}"),
                      ("throughput_cascade_vs_always_full", "throughput: cascade / always-full")):
        lines.append(f"| {name} | {_x(q[key])} | |")
    if vit.get("note"):
        lines += ["", f"Baseline: {vit['note']}."]
    if r["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def plot_png(r: dict, path: str | os.PathLike) -> None:
    """Latency per level vs cascade vs always-full vs ViT-B-16 (batch 1), and throughput at batch B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, p50, p90, colors = [], [], [], []
    for lv in r["levels"]:
        names.append(f"level {lv['level']} alone")
        p50.append(lv["p50_ms"])
        p90.append(lv["p90_ms"])
        colors.append("#9ecae1")
    c, full, vit = r["cascade"]["cascade"], r["baselines"]["always_full"]["cascade"], r["baselines"]["vit_b16"]
    for name, st, col in (("cascade", c, "#3182bd"), ("always-full", full, "#756bb1")):
        names.append(name)
        p50.append(st["p50_ms"])
        p90.append(st["p90_ms"])
        colors.append(col)
    if not vit["skipped"]:
        names.append(vit["name"])
        p50.append(vit["batch1"]["p50_ms"])
        p90.append(vit["batch1"]["p90_ms"])
        colors.append("#e6550d")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 2.2),
                                  gridspec_kw={"width_ratios": [2, 1]})
    y = np.arange(len(names))[::-1]
    err = np.array([np.zeros(len(p50)), np.maximum(np.array(p90) - np.array(p50), 0)])
    ax.barh(y, p50, xerr=err, color=colors, capsize=3)
    ax.set_yticks(y, names)
    for yi, v, w in zip(y, p50, p90):
        ax.text(max(v, w), yi, f"  {v:.1f}", va="center", fontsize=8)
    ax.axvline(r["expected_latency"]["expected_ms"], color="#3182bd", ls="--", lw=1, label="expected from exit rates")
    ax.set_xlabel("ms at batch 1 (bar: p50, whisker: p90)")
    ax.legend(loc="lower right", fontsize=8)
    t = r["throughput"]
    tn = [("cascade", "cascade", "#3182bd"), ("always_full", "always-full", "#756bb1"),
          ("vit_b16", vit.get("name") or "baseline", "#e6550d")]
    tn = [x for x in tn if x[0] in t]
    y2 = np.arange(len(tn))[::-1]
    vals = [t[k]["images_per_s"] for k, _, _ in tn]
    ax2.barh(y2, vals, color=[col for _, _, col in tn])
    ax2.set_yticks(y2, [n for _, n, _ in tn])
    for yi, v in zip(y2, vals):
        ax2.text(v, yi, f" {v:.1f}", va="center", fontsize=8)
    ax2.set_xlabel(f"images/s at batch {t['batch']}")
    s = r["settings"]
    fig.suptitle(f"{r['bundle']['name']} ({r['bundle']['precision']}) on {r['device']['name']}: {s['backend']}, "
                 f"{s['threads'] or 'all'} threads, {s['runs']} runs", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


# --- CLI ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m devices.profile",
        description="Time a WaveCLIP bundle on this machine with a device profile's backend, provider, threads and "
                    "precision: each level alone, the early-exit cascade end to end on real images, throughput at "
                    "batch B, and the baselines (always-full WaveCLIP, ViT-B-16) measured in the same run.",
        epilog="The JSON's levels[].p50_ms feeds `python -m calibration.gate BUNDLE --budget-ms X --device PROFILE "
               "--latency-json FILE`. Exit status 2 on bad input (unknown device, missing bundle or backend).")
    p.add_argument("bundle", help="bundle folder (manifest.json + level graphs)")
    p.add_argument("--device", required=True, metavar="NAME_OR_PATH",
                   help="device profile: a name from devices/profiles/ (see `python -m devices list`) or a .toml path")
    p.add_argument("--runs", type=integer(1), metavar="N",
                   help="timed runs per measurement, after the warm-up (default: the profile's iterations)")
    p.add_argument("--warmup", type=integer(0), default=10, metavar="N",
                   help="untimed runs before each measurement; for the per-image cascade, untimed images (default 10)")
    p.add_argument("--batch", type=integer(1), metavar="B",
                   help="batch size for the throughput measurements (default: the profile's largest batch size)")
    p.add_argument("--data", metavar="DIR_OR_CSV",
                   help="real images: a folder or a CSV with a path/file column (default ../shared/data/"
                        "imagenet-sample when present, else examples/images)")
    p.add_argument("--images", type=integer(1), default=100, metavar="N",
                   help="images for the end-to-end cascade (a deterministic spread of the data; default 100)")
    p.add_argument("--threads", type=integer(0), metavar="N",
                   help="intra-op threads, overriding the profile's (0 = all cores)")
    p.add_argument("--baseline", default="auto", metavar="auto|none|PATH.onnx",
                   help="ViT baseline: auto = open_clip ViT-B-16 image tower exported once with torch.onnx.export to "
                        "~/.cache/waveclip-edge/baselines/vit-b-16.onnx (needs torch + open_clip the first time; "
                        "skipped with a note without them); none = skip it; PATH = time that single-input ONNX graph "
                        "(default auto)")
    p.add_argument("--exit-mix", metavar="P0,P1,...",
                   help="also time the real cascade with the exits forced to this mix (percent or fractions, one per "
                        "level, e.g. 40,30,20,10): an operating point's latency without a trained gate")
    p.add_argument("--ort-weights", choices=("levels", "shared", "merged"), default="levels",
                   help="onnxruntime: how the level sessions hold the weights (runtime.backends.ort; default levels)")
    p.add_argument("--inference-precision", choices=("f32", "bf16"),
                   help="openvino: compute precision for the bundle and the ViT baseline alike (default: f32 for "
                        "an fp32 bundle)")
    p.add_argument("--allow-precision-mismatch", action="store_true",
                   help="time the bundle even when its precision differs from the profile's")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--markdown", metavar="OUT", help="also write the Markdown report to this file")
    p.add_argument("--png", metavar="OUT", help="write a chart (latency per level vs cascade vs always-full vs ViT)")
    p.add_argument("--no-power-sample", action="store_true",
                   help="on Jetson, skip the ~1 s tegrastats power sample in the machine record")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines on stderr")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.exit_mix is not None:
        try:
            n = len(args.exit_mix.split(","))
            args.exit_mix = parse_exit_mix(args.exit_mix, n)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    try:
        if args.baseline not in ("auto", "none") and not Path(args.baseline).expanduser().is_file():
            raise BaselineError(f"--baseline {args.baseline}: no such ONNX file (or use auto / none)")
        report = profile_bundle(args, log)
    except (ProfileError, BundleError, BackendError, DataError, ImageError, BaselineError, ProfilerError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    text = format_markdown(report)
    sys.stdout.write(text)
    if args.markdown:
        write_text_atomic(args.markdown, text)
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2, default=_json_default) + "\n")
    if args.png:
        plot_png(report, args.png)
    for kind, path in (("json", args.json), ("markdown", args.markdown), ("png", args.png)):
        if path:
            log(f"wrote {path}")
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
