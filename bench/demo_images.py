"""The example images against the teacher: is each image's class in the bundle's head, does the teacher name it on
the student's own pixels (the rule that picks ``examples/images``), and what does the student say?

    python bench/demo_images.py [--bundle models/waveclip-demo/bundle] [--labels examples/images/labels.csv]
        [--teacher efficientnet-lite0]

``--labels``: a CSV with ``file`` (beside the CSV) and ``wnid`` (empty: no ImageNet class, e.g. an astronaut). Prints
one markdown row per image: its class, the teacher's top-1 over the head on the file and on the student's view (its
64 px crop resized whole to the teacher's input), the student's label at every level and the gated cascade's.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.cascade import Cascade  # noqa: E402
from runtime.cli import ArgumentParser  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def teacher_labels(spec: str, class_names: list[str], labels: list[str], paths: list[Path], student_view: dict
                   ) -> tuple[list[str], list[str]]:
    """The teacher's top-1 class name over the head, on each file (its own preprocessing) and on the student's view."""
    import torch
    from PIL import Image

    from model.teachers import load_teacher
    from train.teacher_cache import teacher_input

    teacher = load_teacher(spec)
    head = teacher.head(labels)
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        native, student = (head.logits(teacher.encode_image(teacher_input(teacher, images, view))).argmax(1)
                           for view in (None, student_view))
    return [class_names[i] for i in native.tolist()], [class_names[i] for i in student.tolist()]


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/demo_images.py", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "waveclip-demo" / "bundle")
    p.add_argument("--labels", type=Path, default=REPO / "examples" / "images" / "labels.csv")
    p.add_argument("--teacher", default="efficientnet-lite0")
    args = p.parse_args(argv)
    try:
        rows = list(csv.DictReader(open(args.labels, newline="")))
        cascade = Cascade(args.bundle)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bundle = cascade.bundle
    name_of = dict(zip(bundle.labels, bundle.class_names))
    paths = [args.labels.parent / r["file"] for r in rows]
    native, student_view = teacher_labels(args.teacher, bundle.class_names, bundle.labels, paths,
                                          bundle.manifest["preprocessing"])
    per_level = [cascade.probabilities(e).argmax(1) for e in cascade.run_all_levels(cascade.preprocess(paths))]
    gated = cascade.classify(paths)
    print("| image | class (in head?) | teacher on the file | teacher on the student's view | student L0 / ... / L"
          f"{bundle.num_levels - 1} | cascade (exit level) |")
    print("|---|---|---|---|---|---|")
    right = []
    for i, (row, path) in enumerate(zip(rows, paths)):
        truth = name_of.get(row["wnid"], "")
        shown = truth or (f"{row['wnid']} (not in head)" if row["wnid"] else "none")
        levels = " / ".join(bundle.class_names[top[i]] for top in per_level)
        print(f"| {path.name} | {shown} | {native[i]} | {student_view[i]} | {levels} | "
              f"{gated[i].class_name} ({gated[i].exit_level}) |")
        if truth and student_view[i] == truth:
            right.append(gated[i].class_name == truth)
    print(f"\nimages whose class is in the head and that the teacher names on the student's view: {len(right)}; "
          f"the cascade names {sum(right)} of them")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
