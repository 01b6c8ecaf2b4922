"""The command line of ``python -m train.distill``: its options, defaults and the checks between them."""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime.cli import ArgumentParser, integer, number
from train.setup import grid_list
from train.teacher_cache import default_cache_dir
from train.teacher_onnx import BACKENDS

DESCRIPTION = "Distil a teacher into a WaveCLIP tower, all levels jointly."
LR_SCRATCH, LR_VIT_INIT = 2e-3, 1e-4  # default peak learning rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m train.distill", description=DESCRIPTION)
    p.add_argument("--teacher", required=True, help="efficientnet-lite0 | open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("--data", required=True, help="image folder or CSV (path/file + optional wnid/label, split)")
    p.add_argument("--split", help="rows of the CSV's split column to use (e.g. train)")
    p.add_argument("--limit", type=integer(1), help="use a deterministic, class-balanced subset of N images")
    p.add_argument("--preset", required=True, help="waveclip-b16 | waveclip-demo | waveclip-tiny")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (and to --resume from)")
    p.add_argument("--labels", help="imagenet1k | from-data | FILE (one wnid or class name a line); "
                                    "default: from-data when the data has labels, else imagenet1k")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=number(above=0), help="passes over the data (default 1)")
    budget.add_argument("--steps", type=integer(0),
                        help="total optimizer steps (instead of --epochs; 0: write the initialised student)")
    p.add_argument("--batch-size", type=integer(1), default=128, help="images per optimizer step (default 128)")
    p.add_argument("--lr", type=number(0), help=f"peak learning rate (default {LR_SCRATCH} from scratch, "
                                                       f"{LR_VIT_INIT} when starting from the teacher's ViT)")
    p.add_argument("--weight-decay", type=number(0), default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup", type=integer(0), help="warmup steps (default 5%% of the steps)")
    p.add_argument("--clip-grad", type=number(0), default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--kl-weight", type=number(0), default=1.0, help="weight of the KL term on the head's logits")
    p.add_argument("--kl-head", choices=["auto", "imagenet1k", "labels", "refit"], default="auto",
                   help="classes of the KL term: all 1000 ImageNet classes or the head's labels (auto: imagenet1k "
                        "for classifier teachers, whose head is free; labels for open_clip, whose zero-shot head "
                        "costs a text pass per class); refit: the head's labels with the teacher's rows first refit "
                        "on its own cached embeddings of the labelled images of --data (train.head's fit), so the KL "
                        "carries what the labels teach the teacher to every image, labelled or not")
    p.add_argument("--temperature", type=number(above=0), default=2.0, help="softmax temperature of the KL term")
    p.add_argument("--dense-weight", type=number(0), default=1.0,
                   help="weight of the dense token-level loss to the teacher's feature map (0: off)")
    p.add_argument("--teacher-views", type=int, choices=[1, 2], default=1,
                   help="teacher passes per image: 1 (mirror reuses them) or 2 (the mirror is run too)")
    p.add_argument("--teacher-view", choices=["native", "student"], default="student",
                   help="what the teacher sees: student (default) = exactly the student's pixels (its crop, at its "
                        "resolution) resized to the teacher's input, the whole view; native = the original file "
                        "through the teacher's own preprocessing (e.g. Resize 256 + CenterCrop 224 at full "
                        "resolution), which shows the teacher detail and border the student never sees")
    p.add_argument("--aug-views", type=int, default=0, choices=range(0, 9), metavar="K",
                   help="augmented views per image (random-resized crop + colour jitter), teacher-run once and cached "
                        "in blocks of two (a larger K later runs the teacher on the new views only); each step draws "
                        "the plain image or one of them (0: the plain image only; needs --teacher-views 1)")
    p.add_argument("--label-weight", type=number(0), default=0.0, metavar="W",
                   help="add W x the cross-entropy of the images' own labels (those in the head) through the "
                        "teacher's rows; 0 (default): labels unused, distillation needs none")
    p.add_argument("--self-weight", type=number(0), default=0.0, metavar="W",
                   help="add W x the KL of every earlier level's head softmax to the last level's (detached, at "
                        "--temperature): the last level teaches the earlier ones, whose early exits stand in for it "
                        "(0: off)")
    p.add_argument("--entropy-weight", type=number(0), default=0.0, metavar="W",
                   help="add W x the entropy of every level's head softmax, on every image: fewer near-ties between "
                        "classes, whose answers int8 rounding flips (0: off)")
    p.add_argument("--cutmix", type=number(0, 1), default=0.0, metavar="P",
                   help="paste a box of whole token cells from another image of the batch into a share P of the "
                        "samples, with area-mixed teacher targets (train.mix; 0: off)")
    p.add_argument("--patch-hidden", type=integer(0), metavar="H",
                   help="two-layer (GELU) patch embedding with H hidden units instead of the preset's (0: linear)")
    p.add_argument("--level-grids", type=grid_list, metavar="G0,G1,...",
                   help="a token grid per level, multiples of the preset's (e.g. 4,4,4,8: the finest level in 64 "
                        "tokens instead of 16); default: the preset's grid at every level")
    p.add_argument("--no-patch-norm", dest="patch_norm", action="store_false",
                   help="do not standardise each level's patch values by the data's statistics")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="student training precision (auto: bf16 autocast where the hardware has native bf16)")
    p.add_argument("--level-weights", help="comma-separated weight per level (default equal)")
    p.add_argument("--seed", type=integer(0), default=0,
                   help="seed of the batches, flips, views and initialisation (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from --out's train_state")
    p.add_argument("--init", type=Path, metavar="CKPT",
                   help="start the student from CKPT's weights (same preset and teacher; e.g. a shipped ckpt.pt) with "
                        "a new optimizer and schedule (fine-tuning; default --lr %g); its dense head too when CKPT "
                        "keeps one; --resume still continues --out once it exists" % LR_VIT_INIT)
    p.add_argument("--save-every", type=integer(0), default=200, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--cache-dir", type=Path, help=f"teacher output cache (default $WAVECLIP_CACHE or {default_cache_dir()})")
    p.add_argument("--threads", type=integer(1), help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device for teacher and student")
    p.add_argument("--teacher-batch-size", type=integer(1), default=64,
                   help="images per teacher pass while filling its cache (default 64)")
    p.add_argument("--teacher-backend", choices=BACKENDS, default="auto",
                   help="what runs a CPU teacher for the cache, after a parity check against torch (auto: OpenVINO "
                        "when installed, then ONNX Runtime; both fp32, so the cache does not depend on it); "
                        "openvino-bf16: OpenVINO in bf16 where the CPU has it, 1.75x the fp32 pass on an AMX Xeon, its "
                        "targets cached apart")
    p.add_argument("--eval-data", help="held-out folder or CSV for per-level cosine and top-1")
    p.add_argument("--eval-split", help="the CSV split of --eval-data (e.g. calib)")
    p.add_argument("--eval-limit", type=integer(1), help="evaluate on a class-balanced subset of N images")
    args = p.parse_args(argv)
    if args.label_weight and args.cutmix:  # the values themselves are checked by their types
        p.error("--label-weight is not for use with --cutmix (mixed images)")
    if args.aug_views and args.teacher_views == 2:
        p.error("--aug-views needs --teacher-views 1 (augmented views reuse the mirror)")
    return args
