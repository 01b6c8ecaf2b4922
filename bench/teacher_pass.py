"""How fast does each backend run the teacher pass of ``train.distill``? The real pass (``teacher_targets``: decode,
the student's view, the teacher, its dense map pooled to the grid), into a fresh temporary cache each time, rounds
interleaved, with the largest difference between the backends' cached targets.

    python bench/teacher_pass.py --data out/demo-work/tiny-imagenet-splits.csv --split calib --limit 1024 \
        [--backends onnxruntime,openvino] [--rounds 2] [--teacher efficientnet-lite0] [--preset waveclip-demo]

Measure on a quiet machine: the figures are images per second, and the ratio is to the first backend.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import get_preset  # noqa: E402
from model.teachers import load_teacher  # noqa: E402
from runtime.cli import ArgumentParser, integer  # noqa: E402
from train.setup import load_set  # noqa: E402
from train.teacher_cache import TeacherTargets, teacher_targets  # noqa: E402
from train.teacher_onnx import BACKENDS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/teacher_pass.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder or CSV (as train.distill's --data)")
    p.add_argument("--split", help="that CSV's split to use")
    p.add_argument("--limit", type=integer(1), default=1024, help="images per pass")
    p.add_argument("--backends", default="onnxruntime,openvino", help=f"comma-separated, of {', '.join(BACKENDS)}")
    p.add_argument("--rounds", type=integer(1), default=2)
    p.add_argument("--teacher", default="efficientnet-lite0")
    p.add_argument("--preset", default="waveclip-demo", help="the student whose view and grid the teacher serves")
    p.add_argument("--threads", type=integer(1), default=2)
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if not backends or any(b not in BACKENDS for b in backends):
        p.error(f"--backends: choose from {', '.join(BACKENDS)}")
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    spec = cfg.preprocessing_spec()
    _, records, skipped = load_set(args.data, args.split, args.limit, 0, spec, "data")
    teacher = load_teacher(args.teacher)
    speed: dict[str, list[float]] = {b: [] for b in backends}
    first: dict[str, TeacherTargets] = {}
    ran: dict[str, str] = {}
    for _ in range(args.rounds):
        for b in backends:
            with tempfile.TemporaryDirectory(prefix="waveclip-teacher-bench-") as folder:
                targets, stats = teacher_targets(teacher, records, folder, flip=False, dense_grid=cfg.grid,
                                                 student_view=spec, backend=b, progress=False)
            speed[b].append(stats["images_per_s"])
            first.setdefault(b, targets)
            ran[b] = stats["backend"]
    base = max(speed[backends[0]])
    print(f"teacher {args.teacher}, {len(records)} images ({skipped} skipped), {args.threads} threads, "
          f"{args.rounds} rounds interleaved")
    for b in backends:
        ref = first[backends[0]]
        diff = max((first[b].emb.float() - ref.emb.float()).abs().max().item(),
                   0.0 if ref.dense is None else (first[b].dense.float() - ref.dense.float()).abs().max().item())
        print(f"{b:12s} (ran: {ran[b]:11s}) images/s {', '.join(f'{s:.1f}' for s in speed[b])}  "
              f"best {max(speed[b]) / base:.2f}x  max |target - {backends[0]}'s| {diff:.4f}")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
