"""``python -m export.onnx ckpt.pt [-o BUNDLE]``: checkpoint -> validated per-level ONNX bundle with an explicit KV
cache.

Without -o the bundle goes beside the checkpoint, named from it: ``ckpt.pt`` -> ``ckpt-bundle/`` (``--fp16``:
``ckpt-fp16-bundle/``). Every level graph shares one ``weights.bin``; the bundle is staged in a temporary folder and
swapped in (the old one kept whole until then) only after ONNX Runtime reproduced PyTorch on real images
(``validation.json``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from runtime.fp16 import to_fp16
from export.full import export_full, full_entry, validate_full
from export.graphs import DEFAULT_OPSET, EXPORTER, KINDS, PAST, PRESENT, export_level, level_io
from export.optimize import optimize_graph, summarize
from export.split import export_body, export_embed, split_entry, validate_split
from export.validate import MAX_IMAGES, find_images, format_table, tolerances, validate_bundle
from export.weights import SharedWeights, save_graph
from model.checkpoint import CheckpointError, load_checkpoint
from model.config import WaveCLIPConfig
from runtime.bundle import (BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, BundleError, check_replaceable, load_bundle,
                            sha256_file, staged_output, write_array, write_manifest)
from runtime.cli import ArgumentParser, integer, number, output_folder
from runtime.errors import one_line
from runtime.preprocess import ImageError, preprocess

VALIDATION = "validation.json"
OPT_THREADS = 1
MIN_OPSET = 14  # the lowest opset the export was checked to export and validate with


class ExportError(ValueError):
    """A request that cannot be exported (bad --levels, ...); one-line message."""


class ValidationFailed(RuntimeError):
    """The exported graphs do not reproduce PyTorch within tolerance; ``result`` holds the report."""

    def __init__(self, result: dict) -> None:
        super().__init__("; ".join(result["failures"]))
        self.result = result


def parse_levels(text: str | None, num_levels: int) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; only a prefix 0..k is allowed (level k needs the cache of every level before it)."""
    if text is None:
        return list(range(num_levels))
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExportError(f"--levels {text!r}: expected comma-separated integers such as 0,1,2") from None
    if not levels or levels != list(range(len(levels))) or len(levels) > num_levels:
        raise ExportError(f"--levels {text!r}: must be a prefix 0,1,..,k of 0..{num_levels - 1} "
                          "(level k runs on the KV cache of all levels before it)")
    return levels


def default_output(ckpt_path: str | Path, fp16: bool = False) -> Path:
    """The bundle folder used without -o: beside the checkpoint, named from it (``ckpt.pt`` -> ``ckpt-bundle``)."""
    ckpt = Path(ckpt_path)
    return ckpt.with_name(f"{ckpt.stem}{'-fp16' if fp16 else ''}-bundle")


def check_output(ckpt_path: str | Path, out: str | Path, force: bool) -> None:
    """Refuse an existing output without ``force`` (with it, anything but a bundle), and always an output folder that
    holds the checkpoint."""
    out = Path(out)
    if out.exists() and Path(ckpt_path).resolve().is_relative_to(out.resolve()):
        raise ExportError(f"{out}: the output folder holds the checkpoint {ckpt_path}; it would be replaced")
    check_replaceable(out, force, "use --force to replace it, or -o for another folder")


def build_manifest(cfg: WaveCLIPConfig, level_entries: list[dict], head: dict, precision: str,
                   optimization: dict, export_info: dict, weights: SharedWeights) -> dict:
    """The bundle manifest (runtime/manifest.schema.json); ``files`` is filled by write_manifest."""
    n = len(level_entries)
    return {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "name": cfg.name,
        "model": cfg.to_dict(),
        "preprocessing": cfg.preprocessing_spec(),
        "kv_cache": {"num_layers": cfg.layers, "num_heads": cfg.heads, "head_dim": cfg.head_dim,
                     **({"tokens_per_level": cfg.tokens_per_level} if cfg.uniform else {}),
                     **{f"past_{kind}_pattern": PAST.replace("%s", kind) for kind in KINDS},
                     **{f"present_{kind}_pattern": PRESENT.replace("%s", kind) for kind in KINDS},
                     "layout": "batch,heads,length,head_dim"},
        "levels": level_entries,
        "head": head,
        "gate": {"metric": "softmax_margin", "thresholds": [0.5] * (n - 1), "source": "default"},
        "precision": precision,
        "graph_format": "onnx",
        "external_data": {"file": weights.name, "bytes": weights.size, "unique_tensors": weights.unique,
                          "tensor_references": weights.tensors},
        "optimization": optimization,
        "export": export_info,
    }


def export_bundle(ckpt_path: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET, levels: str | None = None,
                  fp16: bool = False, force: bool = False, images: Sequence[str] | None = None,
                  max_images: int = MAX_IMAGES,
                  optimize: bool = True, atol: float | None = None, progress: bool = True,
                  split: bool = True, full: bool = True) -> tuple[dict, dict]:
    """Export and validate a bundle; returns (manifest, validation). With ``split`` (fp32 only) it also holds the
    split graphs (export/split.py: per-level embeddings + one shared body), with ``full`` (fp32 only) the one-pass
    graph (export/full.py: every level in one block-causal pass). Raises ValidationFailed (nothing
    written), CheckpointError, BundleError, ImageError, ExportError or OSError."""
    start = time.time()
    check_output(ckpt_path, out, force)
    model, ckpt = load_checkpoint(ckpt_path)
    cfg = model.config
    chosen = parse_levels(levels, cfg.num_levels)
    found, source = find_images(images, max_images)
    patches = preprocess(found, cfg.preprocessing_spec())
    precision = "fp16" if fp16 else "fp32"
    ck_head = ckpt["head"]
    head_np = {"weight": ck_head["weight"].float().numpy(), "bias": ck_head["bias"].float().numpy(),
               "logit_scale": float(ck_head["logit_scale"])}
    with staged_output(out, force=force) as tmp:
        weights = SharedWeights(tmp)
        entries, records = [], []
        for k in tqdm(chosen, desc="export", unit="level", disable=not progress):
            inputs, outputs = level_io(cfg, k)
            proto = export_level(model, k, opset)
            if optimize:
                proto, record = optimize_graph(proto, inputs, threads=OPT_THREADS)
                records.append({"level": k, **record})
            if fp16:
                proto = to_fp16(proto)
            name = f"level{k}.onnx"
            save_graph(weights.externalize(proto), tmp / name)
            del proto
            onnx.checker.check_model(str(tmp / name), full_check=True)
            entries.append({"level": k, "file": name, "past_length": cfg.past_length(k),
                            "tokens": cfg.level_tokens(k), "gflops": round(cfg.level_gflops(k), 6),
                            "cumulative_gflops": round(cfg.cumulative_gflops(k), 6),
                            "inputs": inputs, "outputs": outputs})
        split_info = _write_split(model, chosen, opset, weights, tmp) if split and not fp16 else None
        full_info = _write_full(model, chosen, opset, weights, tmp) if full and not fp16 else None
        head = {"class_names": list(ck_head["class_names"]), "labels": list(ck_head["labels"]),
                "weight": write_array(tmp, "head_weight.bin", head_np["weight"]),
                "bias": write_array(tmp, "head_bias.bin", head_np["bias"]),
                "logit_scale": head_np["logit_scale"]}
        tol = tolerances(precision, atol)
        result = validate_bundle(tmp, entries, model, head_np, patches, tol, progress)
        if split_info is not None:
            result["split"] = validate_split(tmp, split_info, model, patches[:len(chosen)], min(tol.values()))
            if not result["split"]["passed"]:
                result["passed"] = False
                result["failures"].append(f"split graphs: max abs diff per level {result['split']['max_abs_diff_per_level']}"
                                          f" > atol {result['split']['atol']:g}")
        if full_info is not None:
            result["full"] = validate_full(tmp, full_info, model, patches[:len(chosen)], min(tol.values()))
            if not result["full"]["passed"]:
                result["passed"] = False
                worst, atol = result["full"]["max_abs_diff_per_level"], result["full"]["atol"]
                result["failures"].append(f"one-pass graph: max abs diff per level {worst} > atol {atol:g}")
        result["images"] = {"source": source, "count": len(found),
                            "files": [Path(f).name for f in found if not isinstance(f, np.ndarray)]}
        (tmp / VALIDATION).write_text(json.dumps(result, indent=2) + "\n")
        info = {"tool": "python -m export.onnx", "exporter": EXPORTER, "opset": opset,
                "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                "checkpoint": {"file": Path(ckpt_path).name, "sha256": sha256_file(ckpt_path)},
                "teacher": ckpt.get("teacher"), "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.time() - start, 1),
                "validation": {"file": VALIDATION, "passed": result["passed"], "images": len(found), "source": source}}
        manifest = build_manifest(cfg, entries, head, precision, summarize(records, OPT_THREADS), info, weights)
        if split_info is not None:
            manifest["split"] = split_info
        if full_info is not None:
            manifest["full"] = full_info
        write_manifest(tmp, manifest)
        if not result["passed"]:
            raise ValidationFailed(result)
        load_bundle(tmp)  # sha256 of every file, head arrays readable
    return manifest, result


def _write_split(model, levels: list[int], opset: int, weights: SharedWeights, folder: Path) -> dict:
    """Write embed{k}.onnx and body.onnx (their weights deduplicated against the level graphs'); the manifest entry."""
    entry = split_entry(len(levels))
    for e in entry["embed"]:
        save_graph(weights.externalize(export_embed(model, e["level"], opset)), folder / e["file"])
    save_graph(weights.externalize(export_body(model, opset)), folder / entry["body"]["file"])
    for name in [e["file"] for e in entry["embed"]] + [entry["body"]["file"]]:
        onnx.checker.check_model(str(folder / name), full_check=True)
    return entry


def _write_full(model, levels: list[int], opset: int, weights: SharedWeights, folder: Path) -> dict:
    """Write full.onnx (export/full.py; its weights deduplicated against the level graphs'); the manifest entry."""
    entry = full_entry(len(levels))
    save_graph(weights.externalize(export_full(model, len(levels), opset)), folder / entry["file"])
    onnx.checker.check_model(str(folder / entry["file"]), full_check=True)
    return entry


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m export.onnx", description=__doc__.split("\n\n")[0].replace("``", "'"),
        epilog="Exit status: 0 exported and validated, 1 validation failed (nothing written), "
               "2 bad input (checkpoint, output folder, images, --levels).")
    p.add_argument("checkpoint", help="WaveCLIP checkpoint (ckpt.pt, see model/checkpoint.py)")
    p.add_argument("-o", "--output", type=output_folder,
                   help="bundle folder to create (default: beside the checkpoint, named from it: ckpt.pt -> "
                        "ckpt-bundle, with --fp16 ckpt-fp16-bundle)")
    p.add_argument("--opset", type=integer(MIN_OPSET, onnx.defs.onnx_opset_version()), default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{onnx.defs.onnx_opset_version()} (default {DEFAULT_OPSET})")
    p.add_argument("--levels", help="levels to export, a prefix such as 0,1 (default: all)")
    p.add_argument("--fp16", action="store_true",
                   help="convert the graphs' weights and compute to float16 (inputs/outputs stay float32; "
                        "validated with a looser tolerance)")
    p.add_argument("--force", action="store_true",
                   help="replace the output if it is a bundle or an empty folder (the old bundle stays whole until the "
                        "new one is in); another folder is never deleted")
    p.add_argument("--images", nargs="+", metavar="IMG_OR_DIR",
                   help="validation images (files or folders; at most --max-images of them, evenly spaced); "
                        "default: $WAVECLIP_DATA or ../shared/data imagenet-sample (the first --max-images), else "
                        "examples/images")
    p.add_argument("--max-images", type=integer(1, 100000), default=MAX_IMAGES,
                   help=f"validate on at most this many images, run as one batch (default {MAX_IMAGES})")
    p.add_argument("--no-optimize", action="store_true",
                   help="skip the optional offline graph optimisation pass (kept only where it pays anyway)")
    p.add_argument("--no-split", action="store_true",
                   help="leave out the split graphs (per-level embeddings + one body shared by all levels, which "
                        "let a runtime hold the weights once; fp32 only)")
    p.add_argument("--no-full", action="store_true",
                   help="leave out the one-pass graph (every level's embedding from one block-causal pass, which "
                        "a runtime uses when every level is wanted; fp32 only)")
    p.add_argument("--atol", type=number(minimum=0),
                   help="max abs diff allowed against PyTorch for every output (default 1e-4 fp32; "
                        "fp16: 1e-2 embeddings, 5e-2 KV cache)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.output = args.output or str(default_output(args.checkpoint, args.fp16))
    try:
        manifest, result = export_bundle(
            args.checkpoint, args.output, opset=args.opset, levels=args.levels, fp16=args.fp16, force=args.force,
            images=args.images, max_images=args.max_images, optimize=not args.no_optimize, atol=args.atol,
            progress=not args.quiet, split=not args.no_split, full=not args.no_full)
    except ValidationFailed as e:
        print(format_table(e.result))
        print(f"error: validation failed, no bundle written: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, BundleError, ImageError, ExportError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(format_table(result))
    size = sum(p.stat().st_size for p in Path(args.output).iterdir() if p.is_file())
    print(f"wrote {args.output} ({len(manifest['levels'])} levels, {manifest['precision']}, {size / 2**20:.1f} MiB, "
          f"{manifest['export']['seconds']:.1f} s; optimization: {manifest['optimization']['applied'] or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
