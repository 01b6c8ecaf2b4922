"""bench/level_views.py: the detail each level holds, and the teacher's top-1 on it."""
from pathlib import Path

import numpy as np
import pywt

from bench_module import load_bench

REPO = Path(__file__).resolve().parents[1]
V = load_bench("level_views")


def test_thumbnail_is_the_haar_low_pass_band():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    for scale in (1, 2, 3):
        ll = pywt.wavedec2(images.astype(np.float64), "haar", level=scale, axes=(1, 2), mode="periodization")[0]
        np.testing.assert_allclose(V.thumbnail(images, 2 ** scale), ll / 2 ** scale, atol=1e-9)


def test_table_on_the_shipped_examples(capsys):
    labels = REPO / "examples" / "images" / "labels.csv"
    assert V.main(["--data", str(labels), "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 8 px |" in out and "| 3 | 64 px |" in out
    assert V.main(["--data", str(REPO / "no-such.csv"), "--split", "all"]) == 2
    assert V.main(["--data", str(labels), "--split", "val"]) == 2  # no split column: one-line error
