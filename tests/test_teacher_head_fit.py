"""bench/teacher_head_fit.py: the head refit of train.head, given to the teacher."""
import json
from pathlib import Path

import pytest

from bench_module import load_bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_teacher_gets_the_same_refit(tmp_path):
    bench = load_bench("teacher_head_fit")
    labels = REPO / "examples" / "images" / "labels.csv"  # 7 of its 8 images have a class in the demo head
    out = tmp_path / "fit.json"
    assert bench.main(["--data", str(labels), "--split", "all", "--eval-data", str(labels), "--eval-split", "all",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "(7 images)" in result["fit"] and "(7 images)" in result["held_out"]
    assert result["head_fit"]["pull"] > 0
    for key in ("top1_own_rows", "top1_refit_rows", "fit_top1_own_rows", "fit_top1_refit_rows"):
        assert 0 <= result[key] <= 1
    assert result["top1_own_rows"] == result["fit_top1_own_rows"]  # the same images both ways
    assert result["top1_own_rows"] >= 5 / 7  # chosen as images the teacher names (examples/images/LICENSE.md)

