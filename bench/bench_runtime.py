"""Runtime overhead vs level-0 compute, and KV cache kept in ONNX Runtime (I/O binding) vs numpy round-trips.

    python bench/bench_runtime.py BUNDLE [--data DIR_OR_CSV] [--images 50] [--reps 20] [--threads N]

All figures are medians over real images at batch 1, measured side by side in one run on this machine.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.backends.ort import OnnxRuntimeBackend  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402
from runtime.cascade import Cascade, margins  # noqa: E402
from runtime.cli import ArgumentParser, integer  # noqa: E402
from runtime.data import read_image_list  # noqa: E402
from runtime.preprocess import image_to_array  # noqa: E402
from runtime.timing import time_calls  # noqa: E402
from runtime.wavelet import images_to_levels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after one warm-up call."""
    return statistics.median(time_calls(fn, reps, warmup=1))


def main() -> int:
    p = ArgumentParser(prog="python bench/bench_runtime.py", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imagenet-sample"),
                   help="images (folder or CSV); default ../shared/data/imagenet-sample")
    p.add_argument("--images", type=integer(1), default=50)
    p.add_argument("--reps", type=integer(1), default=20, help="timed repetitions per image and step")
    p.add_argument("--threads", type=integer(1), default=2)
    args = p.parse_args()

    bundle = load_bundle(args.bundle)
    spec = bundle.preprocessing
    records = read_image_list(args.data, limit=args.images) if Path(args.data).exists() else \
        read_image_list(REPO / "examples" / "images")
    bound = OnnxRuntimeBackend(bundle, threads=args.threads, io_binding=True)
    plain = OnnxRuntimeBackend(bundle, threads=args.threads, io_binding=False)
    cascade = Cascade(bundle, bound)
    rows: dict[str, list[float]] = {k: [] for k in ("decode_resize", "dwt_patches", "level0_compute", "level0_runtime",
                                                  "gate", "kv_bound", "kv_numpy")}
    for rec in records:
        arr = image_to_array(rec.path, spec)
        levels = images_to_levels(arr[None], spec)
        sess0 = plain.sessions[0]
        rows["decode_resize"].append(timed(lambda: image_to_array(rec.path, spec), args.reps))
        rows["dwt_patches"].append(timed(lambda: images_to_levels(arr[None], spec), args.reps))
        rows["level0_compute"].append(timed(lambda: sess0.run(["embedding"], {"patches": levels[0]}), args.reps))
        rows["level0_runtime"].append(timed(lambda: bound.run_level(0, levels[0], None), args.reps))
        emb, _ = bound.run_level(0, levels[0], None)
        rows["gate"].append(timed(lambda: margins(cascade.probabilities(emb)), args.reps))

        def deeper(backend):
            _, past = backend.run_level(0, levels[0], None)
            for k in range(1, bundle.num_levels):
                _, past = backend.run_level(k, levels[k], past)

        rows["kv_bound"].append(timed(lambda: deeper(bound), max(3, args.reps // 4)))
        rows["kv_numpy"].append(timed(lambda: deeper(plain), max(3, args.reps // 4)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    overhead = med["dwt_patches"] + med["gate"] + (med["level0_runtime"] - med["level0_compute"])
    print(f"bundle {bundle.path} ({bundle.manifest['precision']}), {len(records)} real images, batch 1, "
          f"{args.threads} threads, onnxruntime {__import__('onnxruntime').__version__}\n")
    print("| step | median ms | share of level-0 compute |\n|---|---|---|")
    for key in ("decode_resize", "dwt_patches", "level0_compute", "level0_runtime", "gate"):
        print(f"| {key} | {med[key]:.3f} | {100 * med[key] / med['level0_compute']:.1f}% |")
    print(f"| **runtime overhead** (DWT+patches, gate, binding/dispatch) | {overhead:.3f} | "
          f"**{100 * overhead / med['level0_compute']:.1f}%** |")
    print(f"\nAll {bundle.num_levels} levels, KV cache kept as OrtValues (I/O binding): {med['kv_bound']:.3f} ms; "
          f"numpy round-trips: {med['kv_numpy']:.3f} ms; ratio numpy/bound = {med['kv_numpy'] / med['kv_bound']:.3f}")
    print("(decode_resize is JPEG decoding and resizing by Pillow; it depends on the file, not on the runtime)")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
