"""bench/gate_methods.py: the in-sample bound and the study's table, on made-up per-level predictions."""
import numpy as np

from calibration.gate_search import LevelStats

from bench_module import load_bench

G = load_bench("gate_methods")
CUM = np.array([1.0, 2.0, 4.0])


def stats(n: int = 200, seed: int = 0) -> LevelStats:
    """Level 0 right and confident on the first half, wrong and unsure on the rest, where the last level is right."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 5, n)
    pred = np.stack([target.copy() for _ in range(3)])
    hard = np.arange(n) >= n // 2
    pred[:2, hard] = (target[hard] + 1) % 5
    margin = np.where(hard, rng.uniform(0.0, 0.3, n), rng.uniform(0.6, 1.0, n))[None].repeat(3, 0)
    return LevelStats(pred, margin.astype(np.float32), target, CUM)


def test_in_sample_saving_is_the_cheapest_point_within_the_drop():
    s = stats()
    # the easy half exits at level 0 (cost 1), the hard half must reach level 2 (cost 4): (0.5 + 2) / 4 spent
    assert G.in_sample_saving(s, 0.0) == 1 - (0.5 * 1 + 0.5 * 4) / 4
    # a 10-point drop lets the 20 hard images with the highest margins leave at level 0 too
    assert G.in_sample_saving(s, 0.1) == 1 - (0.6 * 1 + 0.4 * 4) / 4


def test_main_prints_the_bound_and_every_rule(tmp_path, capsys):
    s = stats()
    path = tmp_path / "stats.npz"
    np.savez(path, pred=s.pred, margin=s.margin, target=s.target, cum_gflops=s.cum_gflops)
    assert G.main(["unused-bundle", "--data", "unused", "--stats", str(path), "--repeats", "3", "--z", "1",
                   "--max-drop", "0"]) == 0
    out = capsys.readouterr().out
    assert "in-sample bound" in out and "saves 37.5%" in out
    for rule in ("| exhaustive |", "| shared |", "| exhaustive-se (z=1) |"):
        assert rule in out
    # separable margins: every rule keeps the full accuracy on the held-apart images (what it saves there depends on
    # how many easy images the split holds)
    for rule in ("exhaustive", "shared", "exhaustive-se (z=1)"):
        assert f"| {rule} | 0.00 / 0.00 pt | 0% |" in out
