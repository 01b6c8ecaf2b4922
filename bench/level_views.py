"""What each level can see: the teacher's top-1 on the image detail a cascade has at level k, beside the student's.

    python bench/level_views.py [--bundle models/waveclip-demo/bundle] [--data .../tiny-imagenet-200/labels.csv]
        [--split val] [--limit 2000] [--json OUT]

Levels 0..k of a WaveCLIP tower carry exactly the Haar low-pass band of scale ``dwt_levels - k`` and its details, i.e.
the image averaged over blocks of ``2**(dwt_levels - k)`` pixels: for the 64 px demo model an 8, 16, 32 and 64 px
thumbnail. The teacher is shown each thumbnail resized (bicubic) back to the student's view and then to its own
input, as distillation shows it the student's view (``--teacher-view student``). Its top-1 on level k's thumbnail is
what the teacher does with that information; the student's top-1 at level k (the bundle, fp32 ONNX Runtime) is
printed beside it. It puts the per-level accuracy goals in proportion; it is not a strict bound (a student trained
on the thumbnails may do better than a teacher shown them for the first time). The teacher is not tuned on anything
here, and the student is only evaluated.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.gate import measure_levels  # noqa: E402
from calibration.gate_search import GateError  # noqa: E402
from runtime.errors import BundleError  # noqa: E402
from runtime.backends import BackendError  # noqa: E402
from runtime.cascade import Cascade  # noqa: E402
from runtime.atomic import write_text_atomic  # noqa: E402
from runtime.cli import ArgumentParser, integer, output_file  # noqa: E402
from runtime.data import DataError, load_images, read_image_list  # noqa: E402
from runtime.wavelet import wavedec2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def thumbnail(images: np.ndarray, block: int) -> np.ndarray:
    """uint8 [B, S, S, 3] -> the runtime's Haar low-pass band of scale log2(``block``), per RGB channel, scaled back
    to pixel values (the images averaged over ``block`` x ``block`` blocks): [B, S/block, S/block, 3] float."""
    scale = block.bit_length() - 1
    ll = wavedec2(images.astype(np.float64).transpose(0, 3, 1, 2), scale)[0]
    return ll.transpose(0, 2, 3, 1) / block


def teacher_top1_per_level(teacher_spec: str, arrays: np.ndarray, target: np.ndarray, labels: list[str],
                           spec: dict, batch_size: int = 64) -> list[float]:
    import torch
    from PIL import Image

    from model.teachers import load_teacher
    from train.teacher_cache import teacher_input

    teacher = load_teacher(teacher_spec)
    head = teacher.head(labels)
    size = arrays.shape[1]
    out = []
    dwt_levels = spec["dwt_levels"]
    for level in range(dwt_levels + 1):
        block = 2 ** (dwt_levels - level)
        hits = []
        for i in tqdm(range(0, len(arrays), batch_size), desc=f"teacher, level {level} ({size // block} px)",
                      file=sys.stderr):
            thumbs = np.clip(np.rint(thumbnail(arrays[i:i + batch_size], block)), 0, 255).astype(np.uint8)
            views = [Image.fromarray(t).resize((size, size), Image.BICUBIC) for t in thumbs]
            with torch.no_grad():  # the student-view teacher input of distillation
                logits = head.logits(teacher.encode_image(teacher_input(teacher, views, spec)))
            hits.append(logits.argmax(1).numpy() == target[i:i + batch_size])
        out.append(float(np.concatenate(hits).mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/level_views.py", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "waveclip-demo" / "bundle")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tiny-imagenet-200" / "labels.csv"))
    p.add_argument("--split", default="val", help="rows of the CSV's split column ('all': every row)")
    p.add_argument("--limit", type=integer(1), default=2000)
    p.add_argument("--teacher", default="efficientnet-lite0")
    p.add_argument("--json", type=output_file, help="write the numbers here")
    args = p.parse_args(argv)

    try:
        cascade = Cascade(args.bundle)
        records = read_image_list(args.data, split=None if args.split == "all" else args.split, limit=args.limit)
        stats = measure_levels(cascade, records, progress=True)
    except (BundleError, BackendError, DataError, GateError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if stats.target is None or not stats.n:
        print(f"error: {args.data}: no image with a label in the bundle's head", file=sys.stderr)
        return 2
    spec = cascade.bundle.preprocessing
    col = {lab: j for j, lab in enumerate(cascade.bundle.labels)}
    measured = set(stats.paths)  # readable, with a label in the head
    arrays, kept, _ = load_images([r for r in records if str(r.path) in measured], spec)
    target = np.array([col[r.label] for r in kept])
    teacher = teacher_top1_per_level(args.teacher, arrays, target, cascade.bundle.labels, spec)
    student = [float(stats.correct[k].mean()) for k in range(stats.levels)]
    rows = [{"level": k, "pixels": spec["image_size"] >> (spec["dwt_levels"] - k), "teacher_top1": teacher[k],
             "student_top1": student[k], "student_over_teacher": student[k] / teacher[k] if teacher[k] else None}
            for k in range(stats.levels)]
    print(f"\n{len(kept)} images of {args.data} split={args.split}; teacher {args.teacher}; student {args.bundle}")
    print("| level | detail the level holds | teacher top-1 on it | student top-1 | student / teacher |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = "n/a" if r["student_over_teacher"] is None else f"{100 * r['student_over_teacher']:.0f}%"
        print(f"| {r['level']} | {r['pixels']} px | {100 * r['teacher_top1']:.1f}% | {100 * r['student_top1']:.1f}% | "
              f"{ratio} |")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
