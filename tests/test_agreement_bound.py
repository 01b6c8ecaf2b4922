"""bench/agreement_bound.py: noise at an exact cosine, and the agreement it leaves."""
from pathlib import Path

import numpy as np

from runtime.bundle import load_bundle
from runtime.cascade import Cascade
from runtime.preprocess import preprocess

from bench_module import load_bench

REPO = Path(__file__).resolve().parents[1]
A = load_bench("agreement_bound")


def test_perturb_sets_the_cosine_exactly():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 32)) * rng.uniform(0.1, 10, (50, 1))
    for c in (0.5, 0.999, 0.99995):
        out = A.perturb(emb, c, rng)
        cos = (out * emb).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(emb, axis=1)
        np.testing.assert_allclose(cos, c, atol=1e-9)


def test_agreement_falls_with_the_cosine(tiny_bundle, sample_images, capsys):
    bundle = load_bundle(tiny_bundle)
    cascade = Cascade(bundle, "onnxruntime", providers=["CPUExecutionProvider"], weights="levels")
    embs = cascade.run_all_levels(preprocess(sample_images, bundle.preprocessing))
    table = A.agreement_table(cascade, embs, [0.999999999, 0.0001])
    assert all(row[0] == 1.0 for row in table) and min(row[1] for row in table) < 1.0
    assert A.main([str(tiny_bundle), "--data", str(sample_images[0].parent), "--limit", "8"]) == 0
    assert "| 0 |" in capsys.readouterr().out
    assert A.main([str(tiny_bundle), "--data", str(sample_images[0].parent), "--cosines", "1.5"]) == 2
