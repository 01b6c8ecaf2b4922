"""``python -m runtime.classify BUNDLE IMAGE_OR_DIR...``: early-exit classification with a bundle, no torch."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from runtime.backends import BACKENDS, KV_PRECISIONS, BackendError
from runtime.backends.ort import WEIGHTS
from runtime.bundle import BundleError, load_bundle
from runtime.cascade import Cascade, Result
from runtime.cli import ArgumentParser, exit_with, integer, key_value, threshold
from runtime.data import ImageRecord, load_images
from runtime.errors import one_line
from runtime.preprocess import list_images
from runtime.stream import PooledCascade
from runtime.wavelet import images_to_levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m runtime.classify", description=__doc__.split(":", 1)[1].strip(),
                       epilog="Exit status: 0 classified, 1 no image could be read, 2 bad input (bundle, values).")
    p.add_argument("bundle", help="bundle folder written by `python -m export.onnx` (or calibration.quantize)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="inference backend (default onnxruntime)")
    p.add_argument("--threshold", type=threshold, nargs="+", metavar="T",
                   help="gate threshold (>= 0; above 1 never exits) on the softmax top-1 minus top-2 margin: one value "
                        "for every level or one per level before the last (default: the manifest's thresholds); "
                        "when none can exit, every level runs in one pass (the bundle's one-pass graph, where it has "
                        "one and the backend runs it)")
    p.add_argument("--max-level", type=integer(0), help="never run deeper than this level (it always exits)")
    p.add_argument("--top-k", type=integer(1), default=5, help="labels to report per image (default 5)")
    p.add_argument("--labels", help="comma-separated subset of class names or label ids to classify among")
    p.add_argument("--batch-size", type=integer(1), default=1, help="images per cascade batch (default 1)")
    p.add_argument("--pool", action="store_true",
                   help="with --batch-size > 1: images a level does not decide wait for later batches' images at the "
                        "same level, so every level runs full batches (more images/s on a folder; results print as "
                        "images are decided, --json keeps the input order)")
    p.add_argument("--threads", type=integer(0), help="intra-op threads for the backend (default or 0: the backend's "
                                                     "choice)")
    p.add_argument("--ov-property", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="an OpenVINO property for every compiled model (--backend openvino; repeatable), e.g. "
                        "CPU_RUNTIME_CACHE_CAPACITY=0: less memory, some latency")
    p.add_argument("--kv-precision", choices=KV_PRECISIONS, default="auto",
                   help="--backend openvino: the KV cache's type between levels (default auto: the models' inference "
                        "precision); bf16 halves the cache an int8 bundle's levels read and write, rounding its "
                        "values (faster batches; see docs/performance.md)")
    p.add_argument("--weights", choices=WEIGHTS, default="auto",
                   help="how onnxruntime/openvino hold the graphs: auto (default: the split graphs when the bundle has "
                        "them, one body for every level, the weights once in memory), split, or levels (one session "
                        "per level graph; an int8 bundle's level graphs and split body are quantized apart, so their "
                        "answers may differ a little)")
    p.add_argument("--json", action="store_true", help="print one JSON document with every result and the summary")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    return p.parse_args(argv)


def summarize(results: list[Result], cascade: Cascade, seconds: float) -> dict:
    levels = cascade.bundle.manifest["levels"]
    hist = Counter(r.exit_level for r in results)
    full = levels[cascade.max_level]["cumulative_gflops"]
    expected = cascade.expected_gflops(results)
    return {
        "images": len(results),
        "exit_histogram": {str(k): hist.get(k, 0) for k in range(cascade.max_level + 1)},
        "mean_latency_ms": float(np.mean([sum(r.level_ms) + r.preprocess_ms for r in results])) if results else 0.0,
        "expected_gflops": expected,
        "full_gflops": full,
        "compute_saved": 1.0 - expected / full if results else 0.0,
        "wall_s": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        bundle = load_bundle(args.bundle, verify=not args.no_verify)
        labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels is not None else None
        if labels == []:
            raise ValueError(f"--labels {args.labels!r}: no class names or label ids")
        thresholds = args.threshold[0] if args.threshold and len(args.threshold) == 1 else args.threshold
        options = {"threads": args.threads} if args.threads else {}
        if args.ov_property:
            if args.backend != "openvino":
                raise ValueError("--ov-property needs --backend openvino")
            options["properties"] = dict(args.ov_property)
        if args.kv_precision != "auto":
            if args.backend != "openvino":
                raise ValueError("--kv-precision needs --backend openvino")
            options["kv_precision"] = args.kv_precision
        if args.weights != "auto":
            if args.backend == "tensorrt":
                raise ValueError("--weights applies to --backend onnxruntime or openvino")
            options["weights"] = args.weights
        cascade = Cascade(bundle, args.backend, thresholds, args.max_level, labels, args.top_k, **options)
    except (BundleError, BackendError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    paths = list_images(args.images)
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    spec = bundle.preprocessing
    results: list[tuple[Path, Result]] = []
    failed = 0
    start = time.perf_counter()
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr,  # a bar only on a terminal (never torn into logs)
               disable=len(paths) < 2 or args.json or not sys.stderr.isatty())
    pool = PooledCascade(cascade, args.batch_size) if args.pool else None
    stream: list[tuple[Path, float]] = []  # (path, preprocess ms) by stream position, when pooled
    decided_keys: list[int] = []  # stream position of each result, when pooled

    def report(path: Path, res: Result) -> None:
        results.append((path, res))
        if not args.json:
            ms = " ".join(f"{m:.1f}" for m in res.level_ms)
            lines = [f"{path}: {res.class_name} ({res.score:.3f})  exit level {res.exit_level}  "
                     f"margin {res.margin:.3f}  ms/level [{ms}]"]
            lines += [f"    {name} ({score:.3f})" for name, score in res.top_k[1:]]
            with tqdm.external_write_mode(file=sys.stdout):  # above the bar, whole lines, flushed
                print("\n".join(lines), flush=True)

    def report_pooled(decided: list[tuple[int, Result]]) -> None:
        for key, res in decided:
            res.preprocess_ms = stream[key][1]
            report(stream[key][0], res)
            decided_keys.append(key)

    for i in range(0, len(paths), args.batch_size):
        t0 = time.perf_counter()
        batch = [ImageRecord(p) for p in paths[i:i + args.batch_size]]
        arrays, kept, skipped = load_images(batch, spec, on_skip=lambda r, why: tqdm.write(f"skipped: {why}",
                                                                                           file=sys.stderr))
        failed += skipped
        bar.update(len(batch))
        if not kept:
            continue
        levels = images_to_levels(arrays, spec)
        pre_ms = (time.perf_counter() - t0) * 1e3 / len(kept)
        if pool is not None:
            stream += [(r.path, pre_ms) for r in kept]
            report_pooled(pool.submit(levels))
            continue
        for record, res in zip(kept, cascade.classify_levels(levels)):
            res.preprocess_ms = pre_ms
            report(record.path, res)
    if pool is not None:
        report_pooled(pool.flush())
        results[:] = [r for _, r in sorted(zip(decided_keys, results), key=lambda pair: pair[0])]
    bar.close()
    summary = summarize([r for _, r in results], cascade, time.perf_counter() - start)
    summary["skipped"] = failed
    if args.json:
        print(json.dumps({"bundle": str(bundle.path), "backend": args.backend, "thresholds": cascade.thresholds,
                          "results": [{"image": str(p), **r.to_dict()} for p, r in results], "summary": summary},
                         indent=2))
    else:
        hist = " ".join(f"L{k}:{n}" for k, n in summary["exit_histogram"].items())
        print(f"{summary['images']} images ({failed} skipped)  exits {hist}  mean {summary['mean_latency_ms']:.2f} ms/img  "
              f"{summary['expected_gflops']:.3f} of {summary['full_gflops']:.3f} GFLOPs/img "
              f"({100 * summary['compute_saved']:.0f}% compute saved)")
    return 1 if failed and not results else 0


if __name__ == "__main__":
    exit_with(main)
