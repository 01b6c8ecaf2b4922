"""CLI values are checked where they enter: a bad one is a one-line error and exit 2, before any work starts."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "waveclip-demo"
BUNDLE = str(DEMO / "bundle")
IMAGES = str(REPO / "examples" / "images")


def _run(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


def _classify(argv):
    from runtime.classify import main
    return main(argv)


def _gate(argv):
    from calibration.gate import main
    return main(argv)


def _quantize(argv):
    from calibration.quantize import main
    return main(argv)


def _profile(argv):
    from devices.profile import main
    return main(argv)


def _export(argv):
    from export.onnx import main
    return main(argv)


CASES = [
    (_classify, [BUNDLE, IMAGES, "--threshold", "-0.5"], "--threshold"),
    (_classify, [BUNDLE, IMAGES, "--threshold", "0.1", "nan", "0.2"], "--threshold"),
    (_classify, [BUNDLE, IMAGES, "--threshold", "inf"], "--threshold"),
    (_classify, [BUNDLE, IMAGES, "--batch-size", "0"], "--batch-size"),
    (_classify, [BUNDLE, IMAGES, "--threads", "-1"], "--threads"),
    (_classify, [BUNDLE, IMAGES, "--top-k", "0"], "--top-k"),
    (_classify, [BUNDLE, IMAGES, "--max-level", "-1"], "--max-level"),
    (_classify, [BUNDLE, IMAGES, "--max-level", "9"], "max level 9"),
    (_classify, [BUNDLE, IMAGES, "--ov-property", "CPU_RUNTIME_CACHE_CAPACITY"], "--ov-property"),
    (_classify, [BUNDLE, IMAGES, "--ov-property", "CPU_RUNTIME_CACHE_CAPACITY=0"], "needs --backend openvino"),
    (_classify, [BUNDLE, IMAGES, "--backend", "openvino", "--ov-property", "NOT_A_PROPERTY=1"], "cannot compile"),
    (_classify, [BUNDLE, IMAGES, "--kv-precision", "bf16"], "--kv-precision needs --backend openvino"),
    (_classify, [BUNDLE, IMAGES, "--kv-precision", "int4"], "--kv-precision"),
    (_gate, [BUNDLE, "--data", IMAGES, "--batch-size", "0"], "--batch-size"),
    (_gate, [BUNDLE, "--data", IMAGES, "--limit", "0"], "--limit"),
    (_gate, [BUNDLE, "--data", IMAGES, "--holdout", "1"], "--holdout"),
    (_gate, [BUNDLE, "--data", IMAGES, "--max-drop", "-0.1"], "--max-drop"),
    (_gate, [BUNDLE, "--data", IMAGES, "--budget-gflops", "-1"], "--budget-gflops"),
    (_gate, [BUNDLE, "--data", IMAGES, "--max-combos", "0"], "--max-combos"),
    (_quantize, [BUNDLE, "--data", IMAGES, "-o", "{tmp}/q", "--samples", "3"], "--samples"),
    (_quantize, [BUNDLE, "--data", IMAGES, "-o", "{tmp}/q", "--eval-samples", "0"], "--eval-samples"),
    (_quantize, [BUNDLE, "--data", IMAGES, "-o", "{tmp}/q", "--eval-samples", "-5"], "--eval-samples"),
    (_quantize, [BUNDLE, "--data", IMAGES, "-o", "{tmp}/q", "--min-agreement", "nan"], "--min-agreement"),
    (_profile, [BUNDLE, "--device", "x86-avx2", "--threads", "-1"], "--threads"),
    (_profile, [BUNDLE, "--device", "x86-avx2", "--batch", "0"], "--batch"),
    (_profile, [BUNDLE, "--device", "x86-avx2", "--runs", "0"], "--runs"),
    (_profile, [BUNDLE, "--device", "x86-avx2", "--images", "0"], "--images"),
    (_export, [str(DEMO / "ckpt.pt"), "-o", "{tmp}/b", "--opset", "5"], "--opset"),
    (_export, [str(DEMO / "ckpt.pt"), "-o", "{tmp}/b", "--atol", "-1"], "--atol"),
    (_export, [str(DEMO / "ckpt.pt"), "-o", "{tmp}/b", "--atol", "nan"], "--atol"),
]


@pytest.mark.parametrize("main, argv, flag", CASES, ids=[f"{m.__name__[1:]} {' '.join(a[-2:])}" for m, a, _ in CASES])
def test_bad_values_are_refused_where_they_enter(main, argv, flag, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _run(main, argv + ["-q"] * (main in (_quantize, _profile, _export))) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and flag in err, err
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_negative_threshold_refused_by_the_installed_command():
    """The issue's exact command line."""
    out = subprocess.run([sys.executable, "-m", "runtime.classify", BUNDLE, IMAGES, "--threshold", "-0.5"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
    assert "--threshold" in out.stderr and ">= 0" in out.stderr


def test_library_callers_get_the_same_check():
    from runtime.cascade import Cascade

    with pytest.raises(ValueError, match="finite number >= 0"):
        Cascade(BUNDLE, thresholds=-0.5)
    with pytest.raises(ValueError, match="finite number >= 0"):
        Cascade(BUNDLE, thresholds=[0.1, float("nan"), 0.2])
