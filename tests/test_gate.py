"""Gate calibration: exact grid search, Pareto front, targets, CLI (manifest, curve files, errors)."""
import csv
import json
import shutil

import numpy as np
import pytest

from calibration.gate import (GateError, LevelStats, Target, candidate_thresholds, choose_thresholds, evaluate_grid,
                              exit_levels, main, measure_levels, pareto_front, simulate, simulate_many, split_indices)
from runtime.bundle import load_bundle
from runtime.cascade import Cascade
from runtime.data import ImageRecord, read_image_list


@pytest.fixture(scope="module")
def records(data_dir):
    recs = read_image_list(data_dir / "tiny-imagenet-200" / "labels.csv", "val", limit=160)
    return [ImageRecord(r.path) for r in recs]  # wnids mean nothing to the random 10-class head


@pytest.fixture(scope="module")
def stats(tiny_bundle, records) -> LevelStats:
    """Measured once; labels = the full model's prediction with 30% replaced at random (so accuracy < 1)."""
    s = measure_levels(Cascade(tiny_bundle), records, batch_size=64)
    rng = np.random.default_rng(0)
    s.target = np.where(rng.random(s.n) < 0.3, rng.integers(0, 10, s.n), s.pred[-1])
    return s


@pytest.fixture(scope="module")
def labelled_csv(stats, tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([p, f"c{t}"] for p, t in zip(stats.paths, stats.target))
    return path


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def synthetic(n=300, levels=4, seed=0) -> LevelStats:
    """Early levels agree with the last one more often when their margin is high."""
    rng = np.random.default_rng(seed)
    margin = rng.random((levels, n))
    full = rng.integers(0, 10, n)
    pred = np.where(rng.random((levels, n)) < 0.3 + 0.7 * margin, full, rng.integers(0, 10, (levels, n)))
    pred[-1] = full
    target = np.where(rng.random(n) < 0.8, full, rng.integers(0, 10, n))
    return LevelStats(pred, margin, target, np.array([1.0, 2.0, 3.5, 5.0]))


@pytest.mark.parametrize("source", ["synthetic", "measured"])
def test_grid_matches_direct_simulation(source, stats):
    s = synthetic() if source == "synthetic" else stats
    grid = evaluate_grid(s, candidate_thresholds(s, 4096))
    idx = np.random.default_rng(1).choice(len(grid.gflops), 200, replace=False)
    direct = simulate_many(s, grid.thresholds[idx])
    for name in ("gflops", "accuracy", "agreement", "exits", "changed"):
        np.testing.assert_allclose(getattr(grid, name)[idx], getattr(direct, name), atol=1e-9, err_msg=name)


def test_confidence_spares_standard_errors_of_the_drop():
    s = synthetic(n=2000)
    plain = choose_thresholds(s, Target("max_drop", 0.02))
    safe = choose_thresholds(s, Target("max_drop", 0.02, confidence=2.0))
    grid = safe.grid
    # the standard error is that of the per-image differences d = correct(gated) - correct(full)
    ex = exit_levels(s.margin, grid.thresholds[[safe.index]])[0]
    d = s.correct[ex, np.arange(s.n)].astype(float) - s.correct[-1]
    assert grid.drop_se("labels", s.n)[safe.index] == pytest.approx(d.std() / np.sqrt(s.n), rel=1e-6)
    assert d.mean() - 2.0 * d.std() / np.sqrt(s.n) >= -0.02 - 1e-9
    cost = lambda c: simulate(s, c.thresholds)["expected_gflops"]  # noqa: E731
    assert cost(safe) > cost(plain) and -d.mean() < 0.02
    assert "2 standard errors" in safe.target.describe()


def test_max_drop_zero_reproduces_full_exactly_synthetic():
    s = synthetic()
    c = choose_thresholds(s, Target("max_drop", 0.0, "full"))
    m = simulate(s, c.thresholds)
    assert m["agreement"] == 1.0 and m["expected_gflops"] < 5.0  # exact, and still some early exits
    assert (s.pred[exit_levels(s.margin, np.array([c.thresholds]))[0], np.arange(s.n)] == s.pred[-1]).all()


def test_chosen_thresholds_behave_the_same_in_the_cascade(tiny_bundle, stats):
    fit_idx, _ = split_indices(stats.pred[-1], 0.3, seed=0)
    fit = stats.subset(fit_idx)
    paths = fit.paths
    for target in (Target("max_drop", 0.0, "full"), Target("max_drop", 0.3, "full")):
        c = choose_thresholds(fit, target)
        results = Cascade(tiny_bundle, thresholds=c.thresholds).classify(paths)
        ex = exit_levels(fit.margin, np.array([c.thresholds]))[0]
        assert [r.exit_level for r in results] == ex.tolist()
        labels = [r.label for r in results]
        assert labels == [f"c{p}" for p in fit.pred[ex, np.arange(fit.n)]]
        if target.value == 0:
            assert simulate(fit, c.thresholds)["agreement"] == 1.0
            assert labels == [f"c{p}" for p in fit.pred[-1]]  # the full model's predictions, exactly
        else:
            assert ex.min() < stats.levels - 1


@pytest.mark.parametrize("reference", ["labels", "full"])
def test_pareto_front_is_monotone_and_undominated(stats, reference):
    grid = evaluate_grid(stats, candidate_thresholds(stats, 4096))
    front = pareto_front(grid, reference)
    cost, score = grid.gflops[front], grid.score(reference)[front]
    assert (np.diff(cost) > 0).all() and (np.diff(score) > 0).all()
    best = score[np.searchsorted(cost, grid.gflops, side="right") - 1]  # best front score at <= each point's cost
    assert (grid.score(reference) <= best + 1e-12).all()


def test_budgets_are_respected(stats):
    cum = stats.cum_gflops
    stats.cum_ms = np.cumsum([0.1, 0.3, 0.5, 0.9])
    try:
        for budget in np.linspace(cum[0], cum[-1], 5):
            c = choose_thresholds(stats, Target("gflops", float(budget)))
            assert simulate(stats, c.thresholds)["expected_gflops"] <= budget + 1e-12
            assert c.grid.accuracy[c.index] == c.grid.accuracy[c.grid.gflops <= budget + 1e-12].max()
        c = choose_thresholds(stats, Target("ms", 0.6))
        assert simulate(stats, c.thresholds)["expected_ms"] <= 0.6
        with pytest.raises(GateError, match="below level 0"):
            choose_thresholds(stats, Target("ms", 0.05))
    finally:
        stats.cum_ms = None


def test_split_is_stratified_and_disjoint():
    strata = np.repeat(np.arange(5), 20)
    fit, hold = split_indices(strata, 0.3, seed=3)
    assert len(hold) == 30 and len(np.intersect1d(fit, hold)) == 0 and len(fit) + len(hold) == 100
    assert (np.bincount(strata[hold]) == 6).all()


def test_cli_writes_manifest_and_curve(bundle_copy, labelled_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(bundle_copy), "--data", str(labelled_csv), "--max-drop", "0.05", "--out-dir", str(out)]) == 0
    gate = json.loads((bundle_copy / "manifest.json").read_text())["gate"]
    assert gate["source"] == "calibrated" and len(gate["thresholds"]) == 3
    cal = gate["calibration"]
    assert cal["target"]["reference"] == "labels" and cal["split"]["fit"] + cal["split"]["holdout"] == 160
    assert cal["fit"]["accuracy"] >= cal["fit"]["full_accuracy"] - 0.05 and cal["holdout"]["images"] == 48
    bundle = load_bundle(bundle_copy)  # sha256 still valid
    assert Cascade(bundle).thresholds == gate["thresholds"]
    assert (out / "gate_curve.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "gate_curve.csv")))
    front = [r for r in rows if r["curve"] == "front_gflops"]
    assert {"thresholds", "fit_expected_gflops", "fit_accuracy", "holdout_accuracy", "fit_agreement"} <= set(rows[0])
    assert np.all(np.diff([float(r["fit_accuracy"]) for r in front]) > 0)
    assert "held-apart" in capsys.readouterr().out


def test_cli_provenance_records_no_absolute_path(bundle_copy, labelled_csv, tmp_path):
    from conftest import absolute_paths

    assert main([str(bundle_copy), "--data", str(labelled_csv), "--out-dir", str(tmp_path / "out")]) == 0
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["gate"]["calibration"]["data"]["source"] == "labels.csv"  # outside bundle and data root: name
    assert absolute_paths(manifest) == []


def test_cli_budget_gflops_and_dry_run(bundle_copy, labelled_csv, tmp_path):
    before = (bundle_copy / "manifest.json").read_bytes()
    budget = float(np.mean(json.loads(before)["levels"][1]["cumulative_gflops"]))
    args = [str(bundle_copy), "--data", str(labelled_csv), "--budget-gflops", str(budget), "--limit", "60"]
    assert main(args + ["--dry-run", "--out-dir", str(tmp_path / "dry")]) == 0
    assert (bundle_copy / "manifest.json").read_bytes() == before and (tmp_path / "dry" / "gate_curve.csv").exists()
    files = sorted(p.relative_to(bundle_copy) for p in bundle_copy.rglob("*"))
    assert not (bundle_copy / "calibration").exists()
    assert main(args + ["--dry-run"]) == 0  # no --out-dir: nothing written, in the bundle or elsewhere
    assert sorted(p.relative_to(bundle_copy) for p in bundle_copy.rglob("*")) == files
    assert (bundle_copy / "manifest.json").read_bytes() == before
    assert main(args) == 0
    cal = json.loads((bundle_copy / "manifest.json").read_text())["gate"]["calibration"]
    assert cal["fit"]["expected_gflops"] <= budget and (bundle_copy / "calibration" / "gate_curve.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--budget-gflops", "1e-6"], "below level 0's cost"),
    (["--budget-ms", "1", "--device", "no-such-device"], "unknown device profile"),
])
def test_cli_impossible_targets(bundle_copy, labelled_csv, capsys, extra, message, tmp_path):
    before = (bundle_copy / "manifest.json").read_bytes()
    rc = main([str(bundle_copy), "--data", str(labelled_csv), "--out-dir", str(tmp_path / "o")] + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert (bundle_copy / "manifest.json").read_bytes() == before and not (tmp_path / "o").exists()


def test_cli_labels_not_in_head(bundle_copy, data_dir, capsys):
    rc = main([str(bundle_copy), "--data", str(data_dir / "tiny-imagenet-200" / "labels.csv"), "--split", "val",
               "--limit", "20"])
    assert rc == 2 and "labels do not match the bundle's labels: e.g. 'n" in capsys.readouterr().err


def test_cli_budget_ms_with_latency_json(bundle_copy, labelled_csv, tmp_path):
    lat = tmp_path / "lat.json"
    lat.write_text(json.dumps({"levels": [{"level": k, "p50_ms": ms} for k, ms in enumerate([1.0, 1.5, 2.0, 3.0])]}))
    assert main([str(bundle_copy), "--data", str(labelled_csv), "--budget-ms", "4", "--device", "x86-avx2",
                 "--latency-json", str(lat), "--limit", "60", "--out-dir", str(tmp_path / "o")]) == 0
    cal = json.loads((bundle_copy / "manifest.json").read_text())["gate"]["calibration"]
    # an older report without exit_costs: the cost of exiting at k is the sum of the levels up to k
    assert cal["fit"]["expected_ms"] <= 4 and cal["latency"]["exit_cost_ms"] == [1.0, 2.5, 4.5, 7.5]
    header = next(csv.reader(open(tmp_path / "o" / "gate_curve.csv")))
    assert "fit_expected_ms" in header
