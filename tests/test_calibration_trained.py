"""Calibration on the shipped trained demo model (distilled from efficientnet-lite0) with real labelled images."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from calibration import gate as G
from calibration import quantize as Q
from calibration.gate_search import Target, candidate_thresholds, choose_thresholds, evaluate_grid, pareto_front
from runtime.bundle import load_bundle
from runtime.cascade import Cascade
from runtime.data import read_image_list

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "waveclip-demo" / "bundle"


@pytest.fixture(scope="module")
def splits(data_dir, tmp_path_factory) -> Path:
    """Tiny-ImageNet train images for calibration and val images to evaluate on (disjoint by construction)."""
    root = data_dir / "tiny-imagenet-200"
    rows = list(csv.DictReader(open(root / "labels.csv")))
    path = tmp_path_factory.mktemp("splits") / "splits.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "wnid", "split"])
        w.writerows((str(root / r["path"]), r["wnid"], r["split"]) for r in rows if r["split"] in ("train", "val"))
    return path


@pytest.fixture(scope="module")
def stats(splits):
    records = read_image_list(splits, split="val", limit=600)
    return G.measure_levels(Cascade(DEMO), records)


def test_int8_of_trained_model_passes_agreement_check(splits, tmp_path):
    # The demo student's margins are still small: int8 embeddings at cosine ~0.998 flip 4-10% of top-1s through the
    # refit head (the shipped model: 91.1-93.7% per level for the level graphs and 94.7-96.3% for the split body on
    # val with 256 calibration images; 90.0% at worst with the 64 used here, 88.75% with the head refit alone, 91.5%
    # with the teacher's rows), so the check runs at 0.85 (the shipped bundle was quantized at 0.90). The cosine is
    # the strict check.
    out = tmp_path / "int8"
    rc = Q.main([str(DEMO), "--data", str(splits), "--split", "train", "--samples", "64", "--eval-data", str(splits),
                 "--eval-split", "val", "--eval-samples", "400", "-o", str(out), "-q", "--min-agreement", "0.85"])
    assert rc == 0
    report = json.loads((out / "quantization_report.json").read_text())
    levels = report["levels"] if "levels" in report else report["per_level"]
    for lv in levels:
        assert lv["cosine_mean"] >= 0.997
    load_bundle(out)


def test_max_drop_zero_gives_full_predictions_exactly(stats):
    choice = choose_thresholds(stats, Target("max_drop", 0.0, reference="full"))
    levels = Cascade(DEMO, thresholds=list(choice.thresholds)).classify(stats.paths)
    full = Cascade(DEMO, thresholds=1.01).classify(stats.paths)
    assert [r.label for r in levels] == [r.label for r in full]


def test_accuracy_curve_is_monotone_on_trained_model(stats):
    grid = evaluate_grid(stats, candidate_thresholds(stats, max_combos=1 << 12))
    front = pareto_front(grid, reference="labels")
    gflops, acc = grid.gflops[front], grid.accuracy[front]
    assert np.all(np.diff(gflops) > 0) and np.all(np.diff(acc) > 0)
    assert front.size >= 2


def test_gate_cli_on_trained_model(splits, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    rc = G.main([str(bundle), "--data", str(splits), "--split", "val", "--limit", "400", "--max-drop", "0.01",
                 "--out-dir", str(tmp_path / "gate")])
    assert rc == 0
    gate = load_bundle(bundle).manifest["gate"]
    assert gate["source"] == "calibrated" and len(gate["thresholds"]) == 3
    assert (tmp_path / "gate" / "gate_curve.png").stat().st_size > 1000
