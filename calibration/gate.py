"""``python -m calibration.gate BUNDLE --data LABELLED``: choose the early-exit gate thresholds on real images.

Every level runs once on every image; thresholds are then searched exhaustively on a grid (see gate_search) on a fit
split, reported on a held-apart split, and written into the bundle's manifest (gate source "calibrated").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from calibration.gate_report import curve_rows, format_table, plot_curve, write_curve_csv
from calibration.gate_search import (  # noqa: F401  (re-exported: the evaluation script imports them from here)
    NEVER, Choice, GateError, Grid, LevelStats, Target, candidate_thresholds, choose_thresholds, evaluate_grid,
    exit_levels, pareto_front, simulate, simulate_many)
from calibration.level_table import is_parquet, level_stats
from runtime.backends import BACKENDS, BackendError, create_backend
from runtime.bundle import MANIFEST, Bundle, BundleError, load_bundle
from runtime.cascade import Cascade, margins
from runtime.atomic import write_text_atomic
from runtime.cli import ArgumentParser, integer, number, output_folder
from runtime.data import DataError, ImageRecord, load_images, portable_source, read_image_list
from runtime.timing import exit_cost_times
from runtime.wavelet import images_to_levels


DEFAULT_CONFIDENCE = 2.0  # standard errors spared by --max-drop (chosen on calib splits, bench/gate_methods.py)


def head_columns(cascade: Cascade) -> dict[str, int]:
    """Label id or class name -> column of the cascade's head."""
    b, col = cascade.bundle, {int(r): j for j, r in enumerate(cascade.class_index)}
    lookup = {name: col[r] for r, name in enumerate(b.class_names) if r in col}
    lookup.update({lab: col[r] for r, lab in enumerate(b.labels) if r in col})
    return lookup


def match_labels(cascade: Cascade, records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], np.ndarray | None, int]:
    """(records kept, their label columns or None without labels, number dropped). Records whose label is not in the
    head are dropped; none matching is an error."""
    if all(r.label is None for r in records):
        return list(records), None, 0
    lookup = head_columns(cascade)
    kept = [r for r in records if r.label in lookup]
    if not kept:
        example = next(r.label for r in records if r.label is not None)
        raise GateError(f"labels do not match the bundle's labels: e.g. {example!r} is not among "
                        f"{', '.join(cascade.bundle.labels[:3])}, ... nor the class names")
    return kept, np.array([lookup[r.label] for r in kept]), len(records) - len(kept)


def measure_levels(cascade: Cascade, records: Sequence[ImageRecord], batch_size: int = 32,
                   progress: bool = False) -> LevelStats:
    """Run every level on every image once (no gate) -> per image per level prediction and margin (+ label columns;
    labels not in the head are dropped, unreadable images skipped, both counted)."""
    records, target, dropped = match_labels(cascade, records)
    spec = cascade.bundle.preprocessing
    preds, margs, kept, skipped = [], [], [], 0
    with tqdm(total=len(records), unit="img", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(records), batch_size):
            images, ok, n_skip = load_images(records[i:i + batch_size], spec)
            skipped += n_skip
            bar.update(len(ok) + n_skip)
            if not ok:
                continue
            probs = [cascade.probabilities(e) for e in cascade.run_all_levels(images_to_levels(images, spec))]
            preds.append(np.stack([p.argmax(1) for p in probs]))
            margs.append(np.stack([margins(p) for p in probs]))
            kept += ok
    if not kept:
        raise GateError(f"none of the {len(records)} images could be read")
    if target is not None:
        index = {id(r): j for j, r in enumerate(records)}
        target = target[[index[id(r)] for r in kept]]
    cum = np.array([lv["cumulative_gflops"] for lv in cascade.bundle.manifest["levels"]][:cascade.max_level + 1])
    return LevelStats(np.concatenate(preds, 1), np.concatenate(margs, 1), target, cum,
                      paths=[str(r.path) for r in kept], skipped=skipped, dropped=dropped)


def split_indices(strata: np.ndarray, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-apart) indices, ``holdout`` of the images held apart, stratified by ``strata`` (seeded)."""
    n, rng = len(strata), np.random.default_rng(seed)
    key = np.empty(n)
    for s in np.unique(strata):  # rank within the stratum, jittered: each stratum spreads evenly over the order
        idx = rng.permutation(np.flatnonzero(strata == s))
        key[idx] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    order = np.argsort(key, kind="stable")
    n_hold = int(round(holdout * n))
    if n - n_hold < 1:
        raise GateError(f"--holdout {holdout:g} leaves no image to fit on ({n} images)")
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def read_latency_json(path: str | os.PathLike, levels: int) -> np.ndarray:
    """Cost (ms) of an image exiting at each level, from ``devices.profile --json`` output: its ``exit_costs[].mean_ms``
    (the real cascade with the exit forced at k, the same cost model as the profiler's expected latency); older
    reports without them: the cumulative sum of ``levels[].p50_ms`` (batch 1 rows when there is a batch column)."""
    try:
        doc = json.loads(Path(path).read_text())
        key, stat = ("exit_costs", "mean_ms") if doc.get("exit_costs") else ("levels", "p50_ms")
        rows = doc[key]
        rows = [r for r in rows if r.get("batch", r.get("batch_size", 1)) == 1] or rows
        ms = {int(r["level"]): float(r[stat]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GateError(f"{path}: not a latency JSON with levels[].level / p50_ms ({type(e).__name__}: {e})") from None
    if sorted(ms) != list(range(levels)):
        raise GateError(f"{path}: has latencies for levels {sorted(ms)}, the bundle has levels 0..{levels - 1}")
    values = np.array([ms[k] for k in range(levels)])
    return values if key == "exit_costs" else np.cumsum(values)


def measure_latency(bundle: Bundle, threads: int, provider: str, patches: list[np.ndarray], runs: int = 30,
                    warmup: int = 5) -> np.ndarray:
    """Median ms of an image exiting at each level (the real cascade at batch 1 with the exit forced there: levels,
    head, softmax, KV rows), onnxruntime: the cost model of devices.profile."""
    import onnxruntime as ort

    providers = [provider] if provider in ort.get_available_providers() else None
    backend = create_backend(bundle, "onnxruntime", providers=providers, threads=threads or None)
    cascade = Cascade(bundle, backend)
    return np.array([np.mean(t) for t in exit_cost_times(cascade, patches, runs, warmup)])


def write_gate(bundle_dir: str | os.PathLike, thresholds: Sequence[float], calibration: dict) -> None:
    """Replace the manifest's gate atomically (temp file + os.replace); manifest.json is not in 'files'."""
    path = Path(bundle_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["gate"] = {"metric": "softmax_margin", "thresholds": [float(t) for t in thresholds],
                        "source": "calibrated", "calibration": calibration}
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m calibration.gate", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("bundle", help="bundle folder (thresholds are written into its manifest.json)")
    p.add_argument("--data", required=True,
                   help="image folder or CSV (path/file, wnid/label, split columns), or the Parquet of "
                        "`python -m cluster.classify BUNDLE --levels all` (per-level predictions computed once)")
    p.add_argument("--split", help="CSV split to use (e.g. val)")
    p.add_argument("--limit", type=integer(1), help="use a deterministic, class-balanced subset of N images")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--max-drop", type=number(0, below=1), help="least cost with score >= full score - D, D in [0, 1) "
                                                                "(default 0.01)")
    t.add_argument("--budget-gflops", type=number(above=0), help="best score with expected GFLOPs per image <= X")
    t.add_argument("--budget-ms", type=number(above=0), help="best score with expected latency per image <= X (needs --device)")
    p.add_argument("--confidence", type=number(0), default=DEFAULT_CONFIDENCE,
                   help="with --max-drop: the drop must hold on the fit images with Z paired standard errors to "
                        "spare, so that the cheapest of many threshold combinations still holds on new images "
                        f"(default {DEFAULT_CONFIDENCE:g}; 0: the plain bound; see bench/gate_methods.py)")
    p.add_argument("--device", help="device profile (devices/profiles; auto: the one that fits this machine) whose "
                                    "latencies to use")
    p.add_argument("--latency-json", help="per-level latencies from `python -m devices.profile ... --json`; without "
                                          "it they are measured here with onnxruntime and the profile's threads")
    p.add_argument("--reference", choices=("labels", "full"),
                   help="score = accuracy vs labels, or agreement with the always-full model (default: labels when "
                        "the data has them)")
    p.add_argument("--holdout", type=number(0, below=1), default=0.3,
                   help="fraction in [0, 1) held apart for reporting (default 0.3)")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the fit / held-apart split (default 0)")
    p.add_argument("--out-dir", type=output_folder,
                   help="where gate_curve.csv/png go (default BUNDLE/calibration; with --dry-run, nowhere)")
    p.add_argument("--dry-run", action="store_true",
                   help="report, but leave the bundle unchanged (the curve is written only to --out-dir)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="backend to measure levels with")
    p.add_argument("--batch-size", type=integer(1), default=32, help="images per level run while measuring (default 32)")
    p.add_argument("--max-combos", type=integer(1), default=1 << 18, help="threshold grid size (default 262144)")
    args = p.parse_args(argv)
    if args.budget_ms is not None and not args.device:
        p.error("--budget-ms needs --device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (GateError, BundleError, DataError, BackendError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def measure_images(bundle: Bundle, args: argparse.Namespace) -> tuple[LevelStats, str]:
    """LevelStats of ``args.data`` (a folder or CSV) measured here, and the reference (labels or full)."""
    records = read_image_list(args.data, args.split, args.limit, args.seed)
    has_labels = any(r.label is not None for r in records)
    reference = args.reference or ("labels" if has_labels else "full")
    if reference == "labels" and not has_labels:
        raise GateError(f"{args.data}: no labels (use --reference full)")
    cascade = Cascade(bundle, args.backend)
    if reference == "full" and has_labels:  # labels optional: keep every image, report accuracy only if all match
        lookup = head_columns(cascade)
        if not all(r.label in lookup for r in records):
            print("note: labels not all in the head; ignored (agreement with the full model only)", file=sys.stderr)
            records = [ImageRecord(r.path) for r in records]
    return measure_levels(cascade, records, args.batch_size, progress=sys.stderr.isatty()), reference


def run(args: argparse.Namespace) -> int:
    from devices.profile_config import load_profile

    bundle = load_bundle(args.bundle)
    L = bundle.num_levels
    if L < 2:
        raise GateError(f"{args.bundle}: a one-level bundle has no gate to calibrate")
    kind, value = (("gflops", args.budget_gflops) if args.budget_gflops is not None else
                   ("ms", args.budget_ms) if args.budget_ms is not None else
                   ("max_drop", 0.01 if args.max_drop is None else args.max_drop))
    cum = [lv["cumulative_gflops"] for lv in bundle.manifest["levels"]]
    if kind == "gflops" and value < cum[0]:
        raise GateError(f"budget {value:g} GFLOPs is below level 0's cost ({cum[0]:.4g} GFLOPs): no thresholds can "
                        "meet it")
    profile = load_profile(args.device) if args.device else None
    level_ms = read_latency_json(args.latency_json, L) if args.latency_json else None
    if is_parquet(args.data):  # per-level predictions computed once (python -m cluster.classify --levels all)
        if args.split or args.limit:
            raise GateError("--split / --limit choose images for cluster.classify; its Parquet is used whole")
        stats, reference = level_stats(bundle, args.data, args.reference)
    else:
        stats, reference = measure_images(bundle, args)
    latency_source = args.latency_json
    if profile is not None and level_ms is None:
        first = images_to_levels(load_images([ImageRecord(Path(stats.paths[0]))], bundle.preprocessing)[0],
                                 bundle.preprocessing)
        level_ms = measure_latency(bundle, profile.threads, profile.execution_provider, first)
        latency_source = (f"measured on this host: onnxruntime {profile.execution_provider}, "
                          f"{profile.threads or 'all'} threads, batch 1, cost of exiting at each level (the real "
                          "cascade with the exit forced there), mean of 30")
    if level_ms is not None:
        stats.cum_ms = np.asarray(level_ms, dtype=np.float64)
    target = Target(kind, value, reference, args.confidence if kind == "max_drop" else 0.0)

    fit_idx, hold_idx = split_indices(stats.target if stats.target is not None else stats.pred[-1],
                                      args.holdout, args.seed)
    fit, hold = stats.subset(fit_idx), stats.subset(hold_idx)
    choice = choose_thresholds(fit, target, args.max_combos)
    fit_m, hold_m = simulate(fit, choice.thresholds), simulate(hold, choice.thresholds)

    # a dry run leaves the bundle as it was: its curve goes only where --out-dir says
    out_dir = Path(args.out_dir) if args.out_dir else None if args.dry_run else bundle.path / "calibration"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = curve_rows(choice, fit, hold)
        write_curve_csv(out_dir / "gate_curve.csv", rows)
        plot_curve(out_dir / "gate_curve.png", rows, reference, f"{bundle.manifest.get('name', bundle.path.name)}: "
                   f"{target.describe()}")
    curve = f"{out_dir / 'gate_curve.csv'}, .png" if out_dir else "not written (a dry run without --out-dir)"
    print(f"thresholds: {' '.join(f'{t:.4g}' for t in choice.thresholds)}   target: {target.describe()} "
          f"(reference: {reference})")
    print(format_table(fit_m, hold_m))
    print(f"images: {stats.n} used, {stats.skipped} unreadable, {stats.dropped} with labels not in the head; "
          f"search: {len(choice.grid.gflops)} combinations; curve: {curve}")
    if args.dry_run:
        print("dry run: manifest unchanged")
        return 0
    calibration = {
        "target": {"kind": kind, "value": value, "reference": reference, "confidence": target.confidence,
                   "description": target.describe()},
        "data": {"source": portable_source(args.data, bundle.path.parent), "split": args.split, "limit": args.limit, "images": stats.n,
                 "unreadable": stats.skipped, "labels_not_in_head": stats.dropped},
        "split": {"holdout_fraction": args.holdout, "seed": args.seed, "fit": fit.n, "holdout": hold.n,
                  "stratified_by": "label" if stats.target is not None else "full-model prediction"},
        "fit": fit_m, "holdout": hold_m,
        "latency": None if level_ms is None else {"device": args.device, "source": latency_source,
                                                  "exit_cost_ms": [round(float(x), 4) for x in level_ms]},
        "search": {"method": "exhaustive grid over per-level margin midpoints", "combinations": len(choice.grid.gflops),
                   "candidates_per_level": [len(c) for c in choice.candidates]},
        "backend": args.backend,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_gate(bundle.path, choice.thresholds, calibration)
    print(f"gate thresholds written to {bundle.path / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
