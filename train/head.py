"""Fit a checkpoint's classifier head on labelled images (a linear probe on the student's own embeddings).

    python -m train.head CKPT --data LABELLED [--split fit] -o OUT.pt [--eval-data LABELLED --eval-split calib]

Distillation gives the student the teacher's head: the teacher's classifier rows, made for the teacher's embeddings.
The student's embeddings only approximate those (cosine about 0.6 for the demo model), so the same rows misread
them. This refits the rows on the student's embeddings of labelled images: multinomial logistic regression over the
embeddings of every level at once (the bundle has one head for all levels), started from the current rows and
pulled back toward them (``--pull``, an L2 penalty on the change). Only the head changes: the tower, its bundle
graphs and the manifest contract stay as they are, so the new checkpoint exports like any other (its gate and int8
ranges are then calibrated on it, as always). Images whose label is not in the head are counted and dropped;
unreadable ones counted and skipped. Nothing is written unless the fit finished.

``--new-head`` builds a head over the data's own labels instead (your classes: any names, not only the teacher's),
its rows started at each class's mean embedding (a nearest-centroid classifier by cosine), then fit the same way.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from model.checkpoint import atomic_torch_save, load_checkpoint
from model.teachers import Head, TeacherError, imagenet_classes
from runtime.cli import ArgumentParser, integer, number, unwritable
from runtime.data import read_image_list, records_digest
from train.evaluate import head_rows, student_embeddings
from train.setup import DistillError, load_set, run_command

DEFAULTS = {"epochs": 20, "lr": 1e-3, "pull": 1e-3, "batch_size": 1024}  # chosen on the demo's held-apart calib split


def head_of(ckpt: dict) -> Head:
    h = ckpt["head"]
    return Head(list(h["class_names"]), h["weight"].float(), h["bias"].float(), float(h["logit_scale"]))


def accuracy(head: Head, embeddings: Sequence[torch.Tensor], target: torch.Tensor) -> list[float]:
    """Top-1 of ``head`` per level's embeddings [N, D] against label rows ``target`` [N]."""
    with torch.no_grad():
        return [float((head.logits(e).argmax(-1) == target).float().mean()) for e in embeddings]


def fit_head(head: Head, embeddings: Sequence[torch.Tensor], target: torch.Tensor, epochs: int = DEFAULTS["epochs"],
             lr: float = DEFAULTS["lr"], pull: float = DEFAULTS["pull"], batch_size: int = DEFAULTS["batch_size"],
             seed: int = 0, progress: bool = False) -> Head:
    """Cross-entropy of ``head`` (weight and bias; the logit scale stays) on the embeddings of every level, Adam from
    the current rows, plus ``pull`` x the squared distance of the weights to them. Deterministic for a seed."""
    w0, b0 = head.weight.detach().float(), head.bias.detach().float()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    x = F.normalize(torch.cat([e.float() for e in embeddings]), dim=-1)
    y = target.repeat(len(embeddings))
    opt = torch.optim.Adam([w, b], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), batch_size):
            j = perm[i:i + batch_size]
            loss = F.cross_entropy(head.logit_scale * x[j] @ w.T + b, y[j]) + pull * (w - w0).square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(j)
        if progress:
            print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}", file=sys.stderr, flush=True)
    return Head(head.class_names, w.detach(), b.detach(), head.logit_scale)


def refit_teacher_head(head: Head, embeddings: torch.Tensor, rows: Sequence[int | None], source: str) -> Head:
    """The teacher's ``head`` refit (``fit_head``'s defaults) on its own ``embeddings`` [N, D] of the images whose
    label is in the head (``rows``: each image's row or None), on the CPU; raises DistillError when none is."""
    keep = [i for i, r in enumerate(rows) if r is not None]
    if not keep:
        raise DistillError(f"--kl-head refit: no image of {source} has a label among the head's classes")
    t0 = time.perf_counter()
    fitted = fit_head(head.to("cpu"), [embeddings[keep].cpu()], torch.tensor([rows[i] for i in keep]))
    print(f"teacher head refit on {len(keep)} labelled images ({time.perf_counter() - t0:.0f} s)", flush=True)
    return fitted


def kl_head_for(kind: str, teacher, head: Head, embeddings: torch.Tensor, labels: Sequence[str], records,
                source: str) -> Head:
    """The head of ``train.distill``'s KL term: ``labels`` (the distillation head), ``imagenet1k`` (the teacher's
    1000 classes) or ``refit`` (``refit_teacher_head`` on the teacher's ``embeddings`` of ``records``)."""
    if kind == "imagenet1k":
        return teacher.head([wnid for _, wnid, _ in imagenet_classes()])
    if kind == "refit":
        return refit_teacher_head(head, embeddings, head_rows(labels, [r.label for r in records]), source)
    return head


def label_rows(head: dict, labels: Sequence[str | None]) -> list[int | None]:
    """Row of each label in a checkpoint head: its label id or class name, else the same ImageNet class under its
    other name (wnid or ImageNet class name); None where the head has no such class."""
    exact = {name: i for i, name in enumerate(head["class_names"])}
    exact.update({label: i for i, label in enumerate(head["labels"])})
    rows = [exact.get(label) if label is not None else None for label in labels]
    missing = [i for i, r in enumerate(rows) if r is None and labels[i] is not None]
    if missing:
        try:
            for i, r in zip(missing, head_rows(head["labels"], [labels[i] for i in missing])):
                rows[i] = r
        except TeacherError:  # a head of classes that are not ImageNet's: exact names only
            pass
    return rows


def new_head(labels: Sequence[str | None], embed_dim: int, logit_scale: float) -> dict:
    """A checkpoint head over the distinct labels (sorted; unlabelled images ignored), rows to be set by
    :func:`centroid_rows`."""
    names = sorted({label for label in labels if label is not None})
    if len(names) < 2:
        raise DistillError(f"--new-head needs labelled images of at least two classes, got {names or 'none'}")
    return {"class_names": names, "labels": names, "weight": torch.zeros(len(names), embed_dim),
            "bias": torch.zeros(len(names)), "logit_scale": logit_scale}


def centroid_rows(embeddings: Sequence[torch.Tensor], target: torch.Tensor, classes: int) -> torch.Tensor:
    """Unit-norm mean embedding of each class over every level [classes, D] (zero for a class without images)."""
    x = F.normalize(torch.cat([e.float() for e in embeddings]), dim=-1)
    sums = torch.zeros(classes, x.shape[1]).index_add_(0, target.repeat(len(embeddings)), x)
    return F.normalize(sums, dim=-1)


def labelled_embeddings(model, ckpt: dict, source: str, split: str | None, limit: int | None, seed: int, what: str
                        ) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """Per-level student embeddings of the images of ``source`` whose label is in the head, their label rows, and
    counts (images, skipped unreadable, dropped: no label in the head)."""
    arrays, records, skipped = load_set(source, split, limit, seed, model.config.preprocessing_spec(), what)
    rows = label_rows(ckpt["head"], [r.label for r in records])
    keep = [i for i, r in enumerate(rows) if r is not None]
    if not keep:
        raise DistillError(f"{what}: no image of {source} has a label in the checkpoint's head "
                           f"(e.g. {records[0].label!r}; the head has {ckpt['head']['class_names'][:3]}, ...)")
    embeddings = student_embeddings(model, arrays[keep], progress=f"{what} embeddings")
    counts = {"images": len(keep), "skipped": skipped, "dropped": len(records) - len(keep),
              "digest": records_digest([records[i] for i in keep])}
    return embeddings, torch.tensor([rows[i] for i in keep]), counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m train.head", description=__doc__.split("\n\n")[0],
                       epilog="Exit status: 0 written, 2 bad input (one-line error, nothing written).")
    p.add_argument("checkpoint", help="WaveCLIP checkpoint whose head to refit")
    p.add_argument("-o", "--out", required=True, type=Path, help="checkpoint to write (the same weights, the new head)")
    p.add_argument("--data", required=True, help="labelled image folder or CSV (labels: class names or wnids)")
    p.add_argument("--new-head", action="store_true",
                   help="a head over the data's own labels (started at the class means), instead of refitting the "
                        "checkpoint's rows")
    p.add_argument("--split", help="rows of the CSV's split column to fit on (e.g. fit)")
    p.add_argument("--limit", type=integer(1), help="a deterministic, class-balanced subset of N images")
    p.add_argument("--eval-data", help="labelled images held apart, to report top-1 before and after")
    p.add_argument("--eval-split", help="the CSV split of --eval-data (e.g. calib)")
    p.add_argument("--eval-limit", type=integer(1), help="evaluate on a class-balanced subset of N images")
    p.add_argument("--epochs", type=integer(1), default=DEFAULTS["epochs"],
                   help=f"passes over the labelled embeddings (default {DEFAULTS['epochs']})")
    p.add_argument("--lr", type=number(below=1, minimum=0), default=DEFAULTS["lr"], help="Adam learning rate")
    p.add_argument("--pull", type=number(minimum=0), default=DEFAULTS["pull"],
                   help="L2 penalty on the change of the head's weights (0: free)")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the batch order and subsets (default 0)")
    p.add_argument("--threads", type=integer(1), help="torch threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.out.exists() and not args.force:
        raise DistillError(f"{args.out} exists (use --force to replace it)")
    if why := unwritable(args.out):  # before the fit, not after it
        raise DistillError(f"cannot write {args.out}: {why}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model, ckpt = load_checkpoint(args.checkpoint)
    if args.new_head:
        labels = [r.label for r in read_image_list(args.data, args.split, args.limit, args.seed)]
        ckpt["head"] = new_head(labels, model.config.embed_dim, float(ckpt["head"]["logit_scale"]))
    emb, target, counts = labelled_embeddings(model, ckpt, args.data, args.split, args.limit, args.seed, "--data")
    if args.new_head:
        ckpt["head"]["weight"] = centroid_rows(emb, target, len(ckpt["head"]["labels"]))
    head = head_of(ckpt)
    held = (labelled_embeddings(model, ckpt, args.eval_data, args.eval_split, args.eval_limit, args.seed,
                                "--eval-data") if args.eval_data else None)
    print(f"fitting the head ({len(head.class_names)} classes) on {counts['images']} images x "
          f"{len(emb)} levels ({counts['dropped']} without a label in the head, {counts['skipped']} unreadable)",
          flush=True)
    new = fit_head(head, emb, target, args.epochs, args.lr, args.pull, seed=args.seed, progress=True)
    report = {"data": args.data, "split": args.split, "limit": args.limit, **counts, "new_head": args.new_head,
              "epochs": args.epochs, "lr": args.lr, "pull": args.pull, "seed": args.seed,
              "fit_top1": {"before": accuracy(head, emb, target), "after": accuracy(new, emb, target)}}
    if held:
        report["held_apart"] = {"data": args.eval_data, "split": args.eval_split, "images": held[2]["images"],
                                "before": accuracy(head, held[0], held[1]), "after": accuracy(new, held[0], held[1])}
    print("| images | " + " | ".join(f"level {k} top-1 before → after" for k in range(len(emb))) + " |")
    print("|---|" + "---|" * len(emb))
    for name, r in (("fit", report["fit_top1"]), ("held apart", report.get("held_apart"))):
        if r:
            print(f"| {name} | " + " | ".join(f"{a:.2%} → {b:.2%}" for a, b in zip(r["before"], r["after"])) + " |")
    ckpt.pop("train_state", None)  # a refit head ends distillation: --resume would restart from the teacher's rows
    ckpt["head"] = {**ckpt["head"], "weight": new.weight.contiguous(), "bias": new.bias.contiguous()}
    report["seconds"] = round(time.time() - start, 1)
    ckpt["provenance"] = {**ckpt.get("provenance", {}), "head_fit": report}
    atomic_torch_save(ckpt, args.out)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
