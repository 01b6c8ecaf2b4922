"""Every command answers bad input as the package's commands do: one line on stderr starting with ``error:``, exit 2,
no usage dump, no traceback, nothing written, before any work starts (runtime/cli.py)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from bench_module import load_bench

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "waveclip-demo"
BUNDLE = str(DEMO / "bundle")
IMAGES = str(REPO / "examples" / "images")


def _demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAINS = {  # name -> (how to get its main, whether main takes argv)
    "demo.py": (lambda: _demo().main, False),
    "devices": (lambda: __import__("devices.__main__", fromlist=["main"]).main, True),
    "train.distill": (lambda: __import__("train.distill", fromlist=["main"]).main, True),
    "train.head": (lambda: __import__("train.head", fromlist=["main"]).main, True),
    "train.recipe_demo": (lambda: __import__("train.recipe_demo", fromlist=["main"]).main, False),
    "train.ablation": (lambda: __import__("train.ablation", fromlist=["main"]).main, True),
    "bench/speed.py": (lambda: load_bench("speed").main, True),
    "bench/evaluate.py": (lambda: load_bench("evaluate").main, False),
    "bench/gate_methods.py": (lambda: load_bench("gate_methods").main, True),
    "runtime.backends.trt_precision": (lambda: __import__("runtime.backends.trt_precision", fromlist=["main"]).main,
                                       True),
    "export.onnx": (lambda: __import__("export.onnx", fromlist=["main"]).main, True),
    "calibration.quantize": (lambda: __import__("calibration.quantize", fromlist=["main"]).main, True),
    "calibration.gate": (lambda: __import__("calibration.gate", fromlist=["main"]).main, True),
    "devices.profile": (lambda: __import__("devices.profile", fromlist=["main"]).main, True),
    "runtime.classify": (lambda: __import__("runtime.classify", fromlist=["main"]).main, True),
    "bench/int8_sensitivity.py": (lambda: load_bench("int8_sensitivity").main, True),
}
PARSERS = sorted(set(MAINS) - {"export.onnx", "calibration.quantize", "calibration.gate", "devices.profile"})


def _run(name: str, argv: list[str], monkeypatch) -> int:
    get, takes_argv = MAINS[name]
    main = get()
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        return main(argv) if takes_argv else main()
    except SystemExit as e:  # argparse
        return int(e.code)


def _one_error_line(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("name", PARSERS)
def test_argparse_errors_are_one_line_without_usage_dump(name, monkeypatch, capsys):
    assert _run(name, ["--no-such-flag"], monkeypatch) == 2
    _one_error_line(capsys, "--help")  # "unrecognized arguments", or first the required ones


VALUES = [
    ("devices", ["nope"], "invalid choice"),
    ("devices", ["show"], "profile"),
    ("train.distill", ["--teacher", "t", "--data", IMAGES, "--preset", "p", "--out", "{tmp}/d.pt", "--epochs", "0"],
     "--epochs"),
    ("train.distill", ["--teacher", "t", "--data", IMAGES, "--preset", "p", "--out", "{tmp}/d.pt", "--steps", "-5"],
     "--steps"),
    ("train.distill", ["--teacher", "t", "--data", IMAGES, "--preset", "p", "--out", "{tmp}/d.pt", "--lr", "-1"],
     "--lr"),
    ("train.distill", ["--teacher", "t", "--data", IMAGES, "--preset", "p", "--out", "{tmp}/d.pt", "--temperature",
                       "nan"], "--temperature"),
    ("train.distill", ["--teacher", "t", "--data", IMAGES, "--preset", "p", "--out", "{tmp}/d.pt", "--kl-weight",
                       "nan"], "--kl-weight"),
    ("train.ablation", ["--steps", "0"], "--steps"),
    ("train.ablation", ["--eval-limit", "-1"], "--eval-limit"),
    ("train.ablation", ["--threads", "0"], "--threads"),
    ("train.ablation", ["--variants", ","], "--variants"),
    ("train.recipe_demo", ["--threads", "0"], "--threads"),
    ("bench/speed.py", [BUNDLE, "--rounds", "0"], "--rounds"),
    ("bench/speed.py", [BUNDLE, "--batch", "0"], "--batch"),
    ("bench/speed.py", [BUNDLE, "--threads", "-1"], "--threads"),
    ("bench/speed.py", [BUNDLE, "--images", "0"], "--images"),
    ("bench/speed.py", [BUNDLE, "--ort-weights", "foo"], "--ort-weights"),
    ("bench/evaluate.py", ["--limit", "0"], "--limit"),
    ("runtime.classify", [BUNDLE, IMAGES, "--labels", ","], "--labels"),
    ("bench/int8_sensitivity.py", [BUNDLE, "--data", IMAGES, "--samples", "2"], "--samples"),
    ("bench/evaluate.py", ["--int8", "{tmp}/missing"], "--int8"),
    ("bench/gate_methods.py", [BUNDLE, "--data", IMAGES, "--repeats", "0"], "--repeats"),
    ("bench/gate_methods.py", [BUNDLE, "--data", IMAGES, "--holdout", "1.5"], "--holdout"),
    ("bench/gate_methods.py", [BUNDLE, "--data", IMAGES, "--z", "foo"], "--z"),
]


@pytest.mark.parametrize("name, argv, flag", VALUES, ids=[f"{n} {' '.join(a[-2:])}" for n, a, _ in VALUES])
def test_bad_values_are_refused_before_any_work(name, argv, flag, tmp_path, monkeypatch, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _run(name, argv, monkeypatch) == 2
    _one_error_line(capsys, flag)
    assert list(tmp_path.iterdir()) == []


CKPT, CSV = str(DEMO / "ckpt.pt"), str(REPO / "out" / "w14" / "tiny-imagenet-splits.csv")
OUTPUTS = [  # commands whose output lies under {blocker}, a regular file
    ("export.onnx", [CKPT, "-o", "{blocker}/b", "-q"]),
    ("calibration.quantize", [BUNDLE, "--data", IMAGES, "-o", "{blocker}/q", "-q"]),
    ("calibration.gate", [BUNDLE, "--data", IMAGES, "--out-dir", "{blocker}/g", "--dry-run"]),
    ("devices.profile", [BUNDLE, "--device", "x86-avx2", "--json", "{blocker}/p.json", "-q"]),
    ("devices.profile", [BUNDLE, "--device", "x86-avx2", "--png", "{blocker}/p.png", "-q"]),
    ("train.head", [CKPT, "-o", "{blocker}/h.pt", "--data", CSV]),
    ("runtime.backends.trt_precision", [BUNDLE, "{blocker}/fp16"]),
    ("bench/speed.py", [BUNDLE, "--json", "{blocker}/s.json"]),
    ("bench/evaluate.py", ["--json", "{blocker}/e.json"]),
    ("bench/gate_methods.py", [BUNDLE, "--data", IMAGES, "--stats", "{blocker}/s.npz"]),
    ("train.ablation", ["--json", "{blocker}/a.json"]),
]


@pytest.mark.parametrize("name, argv", OUTPUTS, ids=[f"{n} {a[-2] if a[-1] == '-q' else a[-1]}" for n, a in OUTPUTS])
def test_output_under_a_file_is_refused_before_any_work(name, argv, tmp_path, monkeypatch, capsys):
    """A file where the output's folder goes: one line naming it (it used to be a traceback after the work, or
    ``[Errno 17] File exists`` naming a staging folder)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    assert _run(name, [a.replace("{blocker}", str(blocker)) for a in argv], monkeypatch) == 2
    _one_error_line(capsys, f"{blocker} is a file, not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"] and blocker.read_text() == "not a folder\n"


def test_staged_output_names_the_output_not_its_staging_folder(tmp_path):
    from runtime.bundle import BundleError, staged_output

    blocker = tmp_path / "a-file"
    blocker.touch()
    with pytest.raises(BundleError, match=f"cannot create {blocker}/b: {blocker} is a file, not a folder"):
        with staged_output(blocker / "b"):
            pass


def test_missing_bundle_folder_is_named_so(tmp_path):
    from runtime.bundle import BundleError, load_bundle

    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "missing")
    with pytest.raises(BundleError, match=r"not a bundle \(no manifest.json\)"):
        load_bundle(tmp_path)


def test_gate_write_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """The curve or the manifest cannot be written (disk full, read-only bundle): one line, not a traceback."""
    import calibration.gate as gate

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gate, "write_curve_csv", full)
    argv = [BUNDLE, "--data", IMAGES, "--reference", "full", "--out-dir", str(tmp_path / "g"), "--dry-run"]
    assert gate.main(argv) == 2
    _one_error_line(capsys, "No space left on device")


def test_profile_report_write_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """--json that cannot be written after the measurements: the report is on stdout, the error one line."""
    import devices.profile as profile

    def full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profile, "profile_bundle", lambda args, log: {"stub": True})  # no timing here
    monkeypatch.setattr(profile, "format_markdown", lambda report: "the report\n")
    monkeypatch.setattr(profile, "write_text_atomic", full)
    assert profile.main([BUNDLE, "--device", "x86-avx2", "--json", str(tmp_path / "p.json"), "-q"]) == 2
    assert capsys.readouterr().out == "the report\n"
    assert profile.main([BUNDLE, "--device", "x86-avx2", "--json", str(tmp_path / "p.json"), "-q"]) == 2
    _one_error_line(capsys, "No space left on device")


def test_trt_precision_failure_leaves_the_old_copies(tmp_path, monkeypatch, capsys):
    """A copy that fails half way: one line, and OUT keeps the files it had (they used to be half replaced)."""
    import runtime.backends.trt_precision as trt

    out = tmp_path / "fp16"
    out.mkdir()
    for k in range(4):
        (out / f"level{k}.onnx").write_text(f"old {k}\n")
    real, made = trt.fp16_graph, []

    def fail_at_level2(src, dst):
        if Path(dst).name == "level2.onnx":
            raise OSError(28, "No space left on device")
        made.append(real(src, dst))
        return made[-1]

    monkeypatch.setattr(trt, "fp16_graph", fail_at_level2)
    assert trt.main([BUNDLE, str(out)]) == 2
    _one_error_line(capsys, str(out), "No space left on device")
    assert len(made) == 2 and sorted(p.name for p in out.iterdir()) == [f"level{k}.onnx" for k in range(4)]
    assert [(out / f"level{k}.onnx").read_text() for k in range(4)] == [f"old {k}\n" for k in range(4)]


def test_quantize_refuses_op_types_that_quantize_nothing(tmp_path, capsys):
    """A typo in --quantize-ops used to write an "int8" bundle with no node quantized."""
    from calibration.quantize import main

    for ops, message in (("Foo", "Foo is not an ONNX op type"), ("MatMul,Foo", "Foo is not an ONNX op type"),
                         ("Conv", "none is an op type of the level graphs")):
        assert main([BUNDLE, "--data", IMAGES, "-o", str(tmp_path / "q"), "--quantize-ops", ops, "-q"]) == 2
        _one_error_line(capsys, "--quantize-ops", message)
    assert list(tmp_path.iterdir()) == []


def test_speed_refuses_missing_data_instead_of_timing_other_images(tmp_path, monkeypatch, capsys):
    """--data that does not exist used to fall back to examples/images silently and run the whole benchmark."""
    speed = load_bench("speed")
    from cli_errors import run_main  # bench/, on the path once a bench script is loaded

    def no_timing(*args, **kwargs):
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(speed, "setups", no_timing)
    missing = str(tmp_path / "missing")
    assert run_main(lambda: speed.main([BUNDLE, "--data", missing, "--no-memory"])) == 2
    _one_error_line(capsys, missing)


def test_speed_memory_probe_leaves_no_image_file(tmp_path, monkeypatch):
    """The memory probes' images used to go to $TMPDIR/speed-images-PID.npy for the whole run, left behind by every run
    that failed or was interrupted; now they live in a temporary folder only while the probes run."""
    import tempfile

    import numpy as np

    speed = load_bench("speed")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", interrupted)  # the probes' processes (devices.memory)
    setup = speed.Setup("onnxruntime fp32 (levels)", BUNDLE, "onnxruntime", {}, "vit.onnx", "fp32", None)
    with pytest.raises(KeyboardInterrupt):
        speed.memory_probes([setup], np.zeros((2, 3, 8, 8), np.float32), 1)
    assert list(tmp_path.iterdir()) == []


def test_demo_passes_on_the_export_exit_status(monkeypatch, capsys, tmp_path):
    """A missing image is bad input (2, the export's one line), not a failure (1)."""
    pytest.importorskip("torch")
    missing = str(tmp_path / "missing.jpg")
    assert _run("demo.py", [missing, "--out", str(tmp_path / "out")], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"error: {missing}: no such file"]
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("argv", [["-m", "devices", "list"], ["-m", "runtime.classify", BUNDLE, IMAGES]])
def test_a_closed_pipe_ends_the_command_quietly(argv):
    """`... | head` closes the pipe before the command writes: exit 0 and no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # no reader before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_ablation_reports_a_failed_variant_in_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "distill.csv").write_text("path\n")
    ablation = __import__("train.ablation", fromlist=["main"])

    def fail(cmd, **kwargs):
        raise subprocess.CalledProcessError(2, cmd)
    monkeypatch.setattr(ablation.subprocess, "run", fail)
    assert ablation.main(["--work", str(tmp_path), "--variants", "default"]) == 1
    _one_error_line(capsys, "variant default", "exited 2")


def test_bench_scripts_map_torch_errors_without_loading_torch(capsys):
    """bench/cli_errors.py used to import model.checkpoint (and so torch, about 0.5 GiB resident) into every bench
    script, the speed bench's memory probes included: each probe's RSS, the ViT's and the cascade's alike, carried
    torch. The torch modules' errors are now looked up only where the script loaded them."""
    code = ("import sys; sys.path[:0] = ['bench', '.']; import cli_errors, speed; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    pytest.importorskip("torch")
    load_bench("speed")
    from cli_errors import run_main
    from model.checkpoint import CheckpointError

    def bad_checkpoint():
        raise CheckpointError("ckpt.pt: not a\n WaveCLIP checkpoint")

    assert run_main(bad_checkpoint) == 2
    assert _one_error_line(capsys, "ckpt.pt: not a WaveCLIP checkpoint")
    with pytest.raises(ZeroDivisionError):  # the code's own errors keep their traceback
        run_main(lambda: 1 / 0)


def test_speed_memory_probe_process_holds_no_torch(tmp_path):
    """The probe runs as the script runs (python bench/speed.py --probe-memory): it must not load torch."""
    import json

    import numpy as np

    np.save(tmp_path / "images.npy", np.zeros((1, 64, 64, 3), np.uint8))
    spec = {"setup": {"label": "onnxruntime fp32 (levels)", "bundle": BUNDLE, "backend": "onnxruntime",
                      "options": {}, "vit": "unused.onnx", "vit_precision": "fp32", "vit_hint": None},
            "what": "cascade", "images": str(tmp_path / "images.npy"), "threads": 1}
    out = subprocess.run([sys.executable, "-X", "importtime", "bench/speed.py", "--probe-memory", json.dumps(spec)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"] > 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert "runtime.cascade" in imported and "torch" not in imported


SCRIPTS = [  # script (or -m module) -> arguments that fail in argument parsing, and the option the error names
    ("bench/agreement_bound.py", [BUNDLE, "--data", IMAGES, "--limit", "0"], "--limit"),
    ("bench/bench_cluster.py", [BUNDLE, "--data", IMAGES, "--small", "0"], "--small"),
    ("bench/bench_int8.py", [BUNDLE, BUNDLE, "--data", IMAGES, "--runs", "10"], "--runs"),
    ("bench/bench_kv_cache.py", [BUNDLE, "--threads", "0"], "--threads"),
    ("bench/bench_runtime.py", [BUNDLE, "--reps", "0"], "--reps"),
    ("bench/bench_web.py", [BUNDLE, "--threads", "1", "-1"], "--threads"),
    ("bench/demo_images.py", ["--no-such-option"], "--no-such-option"),
    ("bench/full_val_equality.py", [BUNDLE, "--actors", "0"], "--actors"),
    ("bench/gate_signals.py", [BUNDLE, "--data", IMAGES, "--holdout", "1"], "--holdout"),
    ("bench/level_views.py", ["--limit", "0"], "--limit"),
    ("bench/roofline.py", [BUNDLE, "--rounds", "0"], "--rounds"),
    ("bench/teacher_head_fit.py", ["--eval-limit", "0"], "--eval-limit"),
    ("bench/teacher_pass.py", ["--data", IMAGES, "--rounds", "0"], "--rounds"),
    ("-m calibration.compare", ["fp32.parquet", "int8.parquet", "--min-agreement", "1.5"], "--min-agreement"),
]


@pytest.mark.parametrize("script, argv, flag", SCRIPTS, ids=[f"{s} {' '.join(a[-2:])}" for s, a, _ in SCRIPTS])
def test_bench_scripts_refuse_bad_options_in_one_line(script, argv, flag):
    """Run as their docstrings say: a bad option value is one line naming it (exit 2), no usage dump, no output."""
    proc = subprocess.run([sys.executable, *script.split(), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and "usage:" not in err and flag in err and "--help)" in err, err
    assert proc.stdout == ""


JSON_SCRIPTS = {"bench/bench_cluster.py": [BUNDLE, "--data", IMAGES],
                "bench/bench_int8.py": [BUNDLE, BUNDLE, "--data", IMAGES], "bench/bench_kv_cache.py": [BUNDLE], "bench/evaluate.py": [], "bench/level_views.py": [],
                "bench/roofline.py": [BUNDLE], "bench/speed.py": [BUNDLE], "bench/teacher_head_fit.py": []}


@pytest.mark.parametrize("script", sorted(JSON_SCRIPTS))
def test_bench_scripts_refuse_an_unwritable_json_before_the_run(script, tmp_path):
    """--json used to be checked only when written, after the whole run: a path under a file lost a long benchmark's
    numbers. (A missing folder is made: the numbers are written atomically, parents created.)"""
    (tmp_path / "afile").write_text("")
    where = str(tmp_path / "afile" / "out.json")
    proc = subprocess.run([sys.executable, script, *JSON_SCRIPTS[script], "--json", where], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "--json" in err and "is a file" in err, err
    assert proc.stdout == ""
