"""The roofline that bounds the cascade against ViT-B-16 on this machine (ONNX Runtime CPU, batch 1).

    python bench/roofline.py BUNDLE [BUNDLE_INT8 ...] [--threads 2] [--rounds 10]

Measures, in one run, at each bundle's precision:
- the machine's peak MatMul rate (best of many runs): the transformer MLP pair ([M, W] x [W, 4W] x [4W, W],
  weights in cache) at a level's M x W and at the ViT's 197 x 768, run alternately, fp32 or quantized the way
  calibration.quantize quantizes the bundle;
- its peak weight-streaming bandwidth: a GEMV whose weights (256 MiB fp32, 64 MiB int8) exceed the last-level
  cache;
- each graph's FLOPs (analytic, model.config) and bytes (its weight initializers as stored, plus the KV cache read
  and written), so each graph's floor = max(FLOPs / rate, bytes / bandwidth);
- each level (in an always-full pass, real KV, the runtime's default graphs) and the ViT, timed interleaved round by
  round (the median).

The floors say what the hardware allows: always-full / ViT cannot fall below (sum of the level floors) / (the ViT
floor) at equal efficiency, whatever the kernels do.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import vit_gflops  # noqa: E402  (pure python: no torch)
from runtime.bundle import Bundle, load_bundle  # noqa: E402
from runtime.atomic import write_text_atomic  # noqa: E402
from runtime.cli import ArgumentParser, integer, output_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VIT_TOKENS, VIT_WIDTH = 197, 768
GEMV_FP32 = (8192, 8192)  # 256 MiB of fp32 weights: far beyond any last-level cache of this class of CPU
GEMV_INT8 = (8192, 8192)  # 64 MiB at int8


def session(path: str | Path, threads: int) -> ort.InferenceSession:
    """A CPU session configured as the runtime's (the baseline timer's settings)."""
    from devices.baseline import OnnxTimer

    return OnnxTimer(path, "onnxruntime", "CPUExecutionProvider", threads).session


def matmul_chain(dims: list[int], path: Path, seed: int = 0) -> Path:
    """x [M, dims[0]] through MatMuls of weights [dims[i], dims[i+1]] (random, N(0, 1/sqrt(fan-in)))."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"], name=f"matmul{i}"))
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", dims[0]])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["m", dims[-1]])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def quantized(src: Path, rows: int, scratch: Path) -> Path:
    """``src`` quantized as calibration.quantize does for onnxruntime (QDQ, per-channel int8 weights, uint8
    activations, MatMul outputs float), calibrated on random rows."""
    from dataclasses import replace

    from calibration.backends import DEFAULT_OPS, SCHEMES, quantize_onnx

    width = onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    items = iter([{"x": np.random.default_rng(i).standard_normal((rows, width)).astype(np.float32)}
                  for i in range(4)])

    class Reader:
        def get_next(self):
            return next(items, None)

    # first and last kept float by the bundle scheme are a model's embedding and projection: not in a probe
    scheme = replace(SCHEMES["onnxruntime"], float_first_last=False)
    proto = quantize_onnx(src, Reader(), scratch / f"{src.stem}.q.onnx", scheme, "minmax", list(DEFAULT_OPS),
                          scratch, skip_symbolic_shape=True)
    out = scratch / f"{src.stem}.int8.onnx"
    onnx.save(proto, str(out))
    return out


def timed(fn, runs: int, warmup: int = 3) -> np.ndarray:
    """ms of ``runs`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times)


def matmul_rates(shapes: list[tuple[int, int]], int8: bool, threads: int, runs: int, scratch: Path) -> list[float]:
    """Peak GFLOP/s (best of ``runs``) of the MLP pair [rows, width] x [width, 4 width] x [4 width, width] at each
    (rows, width), the shapes run alternately so that a drift of the machine's speed hits them alike."""
    calls, flops = [], []
    for rows, width in shapes:
        path = matmul_chain([width, 4 * width, width], scratch / f"mlp{width}.onnx")
        if int8:
            path = quantized(path, rows, scratch)
        s, x = session(path, threads), np.random.default_rng(2).standard_normal((rows, width)).astype(np.float32)
        calls.append(lambda s=s, x=x: s.run(None, {"x": x}))
        flops.append(2 * rows * width * 4 * width * 2)
    best = [np.inf] * len(shapes)
    for r in range(runs + 3):
        for i, call in enumerate(calls):
            ms = timed(call, 1, warmup=0)[0]
            if r >= 3:
                best[i] = min(best[i], ms)
    return [f / ms / 1e6 for f, ms in zip(flops, best)]


def stream_rate(int8: bool, threads: int, runs: int, scratch: Path) -> float:
    """Peak weight-streaming GB/s (best of ``runs``) of a GEMV whose weights exceed the last-level cache."""
    path = matmul_chain(list(GEMV_INT8 if int8 else GEMV_FP32), scratch / "gemv.onnx", seed=1)
    if int8:
        path = quantized(path, 1, scratch)
    s, x = session(path, threads), np.ones((1, GEMV_FP32[0]), np.float32)
    return weight_bytes(path) / timed(lambda: s.run(None, {"x": x}), runs).min() / 1e6


def weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers as stored (int8 weights count 1 byte; scales and float weights 4)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    total = 0
    for t in graph.initializer:
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        total += length if length is not None else len(t.raw_data) or numpy_helper.to_array(t).nbytes
    return total


def kv_bytes(bundle: Bundle, level: int) -> int:
    """KV cache bytes a level reads (past) and writes (present = past + its own tokens), fp32."""
    kv = bundle.manifest["kv_cache"]
    past, tokens = bundle.manifest["levels"][level]["past_length"], bundle.manifest["levels"][level]["tokens"]
    per_token = 2 * kv["num_layers"] * kv["num_heads"] * kv["head_dim"] * 4
    return per_token * (past + past + tokens)


def level_times(bundle: Bundle, patches: list[np.ndarray], vit: ort.InferenceSession, vit_x: np.ndarray,
                threads: int, rounds: int) -> tuple[list[float], float]:
    """Median ms of each level (an always-full pass, real KV, the runtime's default graphs: the split body where the
    bundle has it) and of the ViT, interleaved round by round."""
    from runtime.backends.ort import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(bundle, providers=["CPUExecutionProvider"], threads=threads)
    name = vit.get_inputs()[0].name
    levels: list[list[float]] = [[] for _ in range(bundle.num_levels)]
    vit_ms: list[float] = []
    for r in range(rounds + 2):
        past = None
        for k in range(bundle.num_levels):
            t0 = time.perf_counter()
            _, past = backend.run_level(k, patches[k], past)
            if r >= 2:
                levels[k].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        vit.run(None, {name: vit_x})
        if r >= 2:
            vit_ms.append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(t)) for t in levels], float(np.median(vit_ms))


def roofline(bundle: Bundle, vit_path: Path, images: np.ndarray, threads: int, rounds: int) -> dict:
    """Every number of one bundle's table (see the module docstring)."""
    from devices.baseline import vit_input
    from runtime.wavelet import images_to_levels

    int8 = bundle.manifest["precision"] == "int8"
    cfg = bundle.manifest["model"]
    tokens = bundle.manifest["levels"][0]["tokens"]  # the MatMul shape of a level (level 0's, for uneven grids)
    with tempfile.TemporaryDirectory(prefix="roofline-") as tmp:
        scratch = Path(tmp)
        level, vit = matmul_rates([(tokens, cfg["width"]), (VIT_TOKENS, VIT_WIDTH)], int8, threads, 20 * rounds,
                                  scratch)
        rates = {"level_matmul_gflops": level, "vit_matmul_gflops": vit,
                 "stream_gb_s": stream_rate(int8, threads, 3 * rounds, scratch)}
    patches = [p[:1] for p in images_to_levels(images[:1], bundle.preprocessing)]
    vit = session(vit_path, threads)
    measured, vit_ms = level_times(bundle, patches, vit, vit_input(images[:1], 224), threads, rounds)
    rows = []
    graphs = [(f"level {k}", lv["gflops"], weight_bytes(bundle.level_path(k)) + kv_bytes(bundle, k), "level", ms)
              for k, (lv, ms) in enumerate(zip(bundle.manifest["levels"], measured))]
    graphs.append(("ViT-B-16", vit_gflops(), weight_bytes(vit_path), "vit", vit_ms))
    for name, gflops, nbytes, rate, ms in graphs:
        compute = gflops / rates[f"{rate}_matmul_gflops"] * 1e3
        memory = nbytes / rates["stream_gb_s"] / 1e6
        rows.append({"graph": name, "gflops": gflops, "mib": nbytes / 2**20, "flop_per_byte": gflops * 1e9 / nbytes,
                     "compute_floor_ms": compute, "memory_floor_ms": memory, "floor_ms": max(compute, memory),
                     "measured_ms": ms, "efficiency": max(compute, memory) / ms})
    lv, v = rows[:-1], rows[-1]
    return {"bundle": str(bundle.path), "precision": bundle.manifest["precision"], "rates": rates, "rows": rows,
            "always_full_over_vit": {"measured": sum(r["measured_ms"] for r in lv) / v["measured_ms"],
                                     "floor": sum(r["floor_ms"] for r in lv) / v["floor_ms"]},
            "level0_over_vit": {"measured": lv[0]["measured_ms"] / v["measured_ms"],
                                "floor": lv[0]["floor_ms"] / v["floor_ms"]},
            "level_shape": {"rows": tokens, "width": cfg["width"]},
            "machine_balance_flop_per_byte": rates["vit_matmul_gflops"] / rates["stream_gb_s"]}


def format_table(r: dict) -> str:
    rates, shape = r["rates"], r["level_shape"]
    lines = [f"### {r['bundle']} ({r['precision']}, onnxruntime CPU)", "",
             f"peak MatMul rate (MLP pair, best of runs): {rates['level_matmul_gflops']:.0f} GFLOP/s at a level's "
             f"{shape['rows']} x {shape['width']}, {rates['vit_matmul_gflops']:.0f} at the ViT's {VIT_TOKENS} x "
             f"{VIT_WIDTH}; weight streaming {rates['stream_gb_s']:.1f} GB/s; machine balance "
             f"{r['machine_balance_flop_per_byte']:.1f} FLOP/byte", "",
             "| graph | GFLOPs | MiB read | FLOP/byte | compute floor ms | memory floor ms | measured ms | of floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['graph']} | {row['gflops']:.2f} | {row['mib']:.0f} | {row['flop_per_byte']:.1f} | "
                     f"{row['compute_floor_ms']:.1f} | {row['memory_floor_ms']:.1f} | {row['measured_ms']:.1f} | "
                     f"{row['efficiency']:.0%} |")
    a, z = r["always_full_over_vit"], r["level0_over_vit"]
    lines += ["", f"always-full / ViT: measured {a['measured']:.2f}x, floor {a['floor']:.2f}x; level 0 / ViT: "
                  f"measured {z['measured']:.2f}x, floor {z['floor']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/roofline.py", description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="fp32 and/or onnxruntime int8 bundle folders")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imagenet-sample"),
                   help="a real image to run (folder or CSV; default ../shared/data/imagenet-sample, else "
                        "examples/images)")
    p.add_argument("--vit", default="auto", metavar="auto|PATH.onnx",
                   help="the fp32 ViT-B-16 baseline (auto: devices.baseline's export, made once); int8 bundles are "
                        "compared with it quantized the same way")
    p.add_argument("--threads", type=integer(1), default=2)
    p.add_argument("--rounds", type=integer(1), default=10, help="timed rounds (default 10)")
    p.add_argument("--json", type=output_file, help="write every number here")
    args = p.parse_args(argv)
    from devices.baseline import BaselineError, quantized_baseline, resolve_baseline
    from runtime.data import DataError, load_images, read_image_list

    try:
        bundles = [load_bundle(b) for b in args.bundles]
        for b in bundles:
            q = b.manifest.get("quantization", {}).get("backend", "onnxruntime")
            fmt = b.manifest.get("graph_format", "onnx")
            if fmt != "onnx" or q != "onnxruntime":
                raise ValueError(f"{b.path}: the roofline covers ONNX Runtime bundles (fp32, or int8 quantized for "
                                 f"onnxruntime); this one is {b.manifest['precision']} {fmt} graphs for {q}")
        data = args.data if Path(args.data).exists() else str(REPO / "examples" / "images")
        images, _, _ = load_images(read_image_list(data, limit=16), bundles[0].preprocessing)
        vit = resolve_baseline(args.vit, lambda s: print(s, file=sys.stderr)).path
        if vit is None:
            raise ValueError("the ViT-B-16 baseline is missing (needs torch + open_clip once to export it)")
        results = []
        for b in bundles:
            path = (Path(quantized_baseline(vit, "onnxruntime", images))
                    if b.manifest["precision"] == "int8" else Path(vit))
            results.append(roofline(b, path, images, args.threads, args.rounds))
            print(format_table(results[-1]) + "\n", flush=True)
    except (ValueError, OSError, DataError, BaselineError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
