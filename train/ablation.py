"""Ablation of the distillation recipe: each lever switched on in turn, same data, steps, seed and held-out images.

    python -m train.ablation [--work out/demo-work] [--steps 300] [--eval-limit 1000]
        [--variants baseline,kl1000,dense,dense_kl1000,native_view,default,patch_mlp,fine_grid,fp32,teacher_bf16]

Runs ``train.distill`` once per variant on the demo recipe's distillation list (``train.recipe_demo`` writes it),
evaluates per-level cosine and top-1 on 1,000 images (``--eval-limit``) of the held-apart ``calib`` split (never
Tiny-ImageNet val), and prints a markdown table (lever, top-1 per level, cosine per level, minutes of student
training). Teacher outputs come from the shared cache, so only the first run pays the teacher pass.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from runtime.cli import ArgumentParser, integer, output_file

REPO = Path(__file__).resolve().parents[1]
NO_NORM = ["--no-patch-norm"]
NATIVE = ["--teacher-view", "native"]  # the teacher on the full-resolution file, as before the student view
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("pooled cosine + KL over the 202 head classes (the old recipe), bf16",
                 ["--dense-weight", "0", "--kl-head", "labels", *NO_NORM, *NATIVE]),
    "kl1000": ("+ KL over all 1000 teacher classes",
               ["--dense-weight", "0", "--kl-head", "imagenet1k", *NO_NORM, *NATIVE]),
    "dense": ("+ dense token loss (202-class KL)", ["--dense-weight", "1", "--kl-head", "labels", *NO_NORM, *NATIVE]),
    "dense_kl1000": ("+ dense + 1000-class KL", [*NO_NORM, *NATIVE]),
    "native_view": ("+ dense + 1000-class KL + per-level patch standardisation, teacher on the full-resolution file",
                    NATIVE),
    "default": ("+ the teacher seeing the student's exact pixels (--teacher-view student; the default)", []),
    "patch_mlp": ("+ a two-layer patch embedding (Linear, GELU, Linear through 384 units) at every level",
                  ["--patch-hidden", "384"]),
    "fine_grid": ("+ the finest level on an 8x8 grid (64 tokens of 144 values instead of 16 of 576; "
                  "--level-grids 4,4,4,8)", ["--patch-hidden", "384", "--level-grids", "4,4,4,8"]),
    "fp32": ("the default in fp32 (speed reference)", ["--precision", "fp32"]),
    "teacher_bf16": ("+ the two-layer patch embedding, the teacher pass in bf16 (OpenVINO; --teacher-backend "
                     "openvino-bf16)", ["--patch-hidden", "384", "--teacher-backend", "openvino-bf16"]),
}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    out = args.work / "ablation" / f"{name}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    splits = args.work / "tiny-imagenet-splits.csv"
    cmd = [sys.executable, "-m", "train.distill", "--teacher", "efficientnet-lite0",
           "--data", str(args.work / "distill.csv"), "--preset", "waveclip-demo", "--out", str(out),
           "--steps", str(args.steps), "--threads", str(args.threads), "--save-every", "0", "--seed", "0",
           "--eval-data", str(splits), "--eval-split", "calib", "--eval-limit", str(args.eval_limit),
           *VARIANTS[name][1]]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    prov = torch.load(out, map_location="cpu", weights_only=True)["provenance"]
    ev = prov["eval"]
    return {"variant": name, "lever": VARIANTS[name][0], "steps": prov["steps"], "top1": ev["student_top1"],
            "cosine": ev["cosine"], "teacher_top1": ev["teacher_top1"], "minutes": round(prov["train_seconds"] / 60, 1),
            "images_per_s": prov["images_per_s"], "precision": prov["precision"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| lever | top-1 L0 / L1 / L2 / L3 | cosine L0 / L3 | student minutes (img/s) |", "|---|---|---|---|"]
    for r in rows:
        top1 = " / ".join(f"{100 * x:.1f}%" for x in r["top1"])
        lines.append(f"| {r['lever']} | {top1} | {r['cosine'][0]:.3f} / {r['cosine'][-1]:.3f} | "
                     f"{r['minutes']} ({r['images_per_s']:.0f}) |")
    if rows:
        lines.append(f"\nteacher top-1 on the same images: {100 * rows[0]['teacher_top1']:.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.ablation", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / "out" / "demo-work",
                   help="the demo recipe's work folder, with its distill.csv (default out/demo-work)")
    p.add_argument("--steps", type=integer(1), default=300, help="student steps per variant (default 300)")
    p.add_argument("--threads", type=integer(1), default=2, help="torch threads (default 2)")
    p.add_argument("--eval-limit", type=integer(1), default=1000, help="calib images to evaluate on (default 1000)")
    p.add_argument("--variants", default="baseline,kl1000,dense,dense_kl1000,native_view,default",
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default the first six)")
    p.add_argument("--json", type=output_file, help="also write the rows here")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        why = f"unknown {', '.join(unknown)}" if unknown else "none given"
        print(f"error: --variants {args.variants!r}: {why} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    if not (args.work / "distill.csv").is_file():
        print(f"error: {args.work}/distill.csv not found: run `python -m train.recipe_demo` first", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        try:
            rows.append(run_variant(name, args))
        except subprocess.CalledProcessError as e:  # train.distill printed its own error above
            print(f"error: variant {name}: train.distill exited {e.returncode}", file=sys.stderr)
            return 1
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print("\n" + markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
