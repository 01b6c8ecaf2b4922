"""Which weights' int8 rounding flips a bundle's answers: top-1 agreement with fp32 when a module (or a group of
modules) of every level graph is kept float and the rest quantized as `calibration.quantize` does (ONNX Runtime QDQ).

    python bench/int8_sensitivity.py BUNDLE --data CSV_OR_DIR [--split calib] [--samples 256] [--limit 1000]
        [--method entropy] [--per-module]

The calibration images are those `calibration.quantize --samples N` takes from the same list; agreement is measured
on --limit other images of it. Each level's activation ranges are computed once (ONNX Runtime's calibration cache)
and every variant is written from them, so the variants differ only in what stays float. Where one module dominates,
keeping it float is the cheap way to a higher agreement (the mixed precision of NNCF's accuracy control); where every
row is alike, the rounding noise is spread over the network and only a more confident model agrees more.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.backends import DEFAULT_OPS, ONNX_METHODS, SCHEMES, quantize_onnx, weighted_modules  # noqa: E402
from calibration.quantize import ORT_BATCH, SEED, held_out_images, load_patches  # noqa: E402
from calibration.reader import CascadeCalibrationReader, level_feeds  # noqa: E402
from runtime.bundle import Bundle, BundleError, load_bundle  # noqa: E402
from runtime.cascade import Cascade  # noqa: E402
from runtime.cli import ArgumentParser, integer  # noqa: E402
from runtime.data import DataError, read_image_list, spread  # noqa: E402
from runtime.errors import one_line  # noqa: E402


def block_of(module: str) -> int | None:
    """``blocks.3/mlp/c_fc`` -> 3; None outside the transformer blocks."""
    head = module.split("/")[0]
    return int(head.split(".")[1]) if head.startswith("blocks.") else None


def groups(modules: list[str]) -> dict[str, list[str]]:
    """Named sets of weighted modules: the blocks' MLPs, their attention, the first and the second half of the
    blocks, and every module (then nothing is quantized: the row must read 100%)."""
    blocks = [m for m in modules if block_of(m) is not None]
    half = (max(map(block_of, blocks)) + 1) // 2 if blocks else 0
    return {"MLPs": [m for m in blocks if "/mlp" in m], "attention": [m for m in blocks if "/attn" in m],
            f"blocks < {half}": [m for m in blocks if block_of(m) < half],
            f"blocks >= {half}": [m for m in blocks if block_of(m) >= half], "every module": list(modules)}


class Sensitivity:
    """The fp32 top-1 of every level on the evaluation images, and the agreement of int8 variants with it."""

    def __init__(self, bundle: Bundle, calib: list[np.ndarray], held: list[np.ndarray], method: str,
                 scratch: Path) -> None:
        self.bundle, self.method, self.scratch = bundle, method, scratch
        self.cascade = Cascade(bundle, "onnxruntime", providers=["CPUExecutionProvider"], weights="levels",
                               one_pass=False)
        self.calib, self.held = list(level_feeds(bundle, calib)), list(level_feeds(bundle, held))
        self.reference = [self._top1(bundle.level_path(k), k) for k in range(bundle.num_levels)]

    def _top1(self, path: Path | onnx.ModelProto, level: int) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        model = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        emb = session.run(["embedding"], {n: v for n, v in self.held[level].items() if n in names})[0]
        return self.cascade.probabilities(emb).argmax(1)

    def agreement(self, keep_float: list[str]) -> list[float]:
        """Per-level top-1 agreement with fp32 of the level graphs quantized with ``keep_float`` left float."""
        out = []
        for k in range(self.bundle.num_levels):
            proto = quantize_onnx(self.bundle.level_path(k), CascadeCalibrationReader(self.calib[k], ORT_BATCH),
                                  self.scratch / f"level{k}.int8.onnx", SCHEMES["onnxruntime"], self.method,
                                  list(DEFAULT_OPS), self.scratch, keep_float=keep_float,
                                  ranges=self.scratch / f"ranges{k}.json")
            out.append(float((self._top1(proto, k) == self.reference[k]).mean()))
        return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/int8_sensitivity.py", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="fp32 ONNX bundle")
    p.add_argument("--data", required=True, help="images: a folder or a CSV with a path column")
    p.add_argument("--split", help="CSV split (e.g. calib)")
    p.add_argument("--samples", type=integer(8), default=256, help="calibration images (default 256)")
    p.add_argument("--limit", type=integer(1), default=1000, help="evaluation images, others (default 1000)")
    p.add_argument("--method", choices=ONNX_METHODS, default="entropy", help="range calibration (default entropy)")
    p.add_argument("--per-module", action="store_true", help="also keep each module float alone (one row each)")
    args = p.parse_args(argv)
    try:
        bundle = load_bundle(args.bundle)
        if bundle.manifest["precision"] != "fp32":
            raise BundleError(f"{args.bundle}: an fp32 bundle is needed, this one is {bundle.manifest['precision']}")
        records = read_image_list(args.data, args.split)
        # the images calibration.quantize takes for ranges and for its held-out check
        calib_patches, calib, _ = load_patches(spread(records, args.samples, SEED), bundle.preprocessing,
                                               "calibration", args.data, progress=False)
        held = held_out_images(records, calib, None, None, args.limit, args.data)
        held_patches, held, _ = load_patches(held, bundle.preprocessing, "evaluation", args.data, progress=False)
        with tempfile.TemporaryDirectory(prefix="waveclip-sensitivity-") as scratch:
            s = Sensitivity(bundle, calib_patches, held_patches, args.method, Path(scratch))
            modules = list(dict.fromkeys(m for k in range(bundle.num_levels)
                                         for m in weighted_modules(bundle.level_path(k))))
            blocks = [m for m in modules if block_of(m) is not None]
            rows = {"none (all int8)": []} | groups(modules)
            if args.per_module:
                rows |= {m: [m] for m in blocks}
            print(f"{len(calib)} calibration and {len(held)} evaluation images, {args.method} ranges, "
                  f"{len(modules)} weighted modules over the levels")
            print("| kept float | modules | " + " | ".join(f"level {k}" for k in range(bundle.num_levels)) + " | min |")
            print("|---|---:|" + "---:|" * (bundle.num_levels + 1))
            for name, keep in rows.items():
                a = s.agreement(keep)
                print(f"| {name} | {len(keep)} | " + " | ".join(f"{x:.1%}" for x in a) + f" | {min(a):.1%} |",
                      flush=True)
    except (BundleError, DataError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
