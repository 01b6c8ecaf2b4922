"""The same head fit for the teacher: how much of the student's gain from ``train.head`` is the labels' alone?

    python bench/teacher_head_fit.py [--data out/demo-work/tiny-imagenet-splits.csv --split fit]
        [--eval-data ../shared/data/tiny-imagenet-200/labels.csv --eval-split val --eval-limit 2000]

``train.head`` refits the student's classifier rows on labelled images; a teacher given the same fit (same images,
same rule and defaults, started from its own rows) gains too. This prints the teacher's top-1 on the held-out images
with its own rows and with refit ones, so that student / teacher ratios can compare like with like. The teacher sees
each image as ``bench/evaluate.py`` shows it (its own preprocessing of the file).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.teachers import load_teacher  # noqa: E402
from runtime.atomic import write_text_atomic  # noqa: E402
from runtime.cli import ArgumentParser, integer, output_file  # noqa: E402
from runtime.data import read_image_list  # noqa: E402
from train.head import DEFAULTS, accuracy, fit_head, label_rows  # noqa: E402
from train.teacher_onnx import onnx_encoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def embeddings(teacher, records, batch_size: int = 64) -> torch.Tensor:
    """Teacher embeddings through ONNX Runtime (``train.teacher_onnx``: parity-checked against torch, as distillation
    runs it)."""
    out, encode = [], None
    for i in tqdm(range(0, len(records), batch_size), unit="batch", file=sys.stderr):
        pixels = teacher.preprocess([Image.open(r.path).convert("RGB") for r in records[i:i + batch_size]])
        if encode is None:
            encode, _ = onnx_encoder(teacher, pixels)
        out.append(encode(pixels)[0].float())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/teacher_head_fit.py", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="efficientnet-lite0")
    p.add_argument("--labels-from", type=Path, default=REPO / "models" / "waveclip-demo" / "bundle",
                   help="bundle whose label set is the head (default: the demo's)")
    p.add_argument("--data", default=str(REPO / "out" / "demo-work" / "tiny-imagenet-splits.csv"))
    p.add_argument("--split", default="fit", help="CSV split to fit on (all: every row)")
    p.add_argument("--limit", type=integer(1))
    p.add_argument("--eval-data", default=str(REPO.parent / "shared" / "data" / "tiny-imagenet-200" / "labels.csv"))
    p.add_argument("--eval-split", default="val", help="CSV split held out (all: every row)")
    p.add_argument("--eval-limit", type=integer(1), default=2000)
    p.add_argument("--json", type=output_file, help="write the numbers here")
    args = p.parse_args(argv)

    from runtime.bundle import load_bundle

    t0 = time.time()
    bundle = load_bundle(args.labels_from)
    teacher = load_teacher(args.teacher)
    head = teacher.head(bundle.labels)
    names = {"class_names": list(bundle.class_names), "labels": list(bundle.labels)}
    sets = {}
    for name, (data, split, limit) in {"fit": (args.data, args.split, args.limit),
                                       "held out": (args.eval_data, args.eval_split, args.eval_limit)}.items():
        records = read_image_list(data, split=None if split == "all" else split, limit=limit)
        rows = label_rows(names, [r.label for r in records])
        records = [r for r, row in zip(records, rows) if row is not None]
        sets[name] = (embeddings(teacher, records), torch.tensor([row for row in rows if row is not None]))
    new = fit_head(head, [sets["fit"][0]], sets["fit"][1])
    out = {"teacher": args.teacher, "fit": f"{args.data} split={args.split} ({len(sets['fit'][1])} images)",
           "held_out": f"{args.eval_data} split={args.eval_split} ({len(sets['held out'][1])} images)",
           "head_fit": DEFAULTS,
           "top1_own_rows": accuracy(head, [sets["held out"][0]], sets["held out"][1])[0],
           "top1_refit_rows": accuracy(new, [sets["held out"][0]], sets["held out"][1])[0],
           "fit_top1_own_rows": accuracy(head, [sets["fit"][0]], sets["fit"][1])[0],
           "fit_top1_refit_rows": accuracy(new, [sets["fit"][0]], sets["fit"][1])[0],
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
