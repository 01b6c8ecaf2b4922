"""The cascade against the ViT it replaces, side by side in one run, at every backend and precision available.

    python bench/speed.py BUNDLE [BUNDLE_INT8 ...] [--mix 40,30,20,10] [--rounds 6] [--batch 8] [--threads 2]

For each bundle (fp32: ONNX Runtime fp32, OpenVINO f32 and, where the CPU has bf16, OpenVINO bf16; an int8 bundle:
its quantization backend, on OpenVINO also with a bf16 KV cache where the CPU has bf16) and the ViT-B-16 baseline
at the same backend and precision (int8: quantized the same way, devices.baseline.quantized_baseline), measured in
one run, interleaved round by round within each backend, batch 1 on real images, each timed call ten images in a
row for every item alike:

- ViT-B-16; WaveCLIP exiting at level 0, 1, 2 and always-full (the cost of an image that exits at k: the real
  cascade with the exits forced, head, softmax and KV rows included);
- always-full in one pass: every level from the bundle's one-pass graph (export/full.py), which the runtime runs
  when no image can exit early (the gate off), where the bundle and the backend have it;
- the cascade at the exit mix, each image forced to its exit (runtime.timing.exit_plan): measured mean against the
  mean the exit costs predict (runtime.timing.expected_ms, the model calibration.gate --budget-ms uses);
- throughput at ``--batch`` (images/s) of ViT-B-16 and of the cascade at the mix: batch by batch
  (``Cascade.classify_levels``) and pooled (``runtime.stream``: undecided rows wait for later batches' rows, so
  every level runs full batches; a stream of ``POOLED_BATCHES`` batches, the partial flush at its end included);
- resident memory (VmRSS) of a fresh process holding the loaded model, after its first image.

Ratios are against ViT-B-16 at the same backend and precision, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.memory import in_fresh_process, rss_mib  # noqa: E402
from runtime.bundle import Bundle, load_bundle  # noqa: E402
from runtime.atomic import write_text_atomic  # noqa: E402
from runtime.cli import ArgumentParser, integer, key_value, output_file  # noqa: E402
from runtime.timing import exit_plan, parse_exit_mix  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_report import format_table, summarize  # noqa: E402

PER_CALL = 10  # batch-1 images per timed call, for every item alike
POOLED_BATCHES = 20  # batches per timed pooled stream (its end, where partial batches run, is part of the time)
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Setup:
    """One backend + precision: how to build the cascade and its ViT baseline (also in a fresh process)."""

    label: str
    bundle: str
    backend: str
    options: dict
    vit: str  # ViT ONNX/IR path
    vit_precision: str
    vit_hint: str | None
    vit_spinning: bool = True  # ONNX Runtime: the ViT's workers spin within a run as the cascade's do
    times: dict[str, list[float]] = field(default_factory=dict)


def cpu_has_bf16() -> bool:
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no openvino or no CPU plugin
        return False


def setups(bundles: list[Bundle], images: np.ndarray, threads: int, ort_weights: list[str],
           log: Callable[[str], None], vit_spec: str = "auto", ov_weights: tuple[str, ...] = ("levels",),
           ov_properties: dict | None = None, ort_spinning: tuple[str, ...] = ("on",)) -> list[Setup]:
    """Every setup to time; with ``ov_properties`` each OpenVINO setup is timed once more with those properties;
    each ONNX Runtime setup once per ``ort_spinning`` value (on: workers spin within a run, the default; off)."""
    from devices.baseline import quantized_baseline, resolve_baseline

    vit = resolve_baseline(vit_spec, log).path
    if vit is None:
        raise SystemExit("error: the ViT-B-16 baseline is missing (needs torch + open_clip once to export it)")
    out = []
    for b in bundles:
        prec = b.manifest.get("precision", "fp32")
        if prec == "fp32":
            for w in ort_weights:
                if w != "split" or b.has_split:
                    out.append(Setup(f"onnxruntime fp32 ({w})", str(b.path), "onnxruntime", {"weights": w},
                                     str(vit), "fp32", None))
            for precision in ("f32", "bf16") if cpu_has_bf16() else ("f32",):
                for w in ov_weights:
                    if w != "split" or b.has_split:
                        out.append(Setup(f"openvino {precision} ({w})", str(b.path), "openvino",
                                         {"inference_precision": precision, "weights": w}, str(vit), "fp32",
                                         precision))
        else:
            q = b.manifest.get("quantization", {})
            target, method = q.get("backend", "onnxruntime"), q.get("method")
            qvit = str(quantized_baseline(vit, target, images[:16], log, method))
            name = f"{prec} {method}" if method == "weight-only" else prec
            for w in ort_weights if target == "onnxruntime" else ov_weights:
                if w != "split" or b.has_split:
                    out.append(Setup(f"{target} {name} ({w})", str(b.path), target, {"weights": w}, qvit, prec, None))
                    if target == "openvino" and cpu_has_bf16():  # the cache an int8 IR computes partly in f32
                        out.append(Setup(f"{target} {name} ({w}, bf16 KV)", str(b.path), target,
                                         {"weights": w, "kv_precision": "bf16"}, qvit, prec, None))
    out = [v for s in out for v in ([s] if s.backend != "onnxruntime" else
                                    [_with_spinning(s, spin, len(ort_spinning) > 1) for spin in ort_spinning])]
    if ov_properties:
        extra = ", ".join(f"{k}={v}" for k, v in ov_properties.items())
        out = [v for s in out for v in ([s] if s.backend != "openvino" else
                                        [s, Setup(f"{s.label[:-1]}, {extra})", s.bundle, s.backend,
                                                  {**s.options, "properties": ov_properties}, s.vit,
                                                  s.vit_precision, s.vit_hint)])]
    return out


def _with_spinning(s: Setup, spin: str, show: bool) -> Setup:
    """An ONNX Runtime setup, cascade and ViT, with worker spinning ``on`` (within a run) or ``off``."""
    label = f"{s.label[:-1]}, spinning {spin})" if show else s.label
    return Setup(label, s.bundle, s.backend, {**s.options, "spinning": spin == "on"}, s.vit, s.vit_precision,
                 s.vit_hint, spin == "on")


def build(s: Setup, threads: int):
    """(cascade, ViT timer) of a setup."""
    from devices.baseline import OnnxTimer
    from runtime.backends import create_backend
    from runtime.cascade import Cascade

    bundle = load_bundle(s.bundle, verify=False)
    opts = dict(s.options, threads=threads)
    if s.backend == "onnxruntime":
        opts["providers"] = ["CPUExecutionProvider"]
    cascade = Cascade(bundle, create_backend(bundle, s.backend, **opts), thresholds=2.0)
    timer = OnnxTimer(s.vit, s.backend, "CPUExecutionProvider" if s.backend == "onnxruntime" else "CPU", threads,
                      s.vit_precision, s.vit_hint, s.vit_spinning)
    return cascade, timer


def probe_memory(spec: dict) -> dict:
    """In this (fresh) process: load one model of a setup, run one real image, report resident memory."""
    s = Setup(**spec["setup"])
    images = np.load(spec["images"])
    from runtime.wavelet import images_to_levels

    if spec["what"] == "vit":
        from devices.baseline import OnnxTimer

        timer = OnnxTimer(s.vit, s.backend, "CPUExecutionProvider" if s.backend == "onnxruntime" else "CPU",
                          spec["threads"], s.vit_precision, s.vit_hint, s.vit_spinning)
        timer.run(timer.feed(1, images[:1]))
    else:
        from runtime.cascade import Cascade

        bundle = load_bundle(s.bundle, verify=False)
        # thresholds above 1: the image runs every level; "cascade": the levels one by one (the gated cascade's
        # sessions), "onepass": what the runtime holds with the gate off (the one-pass session, no level sessions)
        cascade = Cascade(bundle, s.backend, thresholds=2.0, one_pass=spec["what"] == "onepass",
                          **dict(s.options, threads=spec["threads"]))
        cascade.classify_levels(images_to_levels(images[:1], bundle.preprocessing))
    import gc

    gc.collect()
    return rss_mib()


def memory(s: Setup, what: str, images_file: str, threads: int) -> dict:
    spec = {"setup": {k: v for k, v in vars(s).items() if k not in ("times", "vit_row", "agreement")},
            "what": what, "images": images_file, "threads": threads}
    return in_fresh_process(spec, (__file__, "--probe-memory"))


def in_sequence(fn: Callable[[], Any], n: int = PER_CALL) -> Callable[[], int]:
    """``fn`` run ``n`` times in a row per call; returns the count (measure reports per-image ms)."""
    def run() -> int:
        for _ in range(n):
            fn()
        return n
    return run


def memory_probes(run: list[Setup], images: np.ndarray, threads: int, log: Callable[[str], None] = print
                  ) -> dict[str, dict]:
    """Every setup's resident memory (and its one pass's and ViT's, where it has them), each in a fresh process; the
    probes' images are saved once, in a temporary folder that goes however the probes end."""
    mem: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="speed-images-") as tmp:
        images_file = str(Path(tmp) / "images.npy")
        np.save(images_file, images)
        for s in run:
            log(f"memory: {s.label} ...")
            mem[s.label] = memory(s, "cascade", images_file, threads)
            if load_bundle(s.bundle, verify=False).has_full:
                mem[f"{s.label}|onepass"] = memory(s, "onepass", images_file, threads)
            if s.vit_row == s.label:
                mem[f"{s.label}|vit"] = memory(s, "vit", images_file, threads)
    return mem


def measure(items: dict[str, Callable[[], Any]], rounds: int, warmup: int, progress) -> dict[str, list[float]]:
    """Every item once per round, round after round (interleaved: background load hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in items}
    for r in progress(range(warmup + rounds)):
        for k, fn in items.items():
            t0 = time.perf_counter()
            n = fn()
            dt = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                if isinstance(n, int):  # a sequence of n images: per-image ms
                    times[k].append(dt / n)
                else:
                    times[k].append(dt)
    return times


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/speed.py", description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="*", metavar="BUNDLE", help="bundle folders: fp32 and/or int8")
    p.add_argument("--data",
                   help="real images (folder or CSV); default ../shared/data/imagenet-sample, else examples/images")
    p.add_argument("--images", type=integer(1), default=10, help="real images to cycle through (default 10)")
    p.add_argument("--mix", default="40,30,20,10", help="forced exit mix, one value per level (default 40,30,20,10)")
    p.add_argument("--rounds", type=integer(1), default=6, help="timed rounds at batch 1 (default 6)")
    p.add_argument("--batch", type=integer(1), default=8, help="batch for throughput (default 8)")
    p.add_argument("--batch-rounds", type=integer(1), default=2, help="timed rounds at --batch (default 2)")
    p.add_argument("--threads", type=integer(1), default=2, help="intra-op threads (default 2)")
    p.add_argument("--ort-weights", default="levels,split",
                   help="ONNX Runtime weights modes to time, of levels, split (runtime.backends.ort; default "
                        "levels,split; split needs the bundle's split graphs)")
    p.add_argument("--ort-spinning", default="on",
                   help="ONNX Runtime worker spinning to time, cascade and ViT alike, of on (within a run, never "
                        "between runs: the backend's default), off (default on)")
    p.add_argument("--ov-weights", default="levels,split",
                   help="OpenVINO weights modes to time, of levels, split, or none (default levels,split)")
    p.add_argument("--ov-property", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="time every OpenVINO row once more with this property (repeatable), e.g. "
                        "CPU_RUNTIME_CACHE_CAPACITY=0")
    p.add_argument("--vit", default="auto", metavar="auto|PATH.onnx",
                   help="the baseline: auto = open_clip ViT-B-16 exported once (devices.baseline), or an ONNX file")
    p.add_argument("--no-memory", action="store_true", help="skip the resident-memory probes")
    p.add_argument("--memory-json", type=output_file, metavar="PATH",
                   help="reuse the memory probes stored here (or store them here when the file does not exist)")
    p.add_argument("--prepare", action="store_true",
                   help="only make the baselines and memory probes (--memory-json), e.g. before a quiet timed run")
    p.add_argument("--json", type=output_file, help="write every number here")
    p.add_argument("--probe-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_memory:
        print(json.dumps(probe_memory(json.loads(args.probe_memory))))
        return 0
    if not args.bundles:
        p.error("give at least one bundle")
    spinning = tuple(args.ort_spinning.split(","))
    if not set(spinning) <= {"on", "off"}:
        p.error(f"--ort-spinning {args.ort_spinning!r}: a comma list of on, off")
    for flag, value, known in (("--ort-weights", args.ort_weights, {"levels", "split"}),
                               ("--ov-weights", args.ov_weights, {"levels", "split", "none"})):
        if not set(value.split(",")) <= known:
            p.error(f"{flag} {value!r}: a comma list of {', '.join(sorted(known))}")
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    try:
        from tqdm import tqdm

        progress = lambda it: tqdm(it, file=sys.stderr, leave=False, desc="rounds")  # noqa: E731
    except ImportError:
        progress = lambda it: it  # noqa: E731
    try:
        bundles = [load_bundle(b) for b in args.bundles]
        mix = parse_exit_mix(args.mix, bundles[0].num_levels)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from runtime.data import load_images, read_image_list
    from runtime.stream import PooledCascade
    from runtime.wavelet import images_to_levels

    default = REPO.parent / "shared" / "data" / "imagenet-sample"  # a --data given must exist (read_image_list)
    data = args.data or str(default if default.exists() else REPO / "examples" / "images")
    spec = bundles[0].preprocessing
    images, _, _ = load_images(read_image_list(data, limit=args.images), spec)
    L = bundles[0].num_levels
    plan = exit_plan(mix, PER_CALL * args.rounds)  # over all rounds the counts follow the mix
    batch_plan = exit_plan(mix, args.batch * 5)
    pooled_plan = exit_plan(mix, args.batch * POOLED_BATCHES)
    run = setups(bundles, images, args.threads, args.ort_weights.split(","), log, args.vit,
                 tuple(w for w in args.ov_weights.split(",") if w != "none"), dict(args.ov_property), spinning)

    items: dict[str, Callable[[], Any]] = {}
    batch_items: dict[str, Callable[[], Any]] = {}
    vits: dict[tuple, str] = {}
    states: list[dict] = []
    reference = None
    per_image = [images_to_levels(images[i:i + 1], spec) for i in range(len(images))]
    reps = -(-args.batch // len(images))
    big = np.concatenate([images] * reps)[:args.batch]
    batch_levels = images_to_levels(big, spec)
    for s in run:
        log(f"loading {s.label} ...")
        cascade, timer = build(s, args.threads)
        key = (s.backend, s.vit, s.vit_precision, s.vit_hint, s.vit_spinning)
        if key not in vits:  # one ViT row per backend, precision and spinning
            vits[key] = s.label
            x1, xb = timer.feed(1, images), timer.feed(args.batch, images)
            items[f"{s.label}|vit"] = lambda t=timer, x=x1: t.run(x)
            batch_items[f"{s.label}|vit"] = lambda t=timer, x=xb: t.run(x)
        s.vit_row = vits[key]
        # agreement with the first (fp32) setup: top-1 of the head at every level, on the real images
        top1 = [cascade.probabilities(e).argmax(1) for e in cascade.run_all_levels(images_to_levels(images, spec))]
        reference = reference if reference is not None else top1
        s.agreement = round(float(min(np.mean(a == b) for a, b in zip(top1, reference))), 3)
        for k in range(L):
            items[f"{s.label}|exit{k}"] = (lambda c=cascade, k=k: c.classify_levels(per_image[k % len(per_image)],
                                                                                    exit_levels=[k]))

        if cascade.one_pass:  # every level in one block-causal pass (export/full.py), on exit{L-1}'s image
            items[f"{s.label}|onepass"] = lambda c=cascade: c.classify_full(per_image[(L - 1) % len(per_image)])
        state = {"at": 0}
        states.append(state)

        def mixed(c=cascade, state=state) -> int:  # PER_CALL images per round, walking through the whole plan
            for _ in range(PER_CALL):
                j = state["at"] % len(plan)
                c.classify_levels(per_image[j % len(per_image)], exit_levels=[plan[j]])
                state["at"] += 1
            return PER_CALL

        items[f"{s.label}|mix"] = mixed

        def mixed_batch(c=cascade) -> int:
            for i in range(0, len(batch_plan), args.batch):
                c.classify_levels(batch_levels, exit_levels=batch_plan[i:i + args.batch])
            return len(batch_plan) // args.batch

        batch_items[f"{s.label}|mix"] = mixed_batch

        def pooled(c=cascade) -> int:
            pool = PooledCascade(c, args.batch)
            for i in range(0, len(pooled_plan), args.batch):
                pool.submit(batch_levels, exit_levels=pooled_plan[i:i + args.batch])
            pool.flush()
            return len(pooled_plan) // args.batch

        batch_items[f"{s.label}|pooled"] = pooled
    # every batch-1 item runs PER_CALL images back to back per timed call, as the mix does: a single run after another
    # item's pays a cold start (caches, waking threads) that a sequence of images spreads out
    items = {k: fn if k.endswith("|mix") else in_sequence(fn) for k, fn in items.items()}
    mem: dict[str, dict] = {}
    cached = Path(args.memory_json) if args.memory_json else None
    if cached is not None and cached.is_file():
        mem = json.loads(cached.read_text())
        log(f"memory: read from {cached}")
    elif not args.no_memory:  # resident memory is not a timing: measured in fresh processes before the timed rounds
        mem = memory_probes(run, images, args.threads, log)
        if cached is not None:
            cached.write_text(json.dumps(mem, indent=2) + "\n")
    if args.prepare:
        log("prepared (baselines quantized, memory probed); no timing")
        return 0
    log(f"timing: {args.rounds} rounds at batch 1, {args.batch_rounds} at batch {args.batch}, interleaved within "
        "each backend (one backend's idle worker threads must not spin against another's)")
    t1, tb = {}, {}
    for backend in dict.fromkeys(s.backend for s in run):
        labels = {s.label for s in run if s.backend == backend}
        group = {k: fn for k, fn in items.items() if k.split("|")[0] in labels}
        for fn in group.values():  # warm-up, then the plans start over
            fn()
        for state in states:
            state["at"] = 0
        t1.update(measure(group, args.rounds, 0, progress))
        tb.update(measure({k: fn for k, fn in batch_items.items() if k.split("|")[0] in labels},
                          args.batch_rounds, 1, progress))
    report = summarize(run, t1, tb, mem, mix, args, L, PER_CALL)
    print(format_table(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
