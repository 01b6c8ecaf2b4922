"""What the KV cache buys: each level graph (cache in) against one graph recomputing levels 0..k without a cache.

    python bench/bench_kv_cache.py BUNDLE_OR_CKPT [--threads 1] [--runs 50] [--warmup 10] [--json out.json]

ONNX Runtime, CPU EP, batch 1, a real image when one is found. A checkpoint is exported (and validated) to a temporary
bundle first. Given a bundle, the no-cache baselines are exported from a randomly initialised model of the manifest's
config: latency of these dense graphs does not depend on the weights' values.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from runtime.fp16 import to_fp16  # noqa: E402
from export.graphs import export_full_graph  # noqa: E402
from export.onnx import export_bundle  # noqa: E402
from export.validate import find_images  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.config import WaveCLIPConfig  # noqa: E402
from model.waveclip import WaveCLIP  # noqa: E402
from devices.machine import cpu_record  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402
from runtime.atomic import write_text_atomic  # noqa: E402
from runtime.cli import ArgumentParser, integer, output_file  # noqa: E402
from runtime.preprocess import preprocess  # noqa: E402


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def median_ms(jobs: list[tuple[ort.InferenceSession, dict]], runs: int, warmup: int) -> list[float]:
    """Median latency per (session, feeds); rounds interleave the jobs so background load hits all alike."""
    for _ in range(warmup):
        for sess, feeds in jobs:
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in jobs]
    for _ in range(runs):
        for (sess, feeds), t in zip(jobs, times):
            start = time.perf_counter()
            sess.run(None, feeds)
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]



def bench(bundle_dir: Path, model: WaveCLIP, threads: int, runs: int, warmup: int) -> dict:
    b = load_bundle(bundle_dir)
    cfg, m = model.config, b.manifest
    images, source = find_images()
    patches = [p[:1] for p in preprocess(images[:1], b.preprocessing)]
    levels, full, cache = [], [], []
    with tempfile.TemporaryDirectory(prefix="waveclip-bench-") as tmp:
        for lv in m["levels"]:
            k = lv["level"]
            sess = session(bundle_dir / lv["file"], threads)
            feeds = {"patches": patches[k], **{i["name"]: c for i, c in zip(lv["inputs"][1:], cache)}}
            cache = sess.run([o["name"] for o in lv["outputs"]], feeds)[1:]
            levels.append((sess, feeds))
            path = Path(tmp) / f"full{k}.onnx"
            export_full_graph(model, k + 1, path)
            if m["precision"] == "fp16":
                import onnx
                onnx.save(to_fp16(onnx.load(str(path))), str(path))
            full.append((session(path, threads), {f"patches.{j}": patches[j] for j in range(k + 1)}))
        times = median_ms(levels + full, runs, warmup)
    n = len(levels)
    rows = []
    for k in range(n):
        level_ms, full_ms = times[k], times[n + k]
        cascade_ms, no_cache_ms = sum(times[: k + 1]), sum(times[n: n + k + 1])
        rows.append({"level": k, "tokens": cfg.past_length(k) + cfg.level_tokens(k), "gflops": cfg.level_gflops(k),
                     "cumulative_gflops": cfg.cumulative_gflops(k),
                     "level_ms": level_ms, "recompute_ms": full_ms, "level_over_recompute": level_ms / full_ms,
                     "cascade_ms": cascade_ms, "no_cache_cascade_ms": no_cache_ms,
                     "cascade_over_no_cache": cascade_ms / no_cache_ms})
    return {"model": cfg.name, "precision": m["precision"], "threads": threads, "batch": 1, "runs": runs,
            "warmup": warmup, "onnxruntime": ort.__version__, "cpu": cpu_record()["model"], "image": source, "rows": rows}


def table(result: dict) -> str:
    out = [f"{result['model']} ({result['precision']}), onnxruntime {result['onnxruntime']} CPU EP, "
           f"{result['threads']} intra-op thread(s), batch {result['batch']}, median of {result['runs']} runs after "
           f"{result['warmup']} warm-up, on {result['cpu']}", "",
           "| level | tokens seen | level k, cache in (ms) | no-cache recompute 0..k (ms) | ratio "
           "| cascade exiting at k, with cache (ms) | same cascade without cache (ms) | ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['level']} | {r['tokens']} | {r['level_ms']:.2f} | {r['recompute_ms']:.2f} | "
                   f"{r['level_over_recompute']:.2f} | {r['cascade_ms']:.2f} | {r['no_cache_cascade_ms']:.2f} | "
                   f"{r['cascade_over_no_cache']:.2f} |")
    out += ["", "cascade exiting at k = levels 0..k run in turn (early exit declined at each); without a cache level j "
            "must recompute levels 0..j, so it costs the sum of the recompute column up to k."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/bench_kv_cache.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="bundle folder or checkpoint (ckpt.pt)")
    p.add_argument("--threads", type=integer(1), default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--runs", type=integer(1), default=50, help="timed runs per graph (default 50)")
    p.add_argument("--warmup", type=integer(0), default=10, help="untimed warm-up runs per graph (default 10)")
    p.add_argument("--json", type=output_file, help="also write the numbers here")
    args = p.parse_args(argv)
    src = Path(args.source)
    with tempfile.TemporaryDirectory(prefix="waveclip-bench-bundle-") as tmp:
        if src.is_dir():
            model = WaveCLIP(WaveCLIPConfig.from_dict(load_bundle(src, verify=False).manifest["model"])).eval()
            bundle_dir = src
        else:
            model, _ = load_checkpoint(src)
            bundle_dir = Path(tmp) / "bundle"
            export_bundle(src, bundle_dir, progress=False)
        torch.set_num_threads(1)
        result = bench(bundle_dir, model, args.threads, args.runs, args.warmup)
    print(table(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
