"""bench/gate_signals.py: the exit signals and their held-apart score, on made-up per-level probabilities."""
import numpy as np

from bench_module import load_bench

S = load_bench("gate_signals")
CUM = np.array([1.0, 2.0, 4.0])


def levels(n: int = 300, classes: int = 6, seed: int = 0) -> dict:
    """Level 0 right and peaked on the first half, wrong and flat on the rest, where levels 1-2 are right."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, classes, n)
    probs = np.full((n, 3, classes), 0.1 / (classes - 1))
    hard = np.arange(n) >= n // 2
    probs[np.arange(n), :, target] = 0.9
    wrong = (target + 1) % classes
    probs[hard, 0] = 1.0 / classes
    probs[hard, 0, wrong[hard]] += 0.01
    probs[:, 0] /= probs[:, 0].sum(-1, keepdims=True)
    return {"probs": probs, "emb": rng.normal(size=(n, 3, 4)), "target": target, "cum": CUM}


def test_fixed_signals_rank_the_easy_images_first():
    m = levels()
    signals = S.fixed_signals(m["probs"])
    easy = np.arange(300) < 150
    for name, v in signals.items():
        assert v.shape == (300, 3) and v.min() >= 0 and v.max() <= 1 + 1e-9, name
        assert v[easy, 0].min() > v[~easy, 0].max(), name
    assert np.all(signals["margin x agreement"][~easy, 1] == 0)  # level 1 disagrees with level 0 on the hard half
    mean = S.levels_mean(m["probs"])
    assert np.allclose(mean[:, 0], m["probs"][:, 0]) and np.allclose(mean.sum(-1), 1)
    both = np.sqrt(m["probs"][:, 0] * m["probs"][:, 1])
    assert np.allclose(mean[:, 1], both / both.sum(-1, keepdims=True))  # levels 0-1: their normalised geometric mean


def test_score_lets_only_the_easy_half_leave_at_level_0():
    m = levels()
    pred = m["probs"].argmax(-1)
    r = S.score(pred, lambda idx: S.fixed_signals(m["probs"])["margin"], m["target"], CUM, 0.0, 0.0, 0.3, 3)
    assert r["drop_worst"] <= 1e-9 and r["over"] == 0
    assert abs(r["saved"] - 0.625) < 0.05  # the easy half leaves at cost 1 of 4, the hard half at level 1 (2 of 4)


def test_learned_signal_is_fitted_on_the_fit_part_only():
    m = levels()
    fit = S.learned_signal(m["probs"], m["emb"], m["target"])
    every, easy = fit(np.arange(300)), fit(np.arange(150))  # the easy half alone: leaving at level 0 is always safe
    assert every.shape == (300, 3) and np.all(every[:, -1] == 1)
    assert every[:150, 0].min() > 0.5 > every[150:, 0].max()
    assert np.all(easy[:, 0] == 1)  # the hard half's outcomes were not seen


def test_main_prints_every_signal(tmp_path, capsys):
    path = tmp_path / "levels.npz"
    np.savez(path, **levels())
    assert S.main(["unused", "--data", "unused", "--levels", str(path), "--repeats", "2", "--max-drop", "0"]) == 0
    out = capsys.readouterr().out
    for name in ("| margin |", "| max-prob |", "| 1-entropy |", "| margin x agreement |", "| learned |"):
        assert name in out


def test_per_level_heads_are_fitted_to_each_level(tiny_bundle):
    from runtime.bundle import load_bundle

    b = load_bundle(tiny_bundle)
    classes, dim, levels_ = b.head_weight.shape[0], b.head_weight.shape[1], b.num_levels
    rng = np.random.default_rng(0)
    target = np.arange(80) % classes
    centres = rng.normal(size=(levels_, classes, dim)).astype(np.float32)  # each level its own class directions
    emb = centres[:, target].transpose(1, 0, 2) + 0.1 * rng.normal(size=(80, levels_, dim)).astype(np.float32)
    fit = {"emb": emb, "target": target}
    probs = S.per_level_head_probs(str(tiny_bundle), fit, fit)
    assert probs.shape == (80, levels_, classes) and np.allclose(probs.sum(-1), 1, atol=1e-5)
    before = (b.logit_scale * (emb / np.linalg.norm(emb, axis=-1, keepdims=True)) @ b.head_weight.T).argmax(-1)
    assert ((probs.argmax(-1) == target[:, None]).mean(0) > (before == target[:, None]).mean(0)).all()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert S.main([str(tmp_path / "missing-bundle"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
