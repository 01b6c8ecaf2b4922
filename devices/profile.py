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
from pathlib import Path
from typing import Any, Callable

import numpy as np

from devices.baseline import BaselineError
from devices.machine import machine_record
from devices.match import auto_profile_name
from devices.memory import in_fresh_process
from devices.profile_config import DeviceProfile, ProfileError, check_backend_available, load_profile
from devices.profile_measure import (Progress, _r, _ratio, batch_throughput, cascade_latency, exit_costs,
                                     exit_histogram, exit_mix_latency, expected_latency, level_latency, summarize,
                                     vit_baseline)
from devices.profile_report import format_markdown, plot_png
from runtime.backends import BackendError, create_backend
from runtime.bundle import Bundle, BundleError, load_bundle
from runtime.atomic import write_text_atomic
from runtime.cascade import Cascade
from runtime.cli import ArgumentParser, integer, output_file
from runtime.data import DataError, load_images, read_image_list
from runtime.errors import one_line
from runtime.preprocess import ImageError
from runtime.timing import parse_exit_mix
from runtime.wavelet import images_to_levels

REPO = Path(__file__).resolve().parents[1]
ALWAYS_FULL = 2.0  # a softmax margin is <= 1, so thresholds above it never exit early
RATIO_BASIS = "mean model latency at batch 1 (preprocessing excluded); < 1 means faster than the reference"


class ProfilerError(ValueError):
    """A request the profiler refuses (precision mismatch, bad flag values); one-line message."""


def default_data() -> Path:
    """../shared/data/imagenet-sample (or $WAVECLIP_DATA/imagenet-sample) when present, else examples/images."""
    shared = Path(os.environ.get("WAVECLIP_DATA", REPO.parent / "shared" / "data")) / "imagenet-sample"
    return shared if shared.is_dir() else REPO / "examples" / "images"


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


def make_backend(bundle: Bundle, profile: DeviceProfile, threads: int | None, batch: int, weights: str = "auto",
                 inference_precision: str | None = None):
    """The bundle's backend configured as the profile says."""
    if profile.backend == "onnxruntime":
        ep = profile.execution_provider
        providers = [ep] + (["CPUExecutionProvider"] if ep != "CPUExecutionProvider" else [])
        return create_backend(bundle, "onnxruntime", providers=providers, threads=threads, io_binding=True,
                              weights=weights)
    if profile.backend == "openvino":
        return create_backend(bundle, "openvino", device=profile.execution_provider, threads=threads,
                              inference_precision=inference_precision, weights=weights)
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


def profile_bundle(args: argparse.Namespace, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run every measurement and return the report (the JSON document)."""
    profile = load_profile(args.device)
    if args.device == "auto":
        log(f"--device auto: {profile.name} ({auto_profile_name()[1]})")
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

    backend = make_backend(bundle, profile, threads or None, batch, args.weights, args.inference_precision)
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
                       bundle, args.inference_precision, getattr(gated.backend, "spinning", True))
    if not vit["skipped"]:
        throughput["vit_b16"] = vit["batch_b"]

    memory = None if args.no_memory else resident_memory(
        args, profile, threads or None, batch, paths[0], vit, bundle.manifest.get("precision", "fp32"),
        getattr(gated.backend, "spinning", True), log)
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
    if memory is not None:
        ratios["memory_basis"] = "resident memory (VmRSS) of a fresh process after its first image"
        ratios["memory_cascade_vs_vit_b16"] = _ratio(memory["cascade"]["rss_mib"],
                                                     (memory["vit_b16"] or {}).get("rss_mib"))
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
        "memory": memory,
        "ratios": ratios,
        "notes": notes,
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def resident_memory(args: argparse.Namespace, profile: DeviceProfile, threads: int | None, batch: int, image: str,
                    vit: dict, precision: str, spinning: bool, log: Callable[[str], None]) -> dict:
    """The gated cascade's and the ViT baseline's resident memory, each loaded in a fresh process as timed here."""
    log("resident memory: the cascade and the baseline, each in a fresh process ...")
    cascade = in_fresh_process({"what": "cascade", "bundle": str(args.bundle), "profile": str(profile.path),
                                "threads": threads, "batch": batch, "weights": args.weights,
                                "inference_precision": args.inference_precision, "image": str(image)})
    base = None
    if not vit["skipped"]:
        base = in_fresh_process({"what": "vit", "path": vit["path"], "backend": profile.backend,
                                 "provider": profile.execution_provider, "threads": threads,
                                 "precision": precision,
                                 "inference_precision": args.inference_precision, "spinning": spinning,
                                 "image": str(image)})
    return {"basis": "VmRSS / VmHWM of a fresh process that loaded the model and ran one image (host memory)",
            "cascade": cascade, "vit_b16": base}


def profile_dict(p: DeviceProfile) -> dict:
    return {"name": p.name, "description": p.description, "backend": p.backend,
            "execution_provider": p.execution_provider, "precision": p.precision, "threads": p.threads,
            "batch_sizes": list(p.batch_sizes), "iterations": p.iterations,
            "tensorrt": None if p.tensorrt is None else vars(p.tensorrt).copy(),
            "jetson": None if p.jetson is None else vars(p.jetson).copy(),
            "path": str(p.path) if p.path else None}


# --- output -------------------------------------------------------------------------------------------------------
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
                   help="device profile: a name from devices/profiles/ (see `python -m devices list`), a .toml path, "
                        "or auto (the shipped profile that fits this machine: board, CPU architecture and flags)")
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
    p.add_argument("--weights", "--ort-weights", dest="weights", choices=("auto", "levels", "split"),
                   default="auto", help="how the backend holds the weights (runtime.backends.ort / .openvino; auto: "
                                        "the split graphs when the bundle has them, else one graph per level)")
    p.add_argument("--inference-precision", choices=("f32", "bf16"),
                   help="openvino: compute precision for the bundle and the ViT baseline alike (default: f32 for "
                        "an fp32 bundle)")
    p.add_argument("--allow-precision-mismatch", action="store_true",
                   help="time the bundle even when its precision differs from the profile's")
    p.add_argument("--json", type=output_file, metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--markdown", type=output_file, metavar="OUT", help="also write the Markdown report to this file")
    p.add_argument("--png", type=output_file, metavar="OUT",
                   help="write a chart (latency per level vs cascade vs always-full vs ViT)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the resident-memory probes (each model loaded once more in a fresh process)")
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
    try:  # the report is on stdout already
        if args.markdown:
            write_text_atomic(args.markdown, text)
        if args.json:
            write_text_atomic(args.json, json.dumps(report, indent=2, default=_json_default) + "\n")
        if args.png:
            plot_png(report, args.png)
    except OSError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
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
