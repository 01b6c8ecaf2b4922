"""Would another exit signal save more than the softmax margin? Each signal replaces the margin in the same threshold
search and is scored the way bench/gate_methods.py scores the margin: the in-sample bound, then repeated random
fit/held-apart splits with the rule ``calibration.gate`` ships (least GFLOPs with the fit drop <= D, z standard
errors spared).

    python bench/gate_signals.py BUNDLE --data out/demo-work/tiny-imagenet-splits.csv --split calib \
        [--levels levels.npz] [--repeats 20] [--z 2]

Signals, per image and level: ``margin`` (top-1 minus top-2 softmax, the runtime's gate), ``max-prob``, ``1-entropy``
(normalised), ``margin T=0.5`` / ``T=2`` (the margin of the softmax at that temperature), ``margin x agreement``
(zero when the level's top-1 differs from the previous level's), ``levels-mean margin`` (the margin of the geometric
mean of the softmaxes of levels 0..k, zero where its top-1 differs from the level's) and ``learned`` (per level, a
logistic regression fitted on each split's fit part only, on the level's top-5 probabilities and log-probabilities, entropy and, for
every earlier level, top-1 agreement, margin, the probability it gives this level's top-1 and the embeddings'
cosine: the probability that leaving here costs no accuracy; needs scikit-learn, which the openvino extra's nncf
brings). The labels and every threshold come from the fit part; the held-apart part only scores.

``--refit-split fit`` adds the margin of per-level heads: the bundle's head refit on each level's embeddings alone
(train.head's fit, its defaults) over the labelled images of that split of ``--data``, instead of one head for all.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.gate import match_labels, split_indices  # noqa: E402
from calibration.gate_search import (GateError, LevelStats, Target, candidate_thresholds, evaluate_grid,  # noqa: E402
                                     pick, simulate)
from runtime.backends import BackendError  # noqa: E402
from runtime.bundle import BundleError  # noqa: E402
from runtime.cascade import Cascade  # noqa: E402
from runtime.cli import ArgumentParser, integer, number  # noqa: E402
from runtime.data import DataError, load_images, read_image_list  # noqa: E402
from runtime.wavelet import images_to_levels  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_methods import in_sample_saving  # noqa: E402


def measure(bundle: str, data: str, split: str | None, batch: int = 64) -> dict[str, np.ndarray]:
    """Every level on every labelled image: probabilities [N, L, C], embeddings [N, L, D], label columns [N]."""
    cascade = Cascade(bundle)
    records, target, _ = match_labels(cascade, read_image_list(data, split))
    spec, probs, embs, kept = cascade.bundle.preprocessing, [], [], []
    for i in tqdm(range(0, len(records), batch), desc=f"levels of {split or data}", unit="batch", file=sys.stderr):
        chunk = records[i:i + batch]
        images, ok, _ = load_images(chunk, spec)
        if not ok:
            continue
        levels = cascade.run_all_levels(images_to_levels(images, spec))
        probs.append(np.stack([cascade.probabilities(e) for e in levels], 1))
        embs.append(np.stack(levels, 1))
        index = {id(r): j for j, r in enumerate(chunk)}
        kept.append(target[i:i + batch][[index[id(r)] for r in ok]])
    cum = np.array([lv["cumulative_gflops"] for lv in cascade.bundle.manifest["levels"]])
    return {"probs": np.concatenate(probs), "emb": np.concatenate(embs), "target": np.concatenate(kept), "cum": cum}


def _margin(p: np.ndarray) -> np.ndarray:
    top = np.sort(p, -1)
    return top[..., -1] - top[..., -2]


def _tempered(p: np.ndarray, t: float) -> np.ndarray:
    logits = np.log(np.clip(p, 1e-30, None)) / t
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def levels_mean(p: np.ndarray) -> np.ndarray:
    """Per level k, the normalised geometric mean of the softmaxes of levels 0..k [N, L, C]."""
    logp = np.log(np.clip(p, 1e-30, None))
    mean = np.cumsum(logp, 1) / np.arange(1, p.shape[1] + 1)[None, :, None]
    e = np.exp(mean - mean.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def fixed_signals(p: np.ndarray) -> dict[str, np.ndarray]:
    """Signals that need no fitting, [N, L] each, in [0, 1]."""
    pred, classes = p.argmax(-1), p.shape[-1]
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1) / np.log(classes)
    agree = np.concatenate([np.ones_like(pred[:, :1], bool), pred[:, 1:] == pred[:, :-1]], 1)
    ensemble = levels_mean(p)
    return {"margin": _margin(p), "max-prob": p.max(-1), "1-entropy": 1 - entropy,
            "margin T=0.5": _margin(_tempered(p, 0.5)), "margin T=2": _margin(_tempered(p, 2.0)),
            "margin x agreement": _margin(p) * agree,
            "levels-mean margin": _margin(ensemble) * (ensemble.argmax(-1) == pred)}


def learned_features(p: np.ndarray, emb: np.ndarray) -> list[np.ndarray]:
    """Per level, the features of the learned signal [N, F_k] (see the module docstring)."""
    n, levels = p.shape[:2]
    top = np.sort(p, -1)[..., ::-1][..., :5]
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    pred, rows = p.argmax(-1), np.arange(n)
    out = []
    for k in range(levels):
        cols = [top[:, k], np.log(np.clip(top[:, k], 1e-12, None)), entropy[:, k:k + 1]]
        for j in range(k):
            cols += [(pred[:, j] == pred[:, k])[:, None], _margin(p[:, j])[:, None], p[rows, j, pred[:, k]][:, None],
                     (unit[:, j] * unit[:, k]).sum(-1)[:, None]]
        out.append(np.concatenate(cols, 1).astype(np.float64))
    return out


def learned_signal(p: np.ndarray, emb: np.ndarray, target: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A function of the fit indices -> [N, L] signal: per level before the last, P(no loss from leaving here) by a
    logistic regression fitted on those images only (1 at the last level, which always exits)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise SystemExit("error: the learned signal needs scikit-learn (pip install 'waveclip-edge[openvino]')")
    feats, pred = learned_features(p, emb), p.argmax(-1)
    safe = ~((pred[:, -1:] == target[:, None]) & (pred != target[:, None]))  # leaving here loses no right answer

    def fit(idx: np.ndarray) -> np.ndarray:
        score = np.ones(pred.shape)
        for k in range(pred.shape[1] - 1):
            y = safe[idx, k]
            if y.all() or not y.any():  # one outcome on every fit image: nothing to learn
                score[:, k] = float(y[0])
                continue
            score[:, k] = LogisticRegression(max_iter=2000).fit(feats[k][idx], y).predict_proba(feats[k])[:, 1]
        return score
    return fit


def score(pred: np.ndarray, signal: Callable[[np.ndarray], np.ndarray], target: np.ndarray, cum: np.ndarray,
          max_drop: float, z: float, holdout: float, repeats: int) -> dict:
    """Held-apart drop and compute saved of the shipped rule on ``signal``, over ``repeats`` random splits."""
    drops, saved = [], []
    for seed in range(repeats):
        fit_idx, hold_idx = split_indices(target, holdout, seed)
        stats = LevelStats(pred.T.copy(), np.clip(signal(fit_idx).T, 0, 1), target, cum)
        fit, hold = stats.subset(fit_idx), stats.subset(hold_idx)
        grid = evaluate_grid(fit, candidate_thresholds(fit, 1 << 15))
        m = simulate(hold, grid.thresholds[pick(grid, Target("max_drop", max_drop, confidence=z), fit.n)])
        drops.append(m["full_accuracy"] - m["accuracy"])
        saved.append(m["compute_saved"])
    d = np.array(drops)
    return {"drop_mean": d.mean(), "drop_worst": d.max(), "over": (d > max_drop + 1e-9).mean(),
            "saved": float(np.mean(saved))}


def per_level_head_probs(bundle: str, fit: dict[str, np.ndarray], probs_of: dict[str, np.ndarray]) -> np.ndarray:
    """[N, L, C] probabilities of ``probs_of``'s embeddings through a head refit per level on ``fit``'s."""
    import torch

    from model.teachers import Head
    from train.head import fit_head

    b = Cascade(bundle).bundle
    head = Head(list(b.class_names), torch.from_numpy(b.head_weight), torch.from_numpy(b.head_bias), b.logit_scale)
    target = torch.from_numpy(fit["target"]).long()
    out = []
    for k in range(fit["emb"].shape[1]):
        refit = fit_head(head, [torch.from_numpy(fit["emb"][:, k])], target)
        out.append(torch.softmax(refit.logits(torch.from_numpy(probs_of["emb"][:, k])), -1).numpy())
    return np.stack(out, 1)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/gate_signals.py", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--data", required=True)
    p.add_argument("--split")
    p.add_argument("--levels", type=Path, help="per-level probabilities and embeddings: read if present, else "
                                               "measured and written")
    p.add_argument("--max-drop", type=number(0, below=1), default=0.01)
    p.add_argument("--z", type=number(0), default=2.0, help="standard errors spared (calibration.gate --confidence)")
    p.add_argument("--holdout", type=number(above=0, below=1), default=0.3)
    p.add_argument("--repeats", type=integer(1), default=20)
    p.add_argument("--no-learned", action="store_true", help="skip the learned signal")
    p.add_argument("--refit-split", help="also per-level heads refit on this split of --data (e.g. fit)")
    args = p.parse_args(argv)
    try:
        if args.levels and args.levels.is_file():
            m = dict(np.load(args.levels))
        else:
            m = measure(args.bundle, args.data, args.split)
            if args.levels:
                np.savez(args.levels, **m)
        refit = measure(args.bundle, args.data, args.refit_split) if args.refit_split else None
    except (BundleError, DataError, GateError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    probs, target, cum = m["probs"], m["target"], m["cum"]
    pred = probs.argmax(-1)
    signals: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        name: (lambda idx, v=v: v) for name, v in fixed_signals(probs).items()}
    if not args.no_learned:
        signals["learned"] = learned_signal(probs, m["emb"], target)
    rows = {name: pred for name in signals}
    if refit is not None:
        per_level = per_level_head_probs(args.bundle, refit, m)
        signals["margin, per-level heads"] = lambda idx, v=_margin(per_level): v
        rows["margin, per-level heads"] = per_level.argmax(-1)
    print(f"{len(target)} images ({args.data} {args.split or ''}); goal: drop <= {args.max_drop:g}; "
          f"{args.repeats} splits, held apart {args.holdout:g}, z = {args.z:g}")
    print("| signal | top-1 per level | in-sample bound | held-apart drop mean / worst | splits over the goal | "
          "compute saved mean |")
    print("|---|---|---|---|---|---|")
    for name, signal in signals.items():
        everyone, level_pred = np.arange(len(target)), rows[name]
        bound = in_sample_saving(LevelStats(level_pred.T.copy(), np.clip(signal(everyone).T, 0, 1), target, cum),
                                 args.max_drop)
        r = score(level_pred, signal, target, cum, args.max_drop, args.z, args.holdout, args.repeats)
        top1 = " / ".join(f"{a:.1%}" for a in (level_pred == target[:, None]).mean(0))
        print(f"| {name} | {top1} | {bound:.1%} | {r['drop_mean'] * 100:.2f} / {r['drop_worst'] * 100:.2f} pt | "
              f"{r['over']:.0%} | {r['saved']:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
