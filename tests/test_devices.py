"""Device profiles, their validation, `python -m devices` and the trtexec command lines."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from devices.__main__ import main
from devices.machine import FLAGS_OF_INTEREST
from devices.match import auto_profile_name, match_profile
from devices.profile_config import (PROFILES_DIR, ProfileError, check_backend_available, list_profiles, load_profile,
                                    profile_names, required_extra)
from devices.trtexec import BundleError, build_command, run_commands, trtexec_script

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"jetson-orin-nano", "jetson-agx-orin", "jetson-xavier-nx", "raspberry-pi-5", "arm64-cpu",
            "x86-avx512-vnni", "x86-avx512-vnni-openvino", "x86-avx2", "x86-avx2-openvino"}
GOOD = """\
name = "my-device"
description = "test device"
backend = "tensorrt"
execution_provider = "GPU"
precision = "fp16"
threads = 0
batch_sizes = [1, 4]
setup = "notes"

[tensorrt]
workspace_mib = 512
opt_batch = 2

[jetson]
jetpack = "6.2"
nvpmodel_id = 1
nvpmodel_name = "25W"
"""


def write(tmp_path: Path, text: str, name: str = "my-device.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def fake_bundle(tmp_path: Path, precision: str = "fp32") -> Path:
    """A manifest with 2 levels (2 layers of KV at level 1), as export writes it; no graphs needed."""
    kv = [{"name": f"past_key_values.{i}.{kind}", "shape": ["batch", 12, 50, 64], "dtype": "float32"}
          for i in range(2) for kind in ("key", "value")]
    levels = [{"level": 0, "file": "level0.onnx", "outputs": [],
               "inputs": [{"name": "patches", "shape": ["batch", 49, 48], "dtype": "float32"}]},
              {"level": 1, "file": "level1.onnx", "outputs": [],
               "inputs": [{"name": "patches", "shape": ["batch", 49, 144], "dtype": "float32"}, *kv]}]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format_version": 1, "levels": levels, "precision": precision}))
    return bundle


def test_shipped_profiles_parse_and_validate():
    profiles = list_profiles()
    assert {p.name for p in profiles} == EXPECTED == set(profile_names())
    for p in profiles:
        assert p.path.stem == p.name
        assert p.description and p.setup.strip()
        required_extra(p.backend)
        if p.backend == "tensorrt":
            assert p.jetson and p.jetson.jetson_clocks and p.tensorrt.version and p.precision in ("fp16", "int8")
        else:
            assert p.tensorrt is None and p.precision == "int8" and p.threads == 4
    assert load_profile("raspberry-pi-5").execution_provider == "CPUExecutionProvider"
    assert load_profile("x86-avx2-openvino").execution_provider == "CPU"


def test_profile_by_path(tmp_path):
    p = load_profile(str(write(tmp_path, GOOD)))
    assert (p.name, p.backend, p.batch_sizes, p.max_batch, p.iterations) == ("my-device", "tensorrt", (1, 4), 4, 1000)
    assert (p.tensorrt.workspace_mib, p.tensorrt.opt_batch, p.tensorrt.dla_core) == (512, 2, None)
    assert p.jetson.nvpmodel_name == "25W" and p.jetson.jetson_clocks is True
    assert load_profile(str(PROFILES_DIR / "arm64-cpu.toml")).name == "arm64-cpu"


@pytest.mark.parametrize("old,new,field", [
    ('backend = "tensorrt"', 'backend = "tflite"', "backend"),
    ('precision = "fp16"', 'precision = "bf16"', "precision"),
    ("threads = 0", "threads = -1", "threads"),
    ("threads = 0", 'threads = "all"', "threads"),
    ("threads = 0", "threads = true", "threads"),
    ("threads = 0", "threads = 0\ncolour = 3", "colour"),
    ("opt_batch = 2", "opt_batch = 2\nworkspace = 3", "tensorrt.workspace"),
    ("opt_batch = 2", "opt_batch = 9", "tensorrt.opt_batch"),
    ("batch_sizes = [1, 4]", "batch_sizes = []", "batch_sizes"),
    ('execution_provider = "GPU"', 'execution_provider = "CUDAExecutionProvider"', "execution_provider"),
    ('nvpmodel_id = 1', 'nvpmodel_id = "1"', "jetson.nvpmodel_id"),
    ('name = "my-device"', 'name = "My Device"', "name"),
    ('description = "test device"\n', "", "description"),
])
def test_bad_profile_names_file_and_field(tmp_path, old, new, field):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: {field}:"), msg


def test_bad_profile_misc(tmp_path):
    cpu = GOOD.split("\n[tensorrt]")[0].replace('"tensorrt"', '"onnxruntime"')
    cpu = cpu.replace('"GPU"', '"CPUExecutionProvider"')
    assert load_profile(str(write(tmp_path, cpu, "cpu.toml"))).tensorrt is None
    with pytest.raises(ProfileError, match=r"tensorrt: only allowed with backend 'tensorrt'"):
        load_profile(str(write(tmp_path, cpu + "[tensorrt]\nopt_batch = 1\n", "cpu2.toml")))
    with pytest.raises(ProfileError, match="invalid TOML"):
        load_profile(str(write(tmp_path, "name = ", "broken.toml")))
    with pytest.raises(ProfileError, match="unknown device profile 'nope'"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(str(tmp_path / "missing.toml"))
    with pytest.raises(ProfileError, match="'DLA' and tensorrt.dla_core go together"):
        load_profile(str(write(tmp_path, GOOD.replace("opt_batch = 2", "opt_batch = 2\ndla_core = 0"), "d.toml")))


def test_required_extra():
    assert [required_extra(b) for b in ("onnxruntime", "openvino", "tensorrt")] == ["runtime", "openvino", "tensorrt"]
    with pytest.raises(ProfileError):
        required_extra("tflite")


@pytest.mark.parametrize("name,module,extra", [("x86-avx2-openvino", "openvino", "openvino"),
                                               ("jetson-orin-nano", "tensorrt", "tensorrt"),
                                               ("x86-avx2", "onnxruntime", "runtime")])
def test_missing_backend_names_the_extra(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ProfileError) as e:
        check_backend_available(load_profile(name))
    assert f"backend '{module}' is not installed: pip install 'waveclip-edge[{extra}]'" in str(e.value)


def test_onnxruntime_provider_checked():
    pytest.importorskip("onnxruntime")
    check_backend_available(load_profile("x86-avx2"))
    p = load_profile("x86-avx2")
    with pytest.raises(ProfileError, match="BogusExecutionProvider"):
        check_backend_available(dataclasses.replace(p, execution_provider="BogusExecutionProvider"))


def test_cli_list_shows_all_names():
    out = subprocess.run([sys.executable, "-m", "devices", "list"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    table, footer = out.split("\n\n")
    assert table.splitlines()[0].split()[:5] == ["NAME", "BACKEND", "PROVIDER", "PRECISION", "THREADS"]
    assert {line.split()[0] for line in table.splitlines()[1:]} == EXPECTED
    name, _ = auto_profile_name()
    assert footer.startswith(f"this machine: {name or 'none of them'} (")


def _cpu(arch: str = "x86_64", *flags: str) -> dict:
    return {"architecture": arch, "model": "test CPU", "flags": {f: f in flags for f in FLAGS_OF_INTEREST}}


@pytest.mark.parametrize("cpu, board, expected", [
    (_cpu("x86_64", "avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"), None, "x86-avx512-vnni"),  # Xeon, AMX
    (_cpu("x86_64", "avx2", "avx512f", "avx512_vnni"), None, "x86-avx512-vnni"),  # Ice Lake, Zen 4
    (_cpu("x86_64", "avx2", "fma"), None, "x86-avx2"),  # Zen 1-3, Haswell-Skylake clients
    (_cpu("x86_64", "avx2", "avx_vnni"), None, "x86-avx2"),  # Alder Lake: its setup text names avx_vnni
    (_cpu("x86_64", "avx2", "avx512f"), None, "x86-avx2"),  # Skylake-SP: AVX-512 without VNNI
    (_cpu("x86_64"), None, None),  # no AVX2: nothing shipped fits
    (_cpu("aarch64", "asimd"), None, "arm64-cpu"),
    (_cpu("aarch64", "asimd"), "Raspberry Pi 5 Model B Rev 1.0\x00", "raspberry-pi-5"),
    (_cpu("aarch64"), "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "jetson-orin-nano"),
    (_cpu("aarch64"), "Jetson AGX Orin", "jetson-agx-orin"),
    (_cpu("aarch64"), "NVIDIA Jetson Xavier NX Developer Kit", "jetson-xavier-nx"),
    (_cpu("aarch64"), "NVIDIA Jetson Nano Developer Kit", None),  # a Jetson without a profile: not arm64-cpu
])
def test_auto_picks_the_profile_a_user_would_pick(cpu, board, expected):
    name, why = match_profile(cpu, board)
    assert name == expected, why
    if name:
        assert load_profile(name).name == name and "openvino" not in name


def test_device_auto_loads_this_machines_profile_or_says_why_not(monkeypatch, capsys):
    name, _ = auto_profile_name()
    if name:
        assert load_profile("auto").name == name
        assert main(["show", "auto"]) == 0 and capsys.readouterr().out.splitlines()[0].split() == ["name", name]
    monkeypatch.setattr("devices.match.cpu_record", lambda: _cpu("riscv64"))
    monkeypatch.setattr("devices.match.board_model", lambda: None)
    with pytest.raises(ProfileError, match="no shipped device profile fits this machine .*riscv64"):
        load_profile("auto")
    assert main(["show", "auto"]) == 2 and capsys.readouterr().err.count("\n") == 1


def test_cli_show_and_errors(capsys, tmp_path):
    assert main(["show", "jetson-xavier-nx"]) == 0
    out = capsys.readouterr().out
    assert "MODE_20W_6CORE" in out and "setup:" in out and "waveclip-edge[tensorrt]" in out
    assert main(["show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown device profile 'nope'") and err.count("\n") == 1
    assert main(["trtexec", "jetson-orin-nano", "--bundle", str(tmp_path / "missing")]) == 2
    assert "no such bundle directory" in capsys.readouterr().err
    assert main(["trtexec", "x86-avx2", "--bundle", str(fake_bundle(tmp_path))]) == 2
    assert "trtexec needs a tensorrt profile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["trtexec", "--help"])
    assert e.value.code == 0


def test_cli_unknown_profile_subprocess_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "devices", "trtexec", "nope", "--bundle", "."], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: unknown device profile")


def test_trtexec_fp16_commands(tmp_path):
    bundle = fake_bundle(tmp_path)
    profile = load_profile("jetson-orin-nano")
    script = trtexec_script(profile, bundle)
    kv1 = ",".join(f"past_key_values.{i}.{k}:1x12x50x64" for i in range(2) for k in ("key", "value"))
    kv8 = kv1.replace(":1x", ":8x")
    builds = [line for line in script.splitlines() if "--saveEngine=" in line]
    assert len(builds) == 2
    assert builds[0].startswith("/usr/src/tensorrt/bin/trtexec ")
    assert f"--onnx={bundle}/level1.onnx" in builds[1]
    assert f"--saveEngine={bundle}/tensorrt/jetson-orin-nano/level1.engine" in builds[1]
    assert f" --minShapes=patches:1x49x144,{kv1} " in builds[1]
    assert f" --maxShapes=patches:8x49x144,{kv8} " in builds[1]
    assert " --minShapes=patches:1x49x48 " in builds[0] and "past_key_values" not in builds[0]
    for b in builds:
        assert " --fp16 " in b and "--int8" not in b and "--memPoolSize=workspace:1024M" in b
    runs = [line for line in script.splitlines() if "--loadEngine=" in line]
    assert len(runs) == 4  # 2 levels x batch sizes [1, 8]
    assert all("--warmUp=500" in r and "--iterations=1000" in r and "--avgRuns=1" in r for r in runs)
    assert f"--shapes=patches:8x49x144,{kv8}" in runs[3]
    assert "sudo nvpmodel -m 1" in script and "sudo jetson_clocks" in script


def test_trtexec_on_tensorrt_11_builds_from_fp16_graphs(tmp_path):
    bundle = fake_bundle(tmp_path)
    text = GOOD.replace("opt_batch = 2", 'opt_batch = 2\nversion = "11.4"')
    script = trtexec_script(load_profile(str(write(tmp_path, text))), bundle)
    fp16 = bundle / "tensorrt" / "my-device" / "fp16"
    convert = [line for line in script.splitlines() if "runtime.backends.trt_precision" in line]
    assert convert == [f"python3 -m runtime.backends.trt_precision {bundle} {fp16}"]
    builds = [line for line in script.splitlines() if "--saveEngine=" in line]
    assert script.index(convert[0]) < script.index(builds[0])
    assert [f"--onnx={fp16}/level{k}.onnx" in b for k, b in enumerate(builds)] == [True, True]
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert not any(flag in c for c in commands for flag in ("--fp16", "--int8", "--best"))  # gone in TensorRT 11
    int8 = GOOD.replace("opt_batch = 2", 'opt_batch = 2\nversion = "11.4"').replace('"fp16"', '"int8"')
    (tmp_path / "q").mkdir()
    int8_profile = load_profile(str(write(tmp_path, int8, "int8.toml")))
    int8_script = trtexec_script(int8_profile, fake_bundle(tmp_path / "q", "int8"))
    assert "trt_precision" not in int8_script and "--int8" not in int8_script and "q/bundle/level1.onnx" in int8_script
    with pytest.raises(ProfileError, match="tensorrt.version: TensorRT version 'eleven'"):
        load_profile(str(write(tmp_path, GOOD.replace("opt_batch = 2", 'opt_batch = 2\nversion = "eleven"'))))


def test_trtexec_int8_and_dla(tmp_path):
    level = {"level": 1, "file": "level1.onnx",
             "inputs": [{"name": "patches", "shape": ["batch", 49, 144]},
                        {"name": "past_key_values.0.key", "shape": ["batch", 12, 50, 64]}]}
    agx = load_profile("jetson-agx-orin")
    cmd = build_command(agx, tmp_path, level, "int8")
    assert "--int8" in cmd and "--fp16" in cmd and not any(c.startswith("--calib") for c in cmd)
    with pytest.raises(BundleError, match="is int8 but the bundle's precision is 'fp32'"):
        build_command(agx, tmp_path, level, "fp32")
    dla_text = GOOD.replace('"GPU"', '"DLA"').replace("opt_batch = 2", "opt_batch = 2\ndla_core = 1")
    dla = load_profile(str(write(tmp_path, dla_text)))
    cmd = build_command(dla, tmp_path, level, "fp32", "trtexec")
    assert "--useDLACore=1" in cmd and "--allowGPUFallback" in cmd
    static = "patches:2x49x144,past_key_values.0.key:2x12x50x64"  # DLA: min = opt = max = opt_batch
    assert [c for c in cmd if "Shapes=" in c] == [f"--{s}Shapes={static}" for s in ("min", "opt", "max")]
    runs = run_commands(dla, tmp_path, level)
    assert len(runs) == 1 and f"--shapes={static}" in runs[0] and "--useDLACore=1" in runs[0]


def test_bad_manifest(tmp_path):
    profile = load_profile("jetson-orin-nano")
    (tmp_path / "manifest.json").write_text('{"levels": [{"level": 0, "file": "level0.onnx", '
                                            '"inputs": [{"name": "patches", "shape": ["n", 49, 48]}]}]}')
    with pytest.raises(BundleError, match=r"levels\[0\]\.inputs\[0\]"):
        trtexec_script(profile, tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="cannot read"):
        trtexec_script(profile, tmp_path)
