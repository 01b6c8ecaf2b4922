"""How a TensorRT engine gets its precision, on TensorRT 8.5-10.x and on 11.x.

Up to 10.x a network is weakly typed: builder flags (``BuilderFlag.FP16`` / ``INT8``; trtexec ``--fp16`` / ``--int8``)
let TensorRT pick reduced-precision kernels for an fp32 graph. TensorRT 11 removed every precision flag: all networks
are strongly typed, so a reduced precision must be in the ONNX graph itself (NVIDIA's 10.x-to-11.x migration guide,
"Strongly Typed Networks Are Now Required"). There an fp16 engine is built from an fp16 copy of the level graph, made
as the export's ``--fp16`` makes its graphs (``runtime.fp16``: ONNX Runtime's float16 converter), inputs and outputs
kept float32 so that the runtime's buffers (patches, KV cache, embedding) stay what the manifest says; an int8 QDQ
graph is explicit quantization already and builds as it is, its unquantized layers in fp32 (10.x's ``--fp16`` ran them
in fp16). An fp16 bundle (``export.onnx --fp16``) is in fp16 already and builds as it is.

``python -m runtime.backends.trt_precision BUNDLE OUT_DIR`` writes the fp16 copy of every level graph (for trtexec
on TensorRT 11: ``python -m devices trtexec`` prints that step).
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")
_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}
FIRST_STRONGLY_TYPED = 11  # the TensorRT major version without precision flags


@dataclass(frozen=True)
class BuildPlan:
    """``flags``: builder flags (BuilderFlag names; trtexec ``--fp16`` / ``--int8``); ``fp16_graph``: build from the
    graph's fp16 copy (``fp16_graph()``) instead of the graph itself."""

    flags: tuple[str, ...]
    fp16_graph: bool


def tensorrt_major(version: str) -> int:
    """The major number of a TensorRT version string such as ``"10.3"`` or ``"11.4.0.106"``."""
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ValueError(f"TensorRT version {version!r}: expected MAJOR[.MINOR...]") from None


def build_plan(precision: str, major: int, bundle_precision: str = "fp32") -> BuildPlan:
    """What a ``precision`` engine of a ``bundle_precision`` bundle needs from TensorRT ``major``."""
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if major < FIRST_STRONGLY_TYPED:
        return BuildPlan(_FLAGS[precision], False)
    return BuildPlan((), precision == "fp16" and bundle_precision == "fp32")


def engine_precision(requested: str | None, bundle_precision: str) -> str:
    """The engine precision for a bundle: ``requested``, or int8 for an int8 (QDQ) bundle and fp16 for a float one;
    an int8 engine needs the QDQ bundle (its scales), and a QDQ bundle builds int8 engines only."""
    bundle_int8 = bundle_precision == "int8"
    precision = requested or ("int8" if bundle_int8 else "fp16")
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "int8" and not bundle_int8:
        raise ValueError(f"an int8 TensorRT engine needs an int8 QDQ bundle (calibration.quantize --backend "
                         f"tensorrt); this one is {bundle_precision}")
    if precision != "int8" and bundle_int8:
        raise ValueError(f"a {precision} TensorRT engine needs the float bundle; an int8 QDQ bundle builds int8 "
                         "engines")
    return precision


def fp16_graph(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``src`` (an fp32 ONNX graph, external weights read from beside it) with its weights and arithmetic in
    float16 and its inputs and outputs float32 to ``dst``, the weights in ``dst`` + ``.weights`` beside it."""
    import onnx

    from runtime.fp16 import to_fp16

    dst = Path(dst)
    half = to_fp16(onnx.load(str(src)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(half, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".weights")
    return dst


def main(argv: list[str] | None = None) -> int:
    from runtime.bundle import BundleError, load_bundle
    from runtime.cli import ArgumentParser, output_folder
    from runtime.errors import one_line

    p = ArgumentParser(prog="python -m runtime.backends.trt_precision",
                       description="Write the fp16 copy of every level graph of an fp32 bundle (inputs and outputs "
                                   "float32), for TensorRT 11 fp16 engines (strongly typed).",
                       epilog="Files of the same names in OUT are replaced, and only once every copy is made. "
                              "Exit status: 0 written, 2 bad input (bundle, OUT).")
    p.add_argument("bundle", help="an fp32 bundle folder")
    p.add_argument("out", type=output_folder, help="folder for level{k}.onnx (and their .weights)")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bundle.manifest["precision"] != "fp32":
        print(f"error: {args.bundle}: precision {bundle.manifest['precision']!r}; an fp16 copy needs the fp32 bundle "
              "(an int8 QDQ bundle builds as it is)", file=sys.stderr)
        return 2
    try:  # every copy made in a staging folder inside OUT first: a failure leaves OUT's files as they were
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".partial", dir=out) as tmp:
            staged = [fp16_graph(bundle.level_path(k), Path(tmp) / f"level{k}.onnx") for k in range(bundle.num_levels)]
            for graph in staged:  # the weights first: a level graph in OUT always finds its own
                os.replace(f"{graph}.weights", out / f"{graph.name}.weights")
                os.replace(graph, out / graph.name)
                print(out / graph.name)
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
