"""The machine record that goes with every measurement: CPU, its flags of interest, cores, OS, library versions, and
on Jetson the power mode, clock lock and a short power sample.

Everything here is best-effort: a field that cannot be read is ``None`` (or absent from a sub-record), never an
exception. Nothing here imports a runtime: versions come from package metadata.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

# CPU flags that decide which kernels a runtime can use (x86: /proc/cpuinfo "flags"; Arm: "Features").
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                     "amx_bf16", "neon", "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve")
# distribution names to try, in order, for each library
PACKAGES = {"numpy": ("numpy",),
            "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
            "openvino": ("openvino",),
            "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs"),
            "torch": ("torch",)}
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def _safe(fn: Callable[[], Any], default: Any = None) -> Any:
    try:
        return fn()
    except Exception:  # best-effort by contract
        return default


def _read(path: str | os.PathLike) -> str | None:
    return _safe(lambda: Path(path).read_text(errors="replace").replace("\x00", "").strip())


def _command(args: list[str], timeout: float = 5.0) -> str | None:
    """stdout+stderr of a command, or None when it is missing, fails to start or times out."""
    if shutil.which(args[0]) is None:
        return None

    def run() -> str:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip()
    return _safe(run)


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model, flags and physical/logical counts from the text of /proc/cpuinfo (x86 or Arm)."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    entries = []
    for b in blocks:
        d: dict[str, str] = {}
        for line in b.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                d.setdefault(k.strip(), v.strip())
        entries.append(d)
    procs = [e for e in entries if "processor" in e]
    first = procs[0] if procs else (entries[0] if entries else {})
    model = first.get("model name") or first.get("Model") or first.get("cpu model") or first.get("Hardware")
    if model is None:
        extra = next((e for e in entries if "Model" in e or "Hardware" in e), {})
        model = extra.get("Model") or extra.get("Hardware")
    if model is None and "CPU part" in first:
        model = f"Arm implementer {first.get('CPU implementer')} part {first.get('CPU part')}"
    flags = set((first.get("flags") or first.get("Features") or "").split())
    cores = {(e.get("physical id", "0"), e["core id"]) for e in procs if "core id" in e}
    keys = (("vendor", "vendor_id"), ("family", "cpu family"), ("model_number", "model"), ("stepping", "stepping"),
            ("implementer", "CPU implementer"), ("part", "CPU part"))
    ident = {k: first[src] for k, src in keys if first.get(src)}
    return {"model": model, "flags": sorted(flags), "logical": len(procs) or None, "physical": len(cores) or None,
            "id": ident}


def cpu_record() -> dict[str, Any]:
    info = parse_cpuinfo(_read("/proc/cpuinfo") or "")
    model = info["model"] or platform.processor() or None
    flags = set(info["flags"])
    logical = os.cpu_count()
    physical = info["physical"]
    if physical is None:  # Arm cpuinfo has no core ids: count distinct sysfs core_cpus lists
        sib = {_read(p) for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/core_cpus_list")}
        physical = len(sib - {None}) or None
    usable = _safe(lambda: len(os.sched_getaffinity(0)), logical)
    record = {
        "model": model, "architecture": platform.machine(), "id": info["id"],
        "physical_cores": physical, "logical_cores": logical, "usable_cpus": usable,
        "flags": {f: f in flags for f in FLAGS_OF_INTEREST},
        # ISA summary, e.g. ["avx2", "avx512f", "avx512_vnni", "amx"]
        "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "asimd", "asimddp", "i8mm", "sve")
                if f in flags] + (["amx"] if any(f.startswith("amx") for f in flags) else []),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "max_mhz": _safe(lambda: int(_read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")) / 1000),
    }
    no_turbo = _read("/sys/devices/system/cpu/intel_pstate/no_turbo")
    boost = _read("/sys/devices/system/cpu/cpufreq/boost")
    record["turbo"] = (no_turbo == "0") if no_turbo in ("0", "1") else (boost == "1") if boost in ("0", "1") else None
    return record


def int8_kernel_kind(cpu: dict[str, Any] | None = None) -> str | None:
    """Which integer kernels ONNX Runtime's CPU provider runs u8 x s8 MatMuls with on this CPU (``cpu``: a
    :func:`cpu_record`): "vnni" (x86 with AVX512-VNNI, AVX-VNNI or AMX: exact int32 dot products), "avx2" (x86 with
    AVX2 but neither VNNI nor AVX-512: 16-bit pair sums, which can saturate), None for any other CPU. int8 answers
    agree only within one kind: the shipped int8 bundle's recorded answers are kept per kind."""
    cpu = cpu or cpu_record()
    flags = cpu["flags"]
    if cpu["architecture"] not in ("x86_64", "AMD64"):
        return None
    if flags["avx512_vnni"] or flags["avx_vnni"] or flags["amx_int8"]:
        return "vnni"
    return "avx2" if flags["avx2"] and not flags["avx512f"] else None


def package_version(name: str) -> str | None:
    """Installed version of a library by its distribution name(s); falls back to ``module.__version__`` only when
    metadata is absent (JetPack installs tensorrt as a system package)."""
    for dist in PACKAGES.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        except Exception:
            break
    module = sys.modules.get(name)
    if module is None and name == "tensorrt":
        import importlib.util

        if _safe(lambda: importlib.util.find_spec(name)) is not None:
            module = _safe(lambda: __import__(name))
    return getattr(module, "__version__", None) if module is not None else None


def os_record() -> dict[str, Any]:
    release = _read("/etc/os-release") or ""
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', release, re.M)
    return {"system": platform.system(), "release": platform.release(), "platform": platform.platform(),
            "distribution": pretty.group(1) if pretty else None}


_POWER_RE = re.compile(r"\b([A-Z][A-Z0-9_]+)\s+(\d+)mW/(\d+)mW")


def tegrastats_sample(seconds: float = 1.0, interval_ms: int = 250) -> dict[str, Any] | None:
    """A short ``tegrastats`` sample: the last line and its power rails (mW, instantaneous/average)."""
    exe = shutil.which("tegrastats")
    if exe is None:
        return None

    def sample() -> dict[str, Any] | None:
        p = subprocess.Popen([exe, "--interval", str(interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        try:
            time.sleep(seconds)
        finally:
            p.terminate()
            try:
                out, _ = p.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
        lines = [ln for ln in out.splitlines() if ln.strip()]
        if not lines:
            return None
        rails = {m.group(1): {"mw": int(m.group(2)), "avg_mw": int(m.group(3))} for m in _POWER_RE.finditer(lines[-1])}
        return {"line": lines[-1], "power_mw": rails, "samples": len(lines), "seconds": seconds}
    return _safe(sample)


def board_model() -> str | None:
    """The board's model string on Arm boards (Jetson, Raspberry Pi), from the device tree; None elsewhere."""
    return _read("/proc/device-tree/model") or None


def jetson_record(power_sample: bool = True) -> dict[str, Any] | None:
    """nvpmodel mode, jetson_clocks state and a tegrastats sample; None when not a Jetson."""
    if not TEGRA_RELEASE.exists():
        return None
    nvp = _command(["nvpmodel", "-q"])
    mode = re.search(r"NV Power Mode:\s*(\S+)", nvp or "")
    mode_id = re.search(r"^\s*(\d+)\s*$", nvp or "", re.M)
    clocks = _command(["jetson_clocks", "--show"])
    record: dict[str, Any] = {
        "tegra_release": (_read(TEGRA_RELEASE) or "").splitlines()[0] if _read(TEGRA_RELEASE) else None,
        "board": board_model(),
        "nvpmodel": {"mode": mode.group(1) if mode else None, "id": int(mode_id.group(1)) if mode_id else None,
                     "output": nvp},
        "jetson_clocks": {"output": clocks, "locked": _clocks_locked(clocks)},
    }
    if power_sample:
        record["tegrastats"] = tegrastats_sample()
    return record


def _clocks_locked(show: str | None) -> bool | None:
    """From ``jetson_clocks --show``: every CPU line has MinFreq == MaxFreq == CurrentFreq (None when unreadable)."""
    if not show:
        return None
    cpus = re.findall(r"MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)", show)
    if not cpus:
        return None
    return all(a == b == c for a, b, c in cpus)


def machine_record(threads: int | None = None, power_sample: bool = True) -> dict[str, Any]:
    """Everything known about this machine, for the report. ``threads``: the intra-op threads the run used."""
    return {
        "hostname": _safe(platform.node),
        "cpu": _safe(cpu_record, {}),
        "threads_used": threads,
        "load_average": _safe(lambda: [round(x, 2) for x in os.getloadavg()]),  # 1, 5, 15 min: other work running
        "os": _safe(os_record, {}),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "versions": {name: _safe(lambda n=name: package_version(n)) for name in PACKAGES},
        "jetson": _safe(lambda: jetson_record(power_sample)),
    }


def describe(record: dict[str, Any]) -> str:
    """One line: CPU, cores, ISA, OS, threads."""
    cpu = record.get("cpu") or {}
    isa = ", ".join(cpu.get("isa") or []) or "-"
    system = record.get("os") or {}
    line = (f"{cpu.get('model') or 'unknown CPU'} ({cpu.get('physical_cores') or '?'} cores / "
            f"{cpu.get('logical_cores') or '?'} threads; {isa}); {system.get('distribution') or system.get('platform')}"
            f"; Python {record.get('python')}; threads used: {record.get('threads_used') or 'all'}")
    j = record.get("jetson")
    if j:
        line += f"; Jetson nvpmodel {j['nvpmodel']['mode']}, clocks locked: {j['jetson_clocks']['locked']}"
    return line
