"""Accuracy tables for a bundle on held-apart labelled images: teacher, student per level, cascade, fp32 vs int8.

    python bench/evaluate.py [--bundle models/waveclip-demo/bundle] [--int8 models/waveclip-demo/bundle-int8]
        [--data ../shared/data/tiny-imagenet-200/labels.csv --split val --limit 2000] [--json OUT] [--markdown OUT]

Every number comes from running the bundle's graphs (ONNX Runtime / OpenVINO) and the teacher on the same images,
with the bundle's label set. Cascade points are simulated exactly from the per-level predictions and margins
(the cascade's decision for an image depends only on them), which `tests/test_gate.py` checks against `Cascade`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.gate import measure_levels  # noqa: E402
from calibration.gate_search import LevelStats, simulate  # noqa: E402
from runtime.cascade import Cascade  # noqa: E402
from runtime.atomic import write_text_atomic  # noqa: E402
from runtime.cli import ArgumentParser, integer, output_file  # noqa: E402
from runtime.data import read_image_list  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "waveclip-demo"
THRESHOLDS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.01]


def teacher_top1(spec: str, bundle, records, batch_size: int = 64) -> float:
    """Teacher's top-1 over the bundle's label set on the same images (its own preprocessing)."""
    import torch
    from PIL import Image

    from model.teachers import load_teacher

    teacher = load_teacher(spec)
    head = teacher.head(bundle.labels)
    col = {lab: j for j, lab in enumerate(bundle.labels)}
    hits = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        with torch.no_grad():
            logits = head.logits(teacher.encode_image(teacher.preprocess([Image.open(r.path) for r in chunk])))
        hits += list((logits.argmax(1).numpy() == np.array([col[r.label] for r in chunk])))
    return float(np.mean(hits))


def level_table(name: str, stats: LevelStats) -> list[dict]:
    return [{"model": name, "level": k, "top1": float(stats.correct[k].mean()),
             "cumulative_gflops": float(stats.cum_gflops[k])} for k in range(stats.levels)]


def main() -> int:
    p = ArgumentParser(prog="python bench/evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=DEMO / "bundle", help="fp32 bundle (default the shipped demo's)")
    p.add_argument("--int8", type=Path, help="int8 bundle (onnxruntime QDQ; default the shipped demo's)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tiny-imagenet-200" / "labels.csv"),
                   help="labelled images: a folder or CSV (default Tiny-ImageNet's labels.csv)")
    p.add_argument("--split", default="val", help="CSV split (default val)")
    p.add_argument("--limit", type=integer(1), default=2000, help="images, a class-balanced spread (default 2000)")
    p.add_argument("--teacher", help="teacher spec (default: the one named in the bundle's export provenance)")
    p.add_argument("--no-openvino", action="store_true", help="onnxruntime rows only")
    p.add_argument("--json", type=output_file, help="also write the numbers here")
    p.add_argument("--markdown", type=output_file, help="also write the tables here")
    args = p.parse_args()
    if args.int8 is not None and not args.int8.exists():  # the default is skipped where absent, a given one is not
        p.error(f"--int8 {args.int8}: no such bundle folder")
    args.int8 = args.int8 or DEMO / "bundle-int8"

    t0 = time.time()
    records = read_image_list(args.data, split=args.split, limit=args.limit)
    fp32 = Cascade(args.bundle)
    manifest = fp32.bundle.manifest
    runs = {"fp32 onnxruntime": measure_levels(fp32, records, progress=True)}
    if args.int8.exists():
        runs["int8 onnxruntime"] = measure_levels(Cascade(args.int8), records, progress=True)
    if not args.no_openvino:
        runs["fp32 openvino"] = measure_levels(Cascade(args.bundle, backend="openvino"), records, progress=True)
        if args.int8.exists():
            runs["int8 openvino (QDQ graphs)"] = measure_levels(Cascade(args.int8, backend="openvino"), records,
                                                                progress=True)
    ref = runs["fp32 onnxruntime"]
    teacher = args.teacher or manifest.get("export", {}).get("teacher")
    kept = [r for r in records if str(r.path) in set(ref.paths)]
    out = {
        "data": f"{args.data} split={args.split} ({ref.n} images, {ref.skipped} unreadable, {ref.dropped} not in head)",
        "labels": len(fp32.bundle.labels),
        "teacher": teacher,
        "teacher_top1": teacher_top1(teacher, fp32.bundle, kept) if teacher else None,
        "levels": [row for name, s in runs.items() for row in level_table(name, s)],
        "cascade": [{"thresholds": [t] * (ref.levels - 1), **simulate(ref, [t] * (ref.levels - 1))}
                    for t in THRESHOLDS],
        "calibrated": {"thresholds": manifest["gate"]["thresholds"], "source": manifest["gate"]["source"],
                       **simulate(ref, manifest["gate"]["thresholds"])},
        "agreement_vs_fp32": {name: [float((s.pred[k] == ref.pred[k]).mean()) for k in range(ref.levels)]
                              for name, s in runs.items() if name != "fp32 onnxruntime"},
        "seconds": round(time.time() - t0, 1),
    }
    md = render(out, runs)
    print(md)
    if args.markdown:
        write_text_atomic(args.markdown, md)
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=2) + "\n")
    return 0


def render(out: dict, runs: dict[str, LevelStats]) -> str:
    lines = [f"Data: {out['data']}; label set: {out['labels']} classes.", ""]
    if out["teacher_top1"] is not None:
        lines += [f"Teacher `{out['teacher']}` top-1: **{100 * out['teacher_top1']:.1f}%**", ""]
    names = list(runs)
    levels = next(iter(runs.values())).levels
    lines += ["| always exit at level | GFLOPs | " + " | ".join(f"top-1 {n}" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for k in range(levels):
        row = [f"{100 * runs[n].correct[k].mean():.1f}%" for n in names]
        lines.append(f"| {k} | {runs[names[0]].cum_gflops[k]:.3f} | " + " | ".join(row) + " |")
    lines += ["", "| gate thresholds | accuracy | agreement with full | expected GFLOPs | compute saved | exits per level |",
              "|---|---|---|---|---|---|"]
    for row in out["cascade"] + [dict(out["calibrated"], calibrated=True)]:
        t = "calibrated " + ", ".join(f"{x:.3f}" for x in row["thresholds"]) if row.get("calibrated") \
            else f"{row['thresholds'][0]:g} (all levels)"
        lines.append(f"| {t} | {100 * row['accuracy']:.1f}% | {100 * row['agreement']:.1f}% | "
                     f"{row['expected_gflops']:.3f} | {100 * row['compute_saved']:.0f}% | {row['exit_histogram']} |")
    if out["agreement_vs_fp32"]:
        lines += ["", "| top-1 agreement with fp32 onnxruntime | " + " | ".join(f"level {k}" for k in range(levels))
                  + " |", "|---|" + "---|" * levels]
        for name, agree in out["agreement_vs_fp32"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}%" for a in agree) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
