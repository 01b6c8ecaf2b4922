"""Distil a teacher into a WaveCLIP tower, all levels jointly.

    python -m train.distill --teacher efficientnet-lite0 --data DIR_OR_CSV [--split train] --preset waveclip-demo \\
        --out ckpt.pt [--epochs E | --steps S] [--eval-data DIR_OR_CSV --eval-split val]

Loss = weighted mean over levels of (1 - cos(student level k, teacher)) + kl_weight * KL(teacher || student class
softmax at temperature T) through a teacher head (default: all 1000 ImageNet classes) + dense_weight * the mean
cosine distance of the level's patch tokens to the teacher's feature map at their grid cell (``train.dense``).
Teacher outputs are cached on disk (``--teacher-views 1``: the image only, its mirror reuses them with the map's
columns reversed; 2: the mirror is run too); ``--aug-views K`` adds K cached random-resized, colour-jittered
views per image (``train.augment``), each step drawing the plain image or one of them; ``--cutmix P`` pastes
token-aligned boxes between images with mixed cached targets (``train.mix``); ``--label-weight W`` adds a
cross-entropy on the labels of the images that have one (off by default); student inputs come from
``runtime.preprocess`` / ``runtime.wavelet``, the code the device runs. ``--teacher-view student`` (the default) shows
the teacher those same pixels, resized to its input. ``--precision auto`` trains under bf16 autocast where the CPU
(AVX512-BF16/AMX) or GPU has native bf16, else fp32.
Initialisation rule: a student whose width, depth and heads equal the teacher ViT's starts from its weights
(``WaveCLIP.init_from_vit``); presets in ``REQUIRES_VIT_INIT`` (waveclip-b16) refuse any other teacher.
Batches, views and flips are a pure function of (seed, step), so ``--resume`` continues exactly where ``--out`` stopped.
"""
from __future__ import annotations

import argparse
import collections
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import read_checkpoint, save_checkpoint
from model.config import WaveCLIPConfig, get_preset
from model.teachers import Head, Teacher, TeacherError, load_teacher
from model.waveclip import WaveCLIP
from runtime.data import read_image_list, records_digest
from runtime.wavelet import images_to_levels
from train.evaluate import evaluate, head_rows
from train.head import kl_head_for
from train.setup import (DistillError, batch_at, choose_labels, init_from_checkpoint, init_student,
                         level_weights, load_set, param_groups, run_command, set_patch_stats, use_bf16)
from train.augment import Augment
from train.dense import DenseHead, channel_stats, mirror_grid, pool_grid
from train.losses import distill_loss, entropy_loss, label_loss, lr_at, self_distill_loss
from train.mix import cutmix
from train.distill_args import LR_SCRATCH, LR_VIT_INIT, parse_args
from train.teacher_cache import default_cache_dir, teacher_embeddings, teacher_targets, with_augmented_views

CACHE_STATS = ("key", "computed", "seconds", "images_per_s", "backend")  # of a teacher pass, kept in the provenance
LOSS_WINDOW = 50  # steps averaged into the reported final losses


def _plain(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _report_teacher(stats: dict, views: str) -> None:
    if stats["computed"]:
        print(f"teacher ({stats['backend']}): {stats['computed']} images x {views} in {stats['seconds']:.1f} s, "
              f"{stats['images_per_s']} images/s", flush=True)


# --- training -----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, stop_after: int | None = None) -> dict:
    """Distil as ``args`` say; returns the provenance saved in the checkpoint. ``stop_after`` ends this run after
    that many steps with a resumable checkpoint, as an interruption would (for tests)."""
    t_run = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        base_cfg = get_preset(args.preset)
        if args.patch_hidden is not None:
            base_cfg = base_cfg.replace(patch_hidden=args.patch_hidden)
        if args.level_grids:
            base_cfg = base_cfg.replace(level_grids=args.level_grids)
    except ValueError as e:
        raise DistillError(str(e)) from None
    if args.eval_data:
        read_image_list(args.eval_data, args.eval_split, args.eval_limit, args.seed)  # fail early
    resume = read_checkpoint(args.out) if args.resume and args.out.exists() else None
    if args.resume and resume is None:
        print(f"--resume: no checkpoint at {args.out} yet, starting from {args.init or 'scratch'}", flush=True)
    if resume is not None and ("train_state" not in resume or resume["teacher"] != args.teacher
                               or resume["config"]["name"] != args.preset):
        raise DistillError(f"--resume: {args.out} was not trained with teacher {args.teacher} and preset "
                           f"{args.preset} (or has no train_state)")
    resumed_cfg = None if resume is None else WaveCLIPConfig.from_dict(resume["config"])
    if resumed_cfg is not None and resumed_cfg.replace(embed_dim=base_cfg.embed_dim) != base_cfg:  # before the data
        raise DistillError(f"--resume: {args.out} holds another student layout (e.g. --patch-hidden) than asked")
    start = None if resume is not None or args.init is None else read_checkpoint(args.init)  # --init: fail early

    spec = base_cfg.preprocessing_spec()  # embed_dim does not change the preprocessing
    arrays, kept, n_skipped = load_set(args.data, args.split, args.limit, args.seed, spec, "data")

    torch.manual_seed(args.seed)
    teacher = load_teacher(args.teacher, args.device)
    cfg = base_cfg.replace(embed_dim=teacher.embed_dim)
    torch.manual_seed(args.seed)
    model, init = init_student(cfg, teacher, args.preset)
    if start is not None:
        init, regrid = init_from_checkpoint(model, start, args.init, args.teacher, args.preset)
        if regrid and args.patch_norm:
            set_patch_stats(model, arrays, spec, levels=regrid)
    elif args.patch_norm and resume is None:
        set_patch_stats(model, arrays, spec)
    labels = choose_labels(args.labels, kept, str(args.data))
    try:
        head = teacher.head(labels)
    except TeacherError as e:
        raise DistillError(f"{e} (use --labels imagenet1k or a file of ImageNet wnids/class names)") from None
    weights = level_weights(args.level_weights, cfg.num_levels)
    label_rows = None
    if args.label_weight:
        label_rows = torch.tensor([-1 if r is None else r for r in head_rows(labels, [k.label for k in kept])])
        if not bool((label_rows >= 0).any()):
            raise DistillError(f"--label-weight: no image of {args.data} has a label among the head's classes")
    if args.lr is None:
        args.lr = LR_SCRATCH if init == "scratch" and args.init is None else LR_VIT_INIT  # --init: also on --resume

    digest = records_digest(kept)
    cache_dir = args.cache_dir or default_cache_dir()
    student_view = spec if args.teacher_view == "student" else None
    targets, tstats = teacher_targets(teacher, kept, cache_dir, flip=args.teacher_views == 2,
                                      dense_grid=cfg.grid,  # maps cached whatever the weight: one cache
                                      batch_size=args.teacher_batch_size, student_view=student_view,
                                      backend=args.teacher_backend)
    _report_teacher(tstats, f"{args.teacher_views} view(s)")
    dense_stats = None if targets.dense is None else channel_stats(targets.dense)  # of the plain views, as before
    pixels, astats = None, None
    if args.aug_views:
        targets, pixels, astats = with_augmented_views(
            teacher, kept, targets, arrays, cache_dir, Augment(args.aug_views, args.seed, spec), dense_grid=cfg.grid,
            batch_size=args.teacher_batch_size, student_view=student_view, backend=args.teacher_backend)
        _report_teacher(astats, f"{args.aug_views} augmented view(s)")
    temb = targets.emb
    if args.dense_weight > 0 and targets.dense is None:
        raise DistillError(f"--dense-weight {args.dense_weight}: teacher {args.teacher} has no spatial feature map "
                           "(use --dense-weight 0)")

    n, device = len(kept), torch.device(args.device)
    bsz = min(args.batch_size, n)
    per_epoch = max(1, n // bsz)
    total = args.steps if args.steps is not None else math.ceil((args.epochs or 1.0) * per_epoch)
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * total))
    model.to(device).train()
    head_dev = head.to(device)
    if args.kl_head == "auto":
        args.kl_head = "labels" if args.teacher.startswith("open_clip:") else "imagenet1k"
    kl_head = head_dev if args.kl_weight == 0 else kl_head_for(args.kl_head, teacher, head, temb[:, 0], labels, kept,
                                                                 str(args.data)).to(device)
    dense_head, dense_mean, dense_std = None, None, None
    if targets.dense is not None and args.dense_weight > 0:
        torch.manual_seed(args.seed)
        dense_head = DenseHead(cfg.width, targets.dense.shape[-1]).to(device).train()
        if start is not None and "dense_head" in start.get("train_state", {}):
            dense_head.load_state_dict(start["train_state"]["dense_head"])
        dense_mean, dense_std = (t.to(device) for t in dense_stats)
    bf16 = use_bf16(args.precision, device)
    modules = [model] + ([dense_head] if dense_head is not None else [])
    opt = torch.optim.AdamW(param_groups(modules, args.weight_decay), lr=args.lr)
    step, prior_wall, prior_train, images_seen = 0, 0.0, 0.0, 0
    if resume is not None:
        state = resume["train_state"]
        if state["data_digest"] != digest:
            raise DistillError(f"--resume: the images of {args.data} differ from those {args.out} was trained on")
        model.load_state_dict(resume["state_dict"])
        if dense_head is not None:
            if "dense_head" not in state:
                raise DistillError(f"--resume: {args.out} was trained without the dense loss")
            dense_head.load_state_dict(state["dense_head"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, prior_wall, prior_train = state["step"], state["wall_time_s"], state["train_seconds"]
        images_seen, init = state["images_seen"], resume["provenance"].get("init", init)
        print(f"resumed {args.out} at step {step}", flush=True)

    window: collections.deque = collections.deque(maxlen=LOSS_WINDOW)
    for entry in (resume or {}).get("train_state", {}).get("loss_window", []):
        window.append(entry)
    head_dict = {"class_names": head.class_names, "labels": labels, "weight": head.weight, "bias": head.bias,
                 "logit_scale": head.logit_scale}
    train_seconds, seen_now = 0.0, 0

    def provenance(eval_result: dict | None = None) -> dict:
        mean = np.mean([w for w in window], axis=0).tolist() if window else None
        L = cfg.num_levels
        secs = prior_train + train_seconds
        prov = {
            "teacher": args.teacher, "teacher_embed_dim": teacher.embed_dim, "init": init, "preset": args.preset,
            "data": {"source": str(args.data), "split": args.split, "limit": args.limit, "images": n,
                     "skipped": n_skipped, "digest": digest},
            "labels": {"source": args.labels or "default", "count": len(labels)},
            "teacher_cache": {k: tstats[k] for k in CACHE_STATS},
            "aug_views": args.aug_views, "cutmix": args.cutmix, "label_weight": args.label_weight,
            "self_weight": args.self_weight, "entropy_weight": args.entropy_weight,
            "labelled": None if label_rows is None else int((label_rows >= 0).sum()),
            "aug_cache": None if astats is None else {k: astats[k] for k in CACHE_STATS},
            "steps": step, "epochs": round(step * bsz / n, 3), "batch_size": bsz, "lr": args.lr,
            "weight_decay": args.weight_decay, "warmup": warmup, "kl_weight": args.kl_weight,
            "kl_head": args.kl_head, "temperature": args.temperature, "dense_weight": args.dense_weight,
            "teacher_views": args.teacher_views, "teacher_view": args.teacher_view, "patch_norm": args.patch_norm,
            "precision": "bf16" if bf16 else "fp32",
            "level_weights": weights, "seed": args.seed, "device": str(device),
            "threads": torch.get_num_threads(), "wall_time_s": round(prior_wall + time.perf_counter() - t_run, 2),
            "train_seconds": round(secs, 2), "images_seen": images_seen,
            "images_per_s": round(images_seen / secs, 2) if secs else None,
            "final_losses": None if mean is None else {
                "total": round(mean[0], 5), "cosine": [round(x, 5) for x in mean[1:1 + L]],
                "kl": [round(x, 5) for x in mean[1 + L:1 + 2 * L]], "dense": [round(x, 5) for x in mean[1 + 2 * L:]]},
            "torch": str(torch.__version__), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m train.distill " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("distill.py") else None,
        }
        if eval_result is not None:
            prov["eval"] = eval_result
        return prov

    def save(eval_result: dict | None = None) -> dict:
        prov = provenance(eval_result)
        state = {"step": step, "total_steps": total, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                 "args": _plain(args), "data_digest": digest, "wall_time_s": prov["wall_time_s"],
                 "train_seconds": prov["train_seconds"], "images_seen": images_seen, "loss_window": list(window)}
        if dense_head is not None:
            state["dense_head"] = dense_head.state_dict()
        save_checkpoint(args.out, model, head_dict, args.teacher, prov, state)
        return prov

    bar = tqdm(total=total, initial=step, desc="distill", unit="step", mininterval=1.0)
    start_step = step
    try:
        while step < total and (stop_after is None or step - start_step < stop_after):
            t0 = time.perf_counter()
            idx, flips, views = batch_at(step, n, bsz, args.seed, 1 + args.aug_views)
            x = arrays[idx] if pixels is None else pixels[idx, views]
            x[flips] = x[flips, :, ::-1]
            view = torch.from_numpy(flips.astype(np.int64) if args.teacher_views == 2 else views)
            target, dense_target = temb[torch.from_numpy(idx), view].float(), None
            if dense_head is not None:
                dense_target = targets.dense[torch.from_numpy(idx), view].float()
                if args.teacher_views == 1 and flips.any():
                    dense_target[flips] = mirror_grid(dense_target[flips], cfg.grid)
            x, target, dense_target = cutmix(x, target, dense_target, cfg.grid, args.cutmix, args.seed, step)
            patches = [torch.from_numpy(p).to(device) for p in images_to_levels(x, spec)]
            target = target.to(device)
            if dense_target is not None:
                dense_target = (dense_target.to(device) - dense_mean) / dense_std
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr, warmup)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                embs, tokens = model(patches, return_tokens=True)
                dense_pred = None if dense_head is None else [
                    pool_grid(dense_head(t), cfg.level_grid(k), cfg.grid) for k, t in enumerate(tokens)]
            embs = [e.float() for e in embs]
            parts = distill_loss(embs, target, weights, kl_head.logits, args.kl_weight,
                                 args.temperature, dense_pred, dense_target, args.dense_weight)
            if label_rows is not None:
                parts.total = parts.total + args.label_weight * label_loss(
                    embs, label_rows[torch.from_numpy(idx)].to(device), weights, head_dev.logits)
            if args.self_weight:
                parts.total = parts.total + args.self_weight * self_distill_loss(embs, weights, head_dev.logits,
                                                                                 args.temperature)
            if args.entropy_weight:
                parts.total = parts.total + args.entropy_weight * entropy_loss(embs, weights, head_dev.logits)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            step += 1
            images_seen += len(idx)
            seen_now += len(idx)
            train_seconds += time.perf_counter() - t0
            window.append([parts.total.item(), *parts.cosine, *parts.kl, *parts.dense])
            bar.update(1)
            bar.set_postfix(loss=f"{parts.total.item():.4f}", img_s=f"{seen_now / train_seconds:.0f}", refresh=False)
            if args.save_every and step % args.save_every == 0 and step < total:
                save()
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted at step {step}; --resume continues from {args.out}", file=sys.stderr)
        raise
    bar.close()

    eval_result = None
    if args.eval_data and step >= total:
        eval_result = evaluate_on(args, model, teacher, head_dev, labels, cache_dir)
    prov = save(eval_result)
    summary = f"step {step}/{total}: {prov['images_per_s']} images/s"
    if prov["final_losses"]:
        summary += f", loss {prov['final_losses']['total']:.4f}, cosine distance per level {prov['final_losses']['cosine']}"
    if eval_result:
        summary += (f"; eval cosine {eval_result['cosine']}, student top-1 {eval_result['student_top1']}, "
                    f"teacher top-1 {eval_result['teacher_top1']}")
    print(f"{summary}; saved {args.out}", flush=True)
    return prov


def evaluate_on(args: argparse.Namespace, model: WaveCLIP, teacher: Teacher, head: Head, labels: list[str],
                cache_dir: Path) -> dict:
    """Per-level cosine to the teacher and top-1 (student per level, teacher) on --eval-data."""
    spec = model.config.preprocessing_spec()
    arrays, kept, skipped = load_set(args.eval_data, args.eval_split, args.eval_limit, args.seed, spec, "eval-data")
    temb, _ = teacher_embeddings(teacher, kept, cache_dir, flip=False, batch_size=args.teacher_batch_size,
                                 backend=args.teacher_backend)
    rows = head_rows(labels, [r.label for r in kept])
    return {"source": str(args.eval_data), "split": args.eval_split, "skipped": skipped,
            **evaluate(model, arrays, temb[:, 0], head, rows, args.device)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s: %(message)s")
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
