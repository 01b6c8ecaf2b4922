"""How well do gate thresholds chosen on one split hold on another? Repeated random fit/held-apart splits of one
labelled set (never the evaluation split), each threshold rule chosen on the fit part and scored on the rest.

    python bench/gate_methods.py BUNDLE --data out/demo-work/tiny-imagenet-splits.csv --split calib [--repeats 20] \
        [--z 0.5,1,2] [--stats levels.npz]

Rules: ``exhaustive`` (calibration.gate's grid search: least GFLOPs with fit drop <= D), ``exhaustive-se`` (the same
with the drop bound tightened by z paired standard errors of the fit drop, ``calibration.gate --confidence``), and
``shared`` (one threshold for every level, a 1-D search). Prints, per rule, the held-apart drop (mean, worst, share of
splits over D) and the compute saved, after the in-sample bound: the least GFLOPs within D of full accuracy chosen
and scored on every image at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.gate import measure_levels, split_indices  # noqa: E402
from calibration.gate_search import (NEVER, LevelStats, Target, candidate_thresholds, evaluate_grid, pick,  # noqa: E402
                                     simulate, simulate_many)
from runtime.cascade import Cascade  # noqa: E402
from runtime.cli import ArgumentParser, integer, number, output_file  # noqa: E402
from runtime.data import DataError, read_image_list  # noqa: E402
from runtime.errors import one_line  # noqa: E402


def shared_threshold(fit: LevelStats, max_drop: float) -> list[float]:
    """The smallest single threshold for every level whose fit drop is <= max_drop."""
    cand = np.unique(np.concatenate([[0.0], fit.margin[:-1].ravel(), [NEVER]]))
    grid = simulate_many(fit, np.repeat(cand[:, None], fit.levels - 1, 1))
    ok = np.flatnonzero(grid.accuracy >= fit.correct[-1].mean() - max_drop - 1e-9)
    return [float(cand[ok[0]])] * (fit.levels - 1)  # the last candidate (never exit) always qualifies


def in_sample_saving(stats: LevelStats, max_drop: float, max_combos: int = 1 << 15) -> float:
    """The share of GFLOPs the cheapest grid point within ``max_drop`` of full accuracy saves on ``stats`` itself."""
    grid = evaluate_grid(stats, candidate_thresholds(stats, max_combos))
    cheapest = grid.gflops[grid.accuracy >= grid.accuracy[-1] - max_drop - 1e-9].min()
    return float(1 - cheapest / stats.cum_gflops[-1])


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/gate_methods.py", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--data", required=True, help="labelled images: a folder or CSV")
    p.add_argument("--split", help="CSV split to use (e.g. calib)")
    p.add_argument("--max-drop", type=number(0, below=1), default=0.01, help="accuracy drop allowed (default 0.01)")
    p.add_argument("--holdout", type=number(above=0, below=1), default=0.3, help="share held apart (default 0.3)")
    p.add_argument("--repeats", type=integer(1), default=20, help="random splits (default 20)")
    p.add_argument("--z", default="1", help="comma-separated standard errors to try with exhaustive-se")
    p.add_argument("--stats", type=output_file,
                   help="per-level predictions: read if present, else measured and written")
    p.add_argument("--max-combos", type=integer(1), default=1 << 15, help="threshold grid size (default 32768)")
    args = p.parse_args(argv)
    try:
        zs = [0.0] + [number(0)(x) for x in args.z.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(f"--z {args.z!r}: {e}")
    if args.stats and Path(args.stats).is_file():
        try:
            z = np.load(args.stats)
            stats = LevelStats(z["pred"], z["margin"], z["target"], z["cum_gflops"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{args.stats}: not a --stats file written by this script ({one_line(e)})") from None
    else:
        stats = measure_levels(Cascade(args.bundle), read_image_list(args.data, args.split), progress=True)
        if args.stats:
            np.savez(args.stats, pred=stats.pred, margin=stats.margin, target=stats.target, cum_gflops=stats.cum_gflops)

    names = ["exhaustive" if z == 0 else f"exhaustive-se (z={z:g})" for z in zs]
    rows: dict[str, list] = {name: [] for name in [names[0], "shared", *names[1:]]}
    for seed in range(args.repeats):
        fit_idx, hold_idx = split_indices(stats.target, args.holdout, seed)
        fit, hold = stats.subset(fit_idx), stats.subset(hold_idx)
        grid = evaluate_grid(fit, candidate_thresholds(fit, args.max_combos))  # one grid, every confidence
        chosen = {name: grid.thresholds[pick(grid, Target("max_drop", args.max_drop, confidence=z), fit.n)]
                  for name, z in zip(names, zs)}
        chosen["shared"] = shared_threshold(fit, args.max_drop)
        for name, thresholds in chosen.items():
            m = simulate(hold, thresholds)
            rows[name].append((m["full_accuracy"] - m["accuracy"], m["compute_saved"]))
    print(f"{stats.n} images ({args.data} {args.split or ''}), {args.repeats} splits, held apart {args.holdout:g}, "
          f"goal: drop <= {args.max_drop:g}")
    print(f"in-sample bound: the least GFLOPs within {args.max_drop:g} of full accuracy, chosen and scored on all "
          f"{stats.n} images, saves {in_sample_saving(stats, args.max_drop, args.max_combos):.1%} (optimistic: "
          "thresholds chosen on some images save less at that drop on others)")
    print("| rule | held-apart drop mean / worst | splits over the goal | compute saved mean |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        d, s = np.array(r).T
        print(f"| {name} | {d.mean() * 100:.2f} / {d.max() * 100:.2f} pt | {(d > args.max_drop + 1e-9).mean():.0%} | "
              f"{s.mean():.1%} |")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
