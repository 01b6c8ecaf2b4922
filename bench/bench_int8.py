"""fp32 vs int8 per level, in one run on this machine: latency (batch 1, median over interleaved runs after warm-up,
same threads for every backend) for ONNX Runtime and OpenVINO, their fp32/int8 ratios, and top-1 agreement per level.

    python bench/bench_int8.py FP32_BUNDLE INT8_BUNDLE [INT8_BUNDLE ...] --data DIR_OR_CSV [--split val]

OpenVINO fp32 is the fp32 ONNX bundle compiled by OpenVINO; an int8 ONNX bundle (QDQ, or ``--method weight-only``)
runs on ONNX Runtime, an OpenVINO IR one (``python -m calibration.quantize --backend openvino``) on OpenVINO. Each
level runs on a real image with the real KV cache of the same backend's earlier levels.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.compare import compare  # noqa: E402
from runtime.backends import create_backend  # noqa: E402
from devices.machine import cpu_record  # noqa: E402
from runtime.bundle import Bundle, BundleError, load_bundle  # noqa: E402
from runtime.atomic import write_text_atomic  # noqa: E402
from runtime.cli import ArgumentParser, integer, output_file  # noqa: E402
from runtime.data import DataError, load_images, read_image_list  # noqa: E402
from runtime.wavelet import images_to_levels  # noqa: E402

MIN_RUNS = 50



def level_latency(configs: dict[str, tuple[Bundle, str]], patches: list[np.ndarray], threads: int, runs: int,
                  warmup: int) -> dict[str, list[dict]]:
    """Per config, per level: median/p90 ms of run_level at batch 1 (configs interleaved run by run)."""
    backends = {name: create_backend(b, kind, threads=threads) for name, (b, kind) in configs.items()}
    past = {name: None for name in backends}
    out: dict[str, list[dict]] = {name: [] for name in backends}
    for k in range(len(patches)):
        times: dict[str, list[float]] = {name: [] for name in backends}
        for name, be in backends.items():
            for _ in range(warmup):
                be.run_level(k, patches[k], past[name])
        for _ in range(runs):
            for name, be in backends.items():
                t0 = time.perf_counter()
                be.run_level(k, patches[k], past[name])
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name, be in backends.items():
            past[name] = be.run_level(k, patches[k], past[name])[1]
            t = np.array(times[name])
            out[name].append({"level": k, "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90))})
    return out


def markdown(result: dict) -> str:
    """Rows: configs; columns: median ms per level (int8: its speedup over fp32 on the same backend), agreement."""
    lat, agree = result["latency"], result["agreement"]
    levels = len(lat["onnxruntime fp32"])
    cols = ["config"] + [f"level {k} ms" for k in range(levels)] + ["top-1 agreement with ORT fp32, per level"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, per_level in lat.items():
        ref = lat[f"{name.split()[0]} fp32"]
        cells = [f"{v['median_ms']:.3f}" + ("" if name in ("onnxruntime fp32", "openvino fp32") else
                                            f" ({r['median_ms'] / v['median_ms']:.2f}x)")
                 for v, r in zip(per_level, ref)]
        rows.append(f"| {name} | " + " | ".join(cells) + " | " +
                    (" / ".join(f"{a:.1%}" for a in agree[name]) if name in agree else "") + " |")
    m = result["setup"]
    rows.append(f"\nbatch 1, median of {m['runs']} interleaved runs after {m['warmup']} warm-up, {m['threads']} "
                f"thread(s), {m['cpu']}; agreement vs ORT fp32 on {m['agreement_images']} images of {m['data']}; "
                f"onnxruntime {m['versions']['onnxruntime']}, openvino {m['versions']['openvino']}")
    return "\n".join(rows)


def int8_label(bundle: Bundle) -> tuple[str, str]:
    """(config name, backend) of an int8 bundle: its backend, scheme and folder name."""
    q = bundle.manifest.get("quantization", {})
    backend = "openvino" if bundle.manifest.get("graph_format") == "openvino" else "onnxruntime"
    scheme = "weight-only" if q.get("method") == "weight-only" else "NNCF" if backend == "openvino" else "QDQ"
    return f"{backend} int8 {scheme} ({bundle.path.name})", backend


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/bench_int8.py", description=__doc__.split("\n\n")[0])
    p.add_argument("fp32", help="fp32 ONNX bundle")
    p.add_argument("int8", nargs="+", help="int8 bundles from calibration.quantize: ONNX ones run on ONNX Runtime "
                                           "(QDQ or --method weight-only), OpenVINO IR ones on OpenVINO")
    p.add_argument("--data", required=True, help="images (folder or CSV) for the agreement check and the timed image")
    p.add_argument("--split", help="CSV split (use one not used for calibration, e.g. val)")
    p.add_argument("--images", type=integer(1), default=128, help="images for the top-1 agreement (default 128)")
    p.add_argument("--runs", type=integer(MIN_RUNS), default=100,
                   help=f"timed runs per level and config (>= {MIN_RUNS})")
    p.add_argument("--warmup", type=integer(0), default=10, help="untimed runs first (default 10)")
    p.add_argument("--threads", type=integer(1), default=1, help="intra-op threads for every backend (default 1)")
    p.add_argument("--json", type=output_file, help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    import onnxruntime
    import openvino

    try:
        fp32, quantized = load_bundle(args.fp32), [load_bundle(b) for b in args.int8]
        records = read_image_list(args.data, args.split, limit=args.images)
    except (BundleError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bad := [str(b.path) for b in quantized if b.manifest.get("precision") != "int8"]:
        print(f"error: not int8 bundles: {', '.join(bad)}", file=sys.stderr)
        return 2
    images, kept, _ = load_images(records, fp32.preprocessing)
    patches = images_to_levels(images, fp32.preprocessing)
    configs = {"onnxruntime fp32": (fp32, "onnxruntime"), "openvino fp32": (fp32, "openvino")}
    for b in quantized:
        name, backend = int8_label(b)
        configs[name] = (b, backend)
    if len(configs) != 2 + len(quantized):
        print("error: two int8 bundles share a scheme and a folder name; rename one", file=sys.stderr)
        return 2
    latency = level_latency(configs, [p[:1] for p in patches], args.threads, args.runs, args.warmup)
    agreement = {name: [e["top1_agreement"] for e in compare(fp32, b, patches, backend, progress=False)["levels"]]
                 for name, (b, backend) in configs.items() if b is not fp32}
    result = {"setup": {"cpu": cpu_record()["model"], "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
                        "batch": 1, "data": f"{args.data}" + (f" ({args.split})" if args.split else ""),
                        "agreement_images": len(kept), "bundles": {n: str(b.path) for n, (b, _) in configs.items()},
                        "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}},
              "latency": latency, "agreement": agreement}
    print(markdown(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
