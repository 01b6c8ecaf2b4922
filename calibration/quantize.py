"""``python -m calibration.quantize BUNDLE --data DIR_OR_CSV -o BUNDLE_INT8``: an fp32 bundle -> an int8 bundle with
the same manifest contract, calibrated on real images (level k sees the real KV cache of the fp32 levels < k) and
checked against the fp32 bundle on held-out images before it is written.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from tqdm import tqdm

from calibration.backends import (DEFAULT_OPS, ONNX_METHODS, SCHEMES, WEIGHT_ONLY, WEIGHT_ONLY_SCHEME,
                                  WeightOnlyScheme, onnx_op_summary, quantize_onnx, quantize_openvino,
                                  quantize_weight_only, weight_only_summary)
from calibration.compare import compare, format_table
from calibration.quantize_full import write_full_int8, write_full_openvino
from calibration.quantize_split import write_split_int8, write_split_openvino
from calibration.reader import CascadeCalibrationReader, level_feeds
from export.weights import SharedWeights, save_graph
from runtime.bundle import (MANIFEST, Bundle, BundleError, check_manifest, check_replaceable, load_bundle,
                            sha256_file, staged_output, write_manifest)
from runtime.cli import ArgumentParser, integer, number, output_folder
from runtime.data import DataError, ImageRecord, load_images, portable_source, read_image_list, spread
from runtime.errors import one_line
from runtime.wavelet import images_to_levels

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
REPORT = "quantization_report.json"
MIN_IMAGES = 8
ORT_BATCH = 8  # rows per calibration item for onnxruntime (batch 1 for NNCF: its subset_size counts items)
SEED = 0
COMPUTE = {"int8": 4, "float": 1}  # --weight-only-compute -> MatMulNBits accuracy_level


class QuantizeError(ValueError):
    """Bad input (data, bundle, backend, output); one-line message."""


class AgreementTooLow(RuntimeError):
    """The int8 bundle disagrees with the fp32 bundle more than allowed; ``report`` holds the comparison."""

    def __init__(self, report: dict, minimum: float) -> None:
        super().__init__(f"min per-level top-1 agreement {report['min_top1_agreement']:.2%} < --min-agreement "
                         f"{minimum:.2%}; no bundle written")
        self.report = report


def _paths_digest(records: Sequence[ImageRecord], root: Path) -> str:
    """sha256 of the newline-joined image paths (relative to the data source's folder where possible)."""
    def rel(p: Path) -> str:
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return p.resolve().as_posix()
    return hashlib.sha256("\n".join(rel(r.path) for r in records).encode()).hexdigest()


def _root(source: str) -> Path:
    p = Path(source).expanduser()
    return p if p.is_dir() else p.parent


def held_out_images(records: list[ImageRecord], calib: list[ImageRecord], eval_data: str | None,
                    eval_split: str | None, eval_samples: int, source: str) -> list[ImageRecord]:
    """Evaluation records disjoint from ``calib``: ``eval_data`` minus any calibration image, else the rest of
    ``records`` (the calibration source)."""
    chosen = {r.path.resolve() for r in calib}
    pool = read_image_list(eval_data, eval_split) if eval_data else records
    pool = [r for r in pool if r.path.resolve() not in chosen]
    if not pool:
        raise QuantizeError(f"{eval_data or source}: no images left for held-out evaluation after taking "
                            f"{len(calib)} for calibration (use fewer --samples or give --eval-data)")
    held = spread(pool, eval_samples, SEED + 1)
    if chosen & {r.path.resolve() for r in held}:  # never evaluate on calibration images
        raise QuantizeError("internal error: evaluation images overlap the calibration images")
    return held


def load_patches(records: list[ImageRecord], spec: dict, what: str, source: str, progress: bool
                 ) -> tuple[list[np.ndarray], list[ImageRecord], int]:
    """Decode records -> (per-level patches, records kept, skipped); refuses fewer than MIN_IMAGES readable images."""
    skipped: list[str] = []
    images, kept, n_skip = load_images(tqdm(records, desc=f"load {what}", unit="img", disable=not progress), spec,
                                       on_skip=lambda r, why: skipped.append(why))
    if n_skip:
        print(f"warning: skipped {n_skip} unreadable {what} image(s) of {len(records)} (first: {skipped[0]})",
              file=sys.stderr)
    if len(kept) < MIN_IMAGES:
        raise QuantizeError(f"{what} data {source}: found {len(kept)} readable image(s) ({n_skip} unreadable of "
                            f"{len(records)}); need at least {MIN_IMAGES}")
    return images_to_levels(images, spec), kept, n_skip


def _graph_data_files(bundle: Bundle) -> set[str]:
    """The graphs (the level graphs, the split graphs, the one-pass graph: each written quantized, not copied) and
    their external-data files."""
    names = set()
    paths = [bundle.level_path(k) for k in range(bundle.num_levels)]
    if bundle.has_split:
        paths += [bundle.embed_path(k) for k in range(bundle.num_levels)] + [bundle.body_path()]
    if bundle.has_full:
        paths.append(bundle.full_path())
    for path in paths:
        names.add(path.relative_to(bundle.path).as_posix())
        for t in onnx.load(str(path), load_external_data=False).graph.initializer:
            names |= {e.value for e in t.external_data if e.key == "location"}
    return names


def _versions(backend: str) -> dict:
    import onnxruntime

    out = {"numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if backend == "openvino":
        import nncf
        import openvino

        out.update(openvino=openvino.__version__, nncf=nncf.__version__)
    return out


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise QuantizeError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    missing = [m for m in ("openvino", "nncf") if backend == "openvino" and importlib.util.find_spec(m) is None]
    if missing:
        raise QuantizeError(f"backend openvino needs openvino and nncf ({', '.join(missing)} missing): "
                            "pip install 'waveclip-edge[calibration]'")


def quantize_bundle(bundle_path: str | Path, out: str | Path, data: str, *, split: str | None = None,
                    backend: str = "onnxruntime", samples: int = 256, method: str = "minmax",
                    eval_data: str | None = None, eval_split: str | None = None, eval_samples: int = 256,
                    min_agreement: float = 0.99, ops: Sequence[str] | None = None, force: bool = False,
                    progress: bool = True, weight_only_compute: str = "int8") -> tuple[dict, dict]:
    """Quantize, evaluate and (if agreement holds) write the int8 bundle; returns (manifest, report).
    Raises QuantizeError / BundleError / DataError (bad input) or AgreementTooLow (nothing written)."""
    start = time.time()
    check_backend(backend)
    if method not in (*ONNX_METHODS, WEIGHT_ONLY):
        raise QuantizeError(f"unknown --method {method!r}; choose from {', '.join((*ONNX_METHODS, WEIGHT_ONLY))}")
    if method == WEIGHT_ONLY and backend != "onnxruntime":
        raise QuantizeError(f"--method {WEIGHT_ONLY} writes ONNX Runtime's MatMulNBits op: use it with --backend "
                            "onnxruntime")
    if method == WEIGHT_ONLY and ops:
        raise QuantizeError(f"--method {WEIGHT_ONLY} quantizes the weights of every MatMul; --quantize-ops does "
                            "not apply")
    if weight_only_compute not in COMPUTE or (weight_only_compute != "int8" and method != WEIGHT_ONLY):
        raise QuantizeError(f"--weight-only-compute {weight_only_compute!r}: int8 or float, with --method "
                            f"{WEIGHT_ONLY}")
    scheme = WeightOnlyScheme(accuracy_level=COMPUTE[weight_only_compute])
    if samples < MIN_IMAGES:
        raise QuantizeError(f"--samples {samples}: need at least {MIN_IMAGES} calibration images")
    fp32 = load_bundle(bundle_path)
    if fp32.manifest["precision"] != "fp32" or fp32.manifest.get("graph_format", "onnx") != "onnx":
        raise QuantizeError(f"{bundle_path}: quantization needs an fp32 ONNX bundle, this one is "
                            f"{fp32.manifest['precision']} {fp32.manifest.get('graph_format', 'onnx')}")
    if ops:  # a typo would quantize nothing, yet write an "int8" bundle
        graph_ops = {n.op_type for k in range(fp32.num_levels)
                     for n in onnx.load(str(fp32.level_path(k)), load_external_data=False).graph.node}
        unknown = [o for o in ops if not onnx.defs.has(o)]
        if unknown or not graph_ops & set(ops):
            why = (f"{', '.join(unknown)} is not an ONNX op type" if unknown else
                   f"none is an op type of the level graphs ({', '.join(sorted(graph_ops))})")
            raise QuantizeError(f"--quantize-ops {','.join(ops)}: {why}")
    out = Path(out)
    try:
        check_replaceable(out, force)
    except BundleError as e:
        raise QuantizeError(str(e)) from None
    if out.resolve() == fp32.path.resolve():
        raise QuantizeError(f"{out}: the output must not be the input bundle")
    spec = fp32.preprocessing
    records = read_image_list(data, split)
    if method == WEIGHT_ONLY:  # no activation ranges to calibrate: every image may serve the held-out check
        cal_patches, calib, cal_skipped = None, [], 0
    else:
        cal_patches, calib, cal_skipped = load_patches(spread(records, samples, SEED), spec, "calibration", data,
                                                         progress)
    held = held_out_images(records, calib, eval_data, eval_split, eval_samples, data)
    eval_patches, held, eval_skipped = load_patches(held, spec, "evaluation", eval_data or data, progress)
    ops_list = ["MatMul"] if method == WEIGHT_ONLY else list(ops) if ops else list(DEFAULT_OPS)
    data_info = _data_info(data, split, calib, cal_skipped, fp32.path.parent)
    eval_info = {**_data_info(eval_data or data, eval_split if eval_data else split, held, eval_skipped,
                              fp32.path.parent),
                 "disjoint_from_calibration": True}

    with staged_output(out, force=force) as tmp, tempfile.TemporaryDirectory(prefix="waveclip-quant-") as scratch:
        files, weights, nodes = _write_levels(fp32, cal_patches, tmp, Path(scratch), backend, method, ops_list,
                                              ops is not None, progress, scheme)
        for name in sorted(set(fp32.manifest["files"]) - _graph_data_files(fp32)):  # head, gate files, validation
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(fp32.path / name, tmp / name)
        manifest = copy.deepcopy(fp32.manifest)
        manifest.pop("files", None)
        manifest.pop("split", None)
        if fp32.has_split and weights is not None:  # ONNX Runtime / TensorRT: the shared body quantized too
            manifest["split"] = write_split_int8(fp32, cal_patches, tmp, Path(scratch), weights, SCHEMES[backend],
                                                 method, ops_list, scheme)
        elif fp32.has_split:
            manifest["split"] = write_split_openvino(fp32, cal_patches, tmp, method, ops_list if ops else None,
                                                     progress)
        manifest.pop("full", None)
        if fp32.has_full and weights is not None:  # the one-pass graph quantized the same way
            manifest["full"] = write_full_int8(fp32, cal_patches, tmp, Path(scratch), weights, SCHEMES[backend],
                                               method, ops_list, scheme)
        elif fp32.has_full:
            manifest["full"] = write_full_openvino(fp32, cal_patches, tmp, method, ops_list if ops else None, progress)
        manifest.update(name=f"{manifest.get('name', 'waveclip')}-int8-{backend}", precision="int8",
                        graph_format="openvino" if backend == "openvino" else "onnx")
        for lv, name in zip(manifest["levels"], files):
            lv["file"] = name
        manifest.pop("external_data", None)
        if weights is not None:
            manifest["external_data"] = {"file": weights.name, "bytes": weights.size, "unique_tensors": weights.unique,
                                         "tensor_references": weights.tensors}
        manifest["quantization"] = _provenance(fp32, backend, method, ops_list if ops or backend != "openvino"
                                               else None, nodes, data_info, eval_info, scheme)
        write_manifest(tmp, manifest)
        check_manifest(manifest)

        labels = [r.label for r in held] if all(r.label for r in held) else None
        runner, written, reference = "openvino" if backend == "openvino" else "onnxruntime", load_bundle(tmp), {}
        report = compare(fp32, written, eval_patches, runner, labels, progress, weights="levels", reference=reference)
        # the split form and the one-pass graph answer too: they must agree as well
        forms = {"split": {"weights": "split"}, "full": {"weights": "levels", "one_pass": True}}
        for form in (f for f in forms if f in manifest):
            other = compare(fp32, written, eval_patches, runner, labels, progress, reference=reference, **forms[form])
            report[form] = {k: other[k] for k in ("levels", "min_top1_agreement")}
            report["min_top1_agreement"] = min(report["min_top1_agreement"], other["min_top1_agreement"])
        report["eval_data"] = eval_info
        if backend == "tensorrt":
            report["note"] = ("evaluated with onnxruntime CPU on the QDQ graphs; TensorRT engines are built and "
                              "timed on the target")
        report["min_agreement_required"] = min_agreement
        report["passed"] = report["min_top1_agreement"] >= min_agreement
        if not report["passed"]:
            raise AgreementTooLow(report, min_agreement)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        manifest["quantization"]["evaluation"] = {k: v for k, v in report.items() if k != "eval_data"}
        manifest["quantization"]["seconds"] = round(time.time() - start, 1)
        write_manifest(tmp, manifest)
        check_manifest(manifest)
        load_bundle(tmp)
    return manifest, report


def _write_levels(fp32: Bundle, patches: list[np.ndarray], tmp: Path, scratch: Path, backend: str, method: str,
                  ops: list[str], ops_given: bool, progress: bool, scheme: WeightOnlyScheme = WEIGHT_ONLY_SCHEME
                  ) -> tuple[list[str], SharedWeights | None, dict]:
    """Quantize every level on its real inputs (walking the fp32 cascade) into ``tmp``; returns (level files, the
    shared weights file of ONNX graphs, {"quantized": ..., "float": ...} node counts per op type)."""
    weights = SharedWeights(tmp) if backend != "openvino" else None
    files: list[str] = []
    nodes: dict[str, dict[str, int]] = {"quantized": {}, "float": {}}
    feeds = level_feeds(fp32, patches) if method != WEIGHT_ONLY else None
    for k in tqdm(range(fp32.num_levels), desc=f"quantize ({backend})", unit="level", disable=not progress):
        inputs = next(feeds) if feeds is not None else None
        src = fp32.level_path(k)
        if weights is not None:
            if method == WEIGHT_ONLY:
                proto = quantize_weight_only(src, scheme)
                counts = weight_only_summary(proto)
            else:
                proto = quantize_onnx(src, CascadeCalibrationReader(inputs, ORT_BATCH),
                                      scratch / f"level{k}.int8.onnx", SCHEMES[backend], method, ops, scratch)
                counts = onnx_op_summary(proto, ops)
            files.append(f"level{k}.onnx")
            save_graph(weights.externalize(proto), tmp / files[-1])
            onnx.checker.check_model(str(tmp / files[-1]))
        else:
            files.append(f"level{k}.xml")
            counts = quantize_openvino(src, CascadeCalibrationReader(inputs, 1).items(), tmp / files[-1], method,
                                       ops if ops_given else None, progress=progress)
        for acc, c in zip(nodes.values(), counts):
            for t, n in c.items():
                acc[t] = acc.get(t, 0) + n
    if feeds is not None:
        feeds.close()
    return files, weights, nodes


def _data_info(source: str, split: str | None, records: list[ImageRecord], skipped: int, root: Path) -> dict:
    return {"source": portable_source(source, root), "split": split, "images": len(records),
            "skipped_unreadable": skipped, "paths_sha256": _paths_digest(records, _root(source))}


def _provenance(fp32: Bundle, backend: str, method: str, ops: list[str] | None, nodes: dict, data: dict,
                eval_data: dict, weight_only: WeightOnlyScheme = WEIGHT_ONLY_SCHEME) -> dict:
    if method == WEIGHT_ONLY:
        scheme = weight_only.describe()
    elif backend == "openvino":
        scheme = {"library": "nncf.quantize(model_type=TRANSFORMER, preset=MIXED; NNCF applies SmoothQuant and fast "
                             "bias correction)", "format": "OpenVINO IR (FakeQuantize, int8 weights)",
                  "weights": {"type": "int8", "per_channel": True, "symmetric": True},
                  "activations": {"type": "8-bit", "symmetric": False}}
    else:
        scheme = {"library": "onnxruntime.quantization: quant_pre_process + quantize_static",
                  **SCHEMES[backend].describe()}
    out = {"backend": backend, "tool": "python -m calibration.quantize", **scheme, "method": method,
           "samples": data["images"], "data": data, "eval_data": eval_data,
           "kv_calibration": "none: weight-only, no activation ranges" if method == WEIGHT_ONLY else
                             "real KV: level k is calibrated on the present outputs of the fp32 levels < k for the "
                             "same images",
           "op_types_to_quantize": ops if ops is not None else "NNCF TRANSFORMER default",
           "quantized_nodes": nodes["quantized"], "float_compute_nodes": nodes["float"],
           "head_and_gate": "copied from the fp32 bundle (gate thresholds were set on fp32)",
           "source_bundle": {"name": fp32.manifest.get("name"), "manifest_sha256": sha256_file(fp32.path / MANIFEST)},
           "versions": _versions(backend), "report": REPORT,
           "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if backend == "tensorrt":
        out["target"] = ("TensorRT explicit quantization (symmetric int8 QDQ): engines are built on the target device "
                         "into tensorrt/<device>/ by the runtime's TensorRT backend or `python -m devices trtexec`, "
                         "never shipped")
    return out


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m calibration.quantize", description=__doc__.split("\n\n")[0].replace("``", "'"),
                epilog="Exit status: 0 written; 1 int8 agreement under --min-agreement (nothing written); "
                       "2 bad input (bundle, data, output, backend).")
    p.add_argument("bundle", help="fp32 ONNX bundle folder (python -m export.onnx)")
    p.add_argument("--data", required=True, metavar="DIR_OR_CSV",
                   help="calibration images: a folder (recursive) or a CSV with a path column (and optional split)")
    p.add_argument("--split", help="CSV split to calibrate on (e.g. train)")
    p.add_argument("-o", "--output", required=True, type=output_folder, help="int8 bundle folder to create")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="onnxruntime: QDQ ONNX for ONNX Runtime CPU (default); openvino: NNCF int8 OpenVINO IR; "
                        "tensorrt: symmetric int8 QDQ ONNX for TensorRT explicit quantization (engines built on the "
                        "target, evaluated here with onnxruntime CPU)")
    p.add_argument("--samples", type=integer(MIN_IMAGES), default=256, help="calibration images (default 256, at least 8)")
    p.add_argument("--method", default="minmax", choices=(*ONNX_METHODS, WEIGHT_ONLY),
                   help="activation range calibration (default minmax). OpenVINO maps minmax->MINMAX, "
                        f"percentile->MEAN_QUANTILE, entropy->HISTOGRAM. {WEIGHT_ONLY}: int8 weights in blocks of "
                        f"{WEIGHT_ONLY_SCHEME.block_size} (ONNX Runtime MatMulNBits), float activations, no "
                        "calibration images; nearest to fp32, 4x smaller weights; --backend onnxruntime "
                        "(OpenVINO reads it too, TensorRT does not)")
    p.add_argument("--weight-only-compute", choices=tuple(COMPUTE), default="int8",
                   help=f"with --method {WEIGHT_ONLY}: int8 (default; the kernel quantizes the activations per block "
                        "and computes in int8, the fast path) or float (it dequantizes the weights and computes in "
                        "fp32: only the weights' rounding differs from fp32, several times slower than fp32 on a CPU)")
    p.add_argument("--eval-data", metavar="DIR_OR_CSV",
                   help="held-out images for the fp32 vs int8 check (default: --data images not used for "
                        "calibration); calibration images are always excluded")
    p.add_argument("--eval-split", help="CSV split of --eval-data (e.g. val)")
    p.add_argument("--eval-samples", type=integer(1), default=256, help="held-out images to compare on (default 256)")
    p.add_argument("--min-agreement", type=number(0), default=0.99,
                   help="refuse (exit 1, nothing written) when any level's fp32-vs-int8 top-1 agreement is lower "
                        "(default 0.99)")
    p.add_argument("--quantize-ops", metavar="OPS",
                   help=f"comma-separated ONNX op types to quantize (default {','.join(DEFAULT_OPS)}: LayerNorm, "
                        "Softmax, GELU/Erf and residual Adds stay float; so do the attention MatMuls, the patch "
                        "embedding and the output projection). With openvino the default is NNCF's transformer "
                        "scheme and the list maps to NNCF's ignored scope")
    p.add_argument("--force", action="store_true",
                   help="replace the output if it is a bundle (or an empty folder); another folder is never deleted")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ops = [o.strip() for o in args.quantize_ops.split(",") if o.strip()] if args.quantize_ops else None
    try:
        manifest, report = quantize_bundle(
            args.bundle, args.output, args.data, split=args.split, backend=args.backend, samples=args.samples,
            method=args.method, eval_data=args.eval_data, eval_split=args.eval_split, eval_samples=args.eval_samples,
            min_agreement=args.min_agreement, ops=ops, force=args.force, progress=not args.quiet,
            weight_only_compute=args.weight_only_compute)
    except AgreementTooLow as e:
        print(format_table(e.report))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (QuantizeError, BundleError, DataError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(format_table(report))
    size = sum(p.stat().st_size for p in Path(args.output).iterdir() if p.is_file())
    print(f"wrote {args.output} ({manifest['precision']}, {args.backend}, {size / 2**20:.1f} MiB, "
          f"{manifest['quantization']['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
