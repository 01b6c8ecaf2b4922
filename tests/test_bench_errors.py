"""Every bench script answers bad input (no such bundle, data, checkpoint or teacher) with one line and exit 2, as
the package's commands do, not with a traceback (bench/cli_errors.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent-waveclip-input"
CASES = {
    "agreement_bound.py": [MISSING, "--data", MISSING],
    "bench_cluster.py": [str(ROOT / "models" / "waveclip-demo" / "bundle"), "--data", MISSING],
    "bench_int8.py": [MISSING, MISSING, "--data", MISSING],
    "bench_kv_cache.py": [MISSING],
    "bench_runtime.py": [MISSING],
    "evaluate.py": ["--bundle", MISSING],
    "full_val_equality.py": [MISSING],
    "gate_methods.py": [MISSING, "--data", MISSING],
    "gate_signals.py": [MISSING, "--data", MISSING],
    "level_views.py": ["--bundle", MISSING],
    "roofline.py": [MISSING],
    "speed.py": [MISSING],
    "teacher_head_fit.py": ["--data", MISSING],
    "teacher_pass.py": ["--data", MISSING],
}


def test_every_bench_script_is_covered():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py") if "run_main(main)" in p.read_text()}
    # bench_web needs a browser; demo_images reads the shipped images
    assert scripts - {"bench_web.py", "demo_images.py"} == set(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(script):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *CASES[script]], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "error:" in out.stderr and MISSING in out.stderr.strip().splitlines()[-1]
