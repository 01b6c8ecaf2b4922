"""`python -m devices.profile`: per-level and cascade latency, baselines, ratios, JSON/Markdown/PNG, machine record."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from devices import baseline, machine, memory
from devices.profile import main as profile_main
from devices.profile import parse_args, summarize

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "images"
FAST = ["--runs", "3", "--warmup", "1", "--images", "4", "--batch", "2", "--threads", "1", "--data", str(IMAGES),
        "--no-power-sample", "-q"]
LEVEL_KEYS = {"level", "batch", "gflops", "cumulative_gflops", "min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms",
              "mean_ms", "runs"}
STATS = {"min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "runs"}


@pytest.fixture(scope="module")
def fp32_profile(tmp_path_factory) -> Path:
    """x86-avx512-vnni with precision fp32 (the tiny bundle is fp32)."""
    text = (ROOT / "devices" / "profiles" / "x86-avx512-vnni.toml").read_text()
    text = text.replace('name = "x86-avx512-vnni"', 'name = "x86-avx512-vnni-fp32"')
    text = text.replace('precision = "int8"', 'precision = "fp32"')
    path = tmp_path_factory.mktemp("profile") / "x86-avx512-vnni-fp32.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """A tiny single-input image graph [batch, 3, 16, 16] -> [batch, 3] standing in for ViT-B-16."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "tiny-vit", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("baseline") / "tiny-vit.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def report(tiny_bundle, tmp_path_factory):
    """One profiler run on the x86-avx512-vnni profile (int8) with the fp32 tiny bundle, baseline none."""
    out = tmp_path_factory.mktemp("report")
    argv = [str(tiny_bundle), "--device", "x86-avx512-vnni", "--allow-precision-mismatch", "--baseline", "none",
            *FAST, "--exit-mix", "40,30,20,10", "--json", str(out / "p.json"), "--markdown", str(out / "p.md"),
            "--png", str(out / "p.png")]
    assert profile_main(argv) == 0
    return out, json.loads((out / "p.json").read_text())


def test_json_has_every_field(report, tiny_bundle, capsys):
    out, r = report
    assert {"tool", "date", "command", "bundle", "thresholds", "device", "settings", "machine", "levels", "cascade",
            "exit_histogram", "expected_latency", "throughput", "baselines", "ratios", "notes"} <= set(r)
    assert r["bundle"]["name"] == "waveclip-tiny" and r["bundle"]["precision"] == "fp32"
    assert r["device"]["name"] == "x86-avx512-vnni" and r["device"]["precision"] == "int8"
    assert r["settings"]["precision_mismatch"] is True and r["settings"]["threads"] == 1
    assert r["settings"]["runs"] == 3 and r["settings"]["batch"] == 2 and r["settings"]["images"] == 4
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert r["thresholds"] == manifest["gate"]["thresholds"]

    assert [lv["level"] for lv in r["levels"]] == [0, 1, 2, 3]
    for lv, mlv in zip(r["levels"], manifest["levels"]):
        assert set(lv) == LEVEL_KEYS and lv["batch"] == 1 and lv["runs"] == 3
        assert lv["gflops"] == pytest.approx(mlv["gflops"], rel=1e-3)
        assert 0 < lv["min_ms"] <= lv["p50_ms"] <= lv["p90_ms"] <= lv["p99_ms"] <= lv["max_ms"]

    c = r["cascade"]
    assert c["images"] == 4 and c["batch"] == 1
    for key in ("preprocess", "cascade", "total"):
        assert set(c[key]) == STATS and c[key]["runs"] == 4
    assert c["total"]["mean_ms"] == pytest.approx(c["preprocess"]["mean_ms"] + c["cascade"]["mean_ms"], abs=1e-3)

    hist = r["exit_histogram"]
    assert [h["level"] for h in hist] == [0, 1, 2, 3] and sum(h["count"] for h in hist) == 4
    assert hist[0]["reach_fraction"] == 1.0 and sum(h["fraction"] for h in hist) == pytest.approx(1.0)
    e = r["expected_latency"]
    want = sum(h["fraction"] * c["mean_ms"] for h, c in zip(hist, r["exit_costs"]))
    assert e["expected_ms"] == pytest.approx(want, abs=1e-3) and e["measured_mean_ms"] == c["cascade"]["mean_ms"]
    assert e["expected_gflops"] > 0

    t = r["throughput"]
    assert t["batch"] == 2 and "vit_b16" not in t
    for key in ("cascade", "always_full"):
        assert t[key]["batch"] == 2 and t[key]["images_per_s"] > 0 and STATS <= set(t[key])

    full = r["baselines"]["always_full"]
    assert full["thresholds"] == [2.0, 2.0, 2.0] and full["cascade"]["runs"] == 4
    assert r["baselines"]["vit_b16"]["skipped"] is True
    q = r["ratios"]
    assert q["cascade_vs_always_full"] == pytest.approx(c["cascade"]["mean_ms"] / full["cascade"]["mean_ms"],
                                                        rel=1e-3)
    assert q["cascade_vs_vit_b16"] is None and q["level0_vs_vit_b16"] is None and "basis" in q
    assert q["p50"]["cascade_vs_always_full"] == pytest.approx(c["cascade"]["p50_ms"] / full["cascade"]["p50_ms"],
                                                               rel=1e-3)

    m = r["machine"]
    assert m["threads_used"] == 1 and m["cpu"]["logical_cores"] and m["versions"]["onnxruntime"]
    assert len(r["settings"]["load_average_start"]) == 3 and len(r["settings"]["load_average_end"]) == 3

    mem = r["memory"]  # the cascade loaded again in a fresh process; no baseline here, so no ratio
    assert mem["cascade"]["rss_mib"] > 0 and mem["cascade"]["peak_mib"] >= mem["cascade"]["rss_mib"]
    assert mem["vit_b16"] is None and q["memory_cascade_vs_vit_b16"] is None

    md = (out / "p.md").read_text()
    assert "| level | GFLOPs |" in md and "always-full" in md and "Expected cascade latency" in md
    assert "## Resident memory" in md
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_json_feeds_the_gate(report, tiny_bundle, tmp_path):
    """exit_costs[].mean_ms (the cost of exiting at each level) is what calibration.gate --latency-json reads; a
    budget of the costliest exit is feasible. (Not "of the always-full cost": these are timings of a tiny model, and
    on a loaded machine level 3's mean came out below level 0's, 1.16 vs 1.70 ms, in one CI run.)"""
    import shutil

    from calibration.gate import main as gate_main
    from calibration.gate import read_latency_json

    out, r = report
    ms = read_latency_json(out / "p.json", 4)
    assert list(ms) == [c["mean_ms"] for c in r["exit_costs"]]
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    assert gate_main([str(bundle), "--data", str(IMAGES), "--reference", "full", "--holdout", "0.25",
                      "--budget-ms", str(float(max(ms)) + 1e-3), "--device", "x86-avx512-vnni",
                      "--latency-json", str(out / "p.json"), "--out-dir", str(tmp_path / "gate"), "--dry-run"]) == 0


def test_vit_baseline_from_a_path(tiny_bundle, fp32_profile, tiny_onnx, tmp_path, capsys):
    assert profile_main([str(tiny_bundle), "--device", str(fp32_profile), "--baseline", str(tiny_onnx), *FAST,
                         "--json", str(tmp_path / "p.json"), "--png", str(tmp_path / "p.png")]) == 0
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["settings"]["precision_mismatch"] is False and r["device"]["precision"] == "fp32"
    vit = r["baselines"]["vit_b16"]
    assert vit["skipped"] is False and vit["path"] == str(tiny_onnx) and vit["name"] == "tiny-vit"
    assert STATS <= set(vit["batch1"]) and vit["batch1"]["runs"] == 3 and vit["batch_b"]["batch"] == 2
    assert r["throughput"]["vit_b16"]["images_per_s"] > 0
    q = r["ratios"]
    for key in ("cascade_vs_vit_b16", "always_full_vs_vit_b16", "level0_vs_vit_b16",
                "throughput_cascade_vs_vit_b16"):
        assert q[key] is not None and q[key] > 0
    assert q["level0_vs_vit_b16"] == pytest.approx(r["levels"][0]["mean_ms"] / vit["batch1"]["mean_ms"], rel=1e-3)
    assert q["p50"]["level0_vs_vit_b16"] == pytest.approx(r["levels"][0]["p50_ms"] / vit["batch1"]["p50_ms"], rel=1e-3)
    mem = r["memory"]
    assert mem["cascade"]["rss_mib"] > 0 and mem["vit_b16"]["rss_mib"] > 0
    assert q["memory_cascade_vs_vit_b16"] == pytest.approx(mem["cascade"]["rss_mib"] / mem["vit_b16"]["rss_mib"],
                                                           rel=1e-3)
    stdout = capsys.readouterr().out
    assert "| tiny-vit baseline |" in stdout and "level 0 / tiny-vit" in stdout
    assert "cascade / tiny-vit: " in stdout
    assert (tmp_path / "p.png").stat().st_size > 0


def test_baseline_feed_and_auto_without_torch(tiny_onnx, tmp_path, monkeypatch):
    timer = baseline.OnnxTimer(tiny_onnx, "onnxruntime", "CPUExecutionProvider", 1)
    images = np.full((3, 64, 64, 3), 255, np.uint8)
    x = timer.feed(5, images)
    assert x.shape == (5, 3, 16, 16) and x.dtype == np.float32
    # real (white) pixels, CLIP-normalised
    assert np.allclose(x[:, 0], (1 - baseline.CLIP_MEAN[0]) / baseline.CLIP_STD[0], atol=1e-5)
    timer.run(x)
    monkeypatch.setattr(baseline, "CACHE_DIR", tmp_path / "empty")
    monkeypatch.setattr(baseline, "torch_available", lambda: False)
    choice = baseline.resolve_baseline("auto")
    assert choice.path is None and "torch" in choice.note and "skipped" in choice.note
    assert baseline.resolve_baseline("none").path is None
    assert baseline.resolve_baseline(str(tiny_onnx)).path == tiny_onnx
    with pytest.raises(baseline.BaselineError, match="no such baseline"):
        baseline.resolve_baseline(str(tmp_path / "missing.onnx"))


def test_precision_mismatch_is_refused(tiny_bundle, capsys):
    assert profile_main([str(tiny_bundle), "--device", "x86-avx512-vnni", "--baseline", "none", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "precision is fp32" in err and "--allow-precision-mismatch" in err


@pytest.mark.parametrize("profile, module, extra", [("x86-avx512-vnni", "onnxruntime", "runtime"),
                                                    ("x86-avx512-vnni-openvino", "openvino", "openvino")])
def test_missing_backend_names_the_extra(tiny_bundle, monkeypatch, capsys, profile, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert profile_main([str(tiny_bundle), "--device", profile, "--allow-precision-mismatch", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install 'waveclip-edge[{extra}]'" in err


@pytest.mark.parametrize("argv, message", [
    (["{bundle}", "--device", "no-such-device"], "unknown device profile 'no-such-device'"),
    (["{missing}", "--device", "x86-avx2"], "no such bundle folder"),
    (["{bundle}", "--device", "x86-avx2", "--baseline", "{missing}.onnx"], "no such ONNX file"),
    (["{bundle}", "--device", "x86-avx2", "--allow-precision-mismatch", "--data", "{missing}"], "no such data"),
])
def test_bad_input_is_one_line_exit_2(tiny_bundle, tmp_path, capsys, argv, message):
    argv = [a.format(bundle=tiny_bundle, missing=tmp_path / "missing") for a in argv]
    assert profile_main(argv + ["--baseline", "none"] * ("--baseline" not in argv) + ["-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--device", "--runs", "--warmup", "--batch", "--data", "--images", "--json", "--markdown", "--png",
                 "--baseline", "--threads", "--allow-precision-mismatch", "--latency-json"):
        assert flag in text


def test_profiler_does_not_import_torch(tiny_bundle, tiny_onnx):
    argv = [str(tiny_bundle), "--device", "x86-avx512-vnni", "--allow-precision-mismatch", "--baseline",
            str(tiny_onnx), *FAST]
    code = ("import sys; from devices.profile import main; "
            f"rc = main({argv!r}); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


def test_memory_probe_process_loads_the_cascade_without_torch(tiny_bundle):
    """What devices.profile's memory column counts: a fresh process with the cascade, one image, and no torch."""
    spec = {"what": "cascade", "bundle": str(tiny_bundle), "profile": "x86-avx512-vnni", "threads": 1, "batch": 2,
            "weights": "auto", "inference_precision": None, "image": str(next(IMAGES.glob("*.jpg")))}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "devices.memory", json.dumps(spec)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["rss_mib"] > 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time")}
    assert "runtime.cascade" in imported and "torch" not in imported
    assert memory.in_fresh_process({**spec, "bundle": str(tiny_bundle / "missing")})["rss_mib"] is None


def test_summarize_percentiles():
    s = summarize(list(range(1, 101)))
    assert s["min_ms"] == 1 and s["max_ms"] == 100 and s["p50_ms"] == 50.5 and s["runs"] == 100
    assert s["p90_ms"] == pytest.approx(90.1) and s["p99_ms"] == pytest.approx(99.01) and s["mean_ms"] == 50.5


# --- machine record -----------------------------------------------------------------------------------------------
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

Model\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_machine_record_has_cpu_fields():
    m = machine.machine_record(threads=3, power_sample=False)
    cpu = m["cpu"]
    assert {"model", "architecture", "physical_cores", "logical_cores", "usable_cpus", "flags", "isa"} <= set(cpu)
    assert set(machine.FLAGS_OF_INTEREST) <= set(cpu["flags"])
    for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd", "asimddp"):
        assert isinstance(cpu["flags"][flag], bool)
    assert cpu["logical_cores"] == os.cpu_count() and m["threads_used"] == 3
    assert m["python"] and m["os"]["system"] and m["versions"]["numpy"] == np.__version__
    assert {"numpy", "onnxruntime", "openvino", "tensorrt"} <= set(m["versions"])
    json.dumps(m)  # serialisable
    assert "threads used: 3" in machine.describe(m)


def test_parse_cpuinfo_arm():
    info = machine.parse_cpuinfo(ARM_CPUINFO)
    assert info["model"] == "Raspberry Pi 5 Model B Rev 1.0" and info["logical"] == 2
    assert {"asimd", "asimddp"} <= set(info["flags"]) and info["id"]["part"] == "0xd0b"


def test_jetson_record_is_best_effort(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "TEGRA_RELEASE", tmp_path / "absent")
    assert machine.jetson_record() is None
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"nvpmodel": "echo 'NV Power Mode: 25W'; echo 1",
               "jetson_clocks": "echo 'cpu0: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 "
                                "CurrentFreq=1510400 IdleStates: WFI=0'",
               "tegrastats": "while true; do echo 'RAM 2000/7620MB CPU [5%@1510] VDD_IN 4800mW/4700mW "
                             "VDD_CPU_GPU_CV 600mW/590mW'; sleep 0.1; done"}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(machine, "TEGRA_RELEASE", release)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(machine, "tegrastats_sample",
                        lambda seconds=1.0, interval_ms=250, f=machine.tegrastats_sample: f(0.3, interval_ms))
    j = machine.jetson_record()
    assert j["tegra_release"].startswith("# R36") and j["nvpmodel"]["mode"] == "25W" and j["nvpmodel"]["id"] == 1
    assert j["jetson_clocks"]["locked"] is True
    assert j["tegrastats"]["power_mw"]["VDD_IN"] == {"mw": 4800, "avg_mw": 4700}


def test_exit_mix_times_the_real_cascade_at_an_operating_point(report):
    """--exit-mix: every image forced to an exit of a plan whose counts follow the mix; expected vs measured."""
    _, r = report
    m = r["exit_mix"]
    assert m["mix"] == [0.4, 0.3, 0.2, 0.1] and sum(m["plan_counts"]) == m["images"] == 4
    assert m["cascade"]["runs"] == 4 and m["expected_ms"] > 0 and m["expected_vs_measured"] > 0
    assert m["throughput"]["batch"] == 2 and m["throughput"]["images_per_s"] > 0
    assert [c["level"] for c in r["exit_costs"]] == [0, 1, 2, 3] and all(c["runs"] == 3 for c in r["exit_costs"])
    assert "exit_mix_vs_vit_b16" in r["ratios"]


def test_exit_mix_bad_values_exit_2(tiny_bundle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([str(tiny_bundle), "--device", "x86-avx2", "--exit-mix", "40,x"])
    assert e.value.code == 2
    rc = profile_main([str(tiny_bundle), "--device", "x86-avx512-vnni", "--allow-precision-mismatch", "--baseline",
                       "none", *FAST, "--exit-mix", "50,50"])
    assert rc == 2 and "--exit-mix has 2 values, the bundle has 4 levels" in capsys.readouterr().err


def test_int8_kernel_kind_follows_the_flags():
    def cpu(arch="x86_64", **on):
        return {"architecture": arch, "flags": {f: on.get(f, False) for f in machine.FLAGS_OF_INTEREST}}
    assert machine.int8_kernel_kind(cpu(avx2=True, avx512f=True, avx512_vnni=True)) == "vnni"
    assert machine.int8_kernel_kind(cpu(avx2=True, avx_vnni=True)) == "vnni"  # Alder Lake and later
    assert machine.int8_kernel_kind(cpu(avx2=True, avx512f=True, amx_int8=True, avx512_vnni=True)) == "vnni"
    assert machine.int8_kernel_kind(cpu(avx2=True)) == "avx2"  # e.g. AMD Zen 1-3
    assert machine.int8_kernel_kind(cpu(avx2=True, avx512f=True)) is None  # AVX-512 without VNNI: not recorded
    assert machine.int8_kernel_kind(cpu("aarch64", asimd=True)) is None
    assert machine.int8_kernel_kind() in ("vnni", "avx2", None)  # this machine's record
