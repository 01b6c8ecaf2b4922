"""trtexec command lines to build and time one TensorRT engine per level graph of a bundle, on the device itself.

Engines go to ``BUNDLE/tensorrt/<profile>/level{k}.engine`` (never shipped). Precision flags follow trtexec of
TensorRT 8.5-10.x; a profile whose ``tensorrt.version`` is 11 or later (strongly typed: no precision flags) builds an
fp16 engine from the level graphs' fp16 copies, which the script writes first (``runtime.backends.trt_precision``).
Only ``batch`` is dynamic: the optimisation profile is batch 1 / ``tensorrt.opt_batch`` / max(``batch_sizes``).
DLA cannot run dynamic shapes, so a DLA profile builds static engines at ``opt_batch`` with GPU fallback.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from devices.profile_config import DeviceProfile, ProfileError
from runtime.backends.trt_precision import BuildPlan, build_plan, tensorrt_major
from runtime.bundle import BundleError

JETSON_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
WARMUP_MS = 500


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` and check the parts the trtexec commands need (levels, files, input shapes)."""
    bundle = Path(bundle_dir)
    path = bundle / "manifest.json"
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    if not path.is_file():
        raise BundleError(f"{bundle}: no manifest.json (not a WaveCLIP bundle)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    levels = manifest.get("levels") if isinstance(manifest, dict) else None
    if not isinstance(levels, list) or not levels:
        raise BundleError(f"{path}: levels: expected a non-empty list")
    for i, level in enumerate(levels):
        where = f"{path}: levels[{i}]"
        if not isinstance(level, dict) or not isinstance(level.get("level"), int) \
                or not isinstance(level.get("file"), str):
            raise BundleError(f"{where}: expected 'level' (int) and 'file' (str)")
        inputs = level.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise BundleError(f"{where}.inputs: expected a non-empty list")
        for j, inp in enumerate(inputs):
            shape = inp.get("shape") if isinstance(inp, dict) else None
            if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not isinstance(shape, list) \
                    or not all(d == "batch" or (isinstance(d, int) and d >= 0) for d in shape):
                raise BundleError(f"{where}.inputs[{j}]: expected 'name' and 'shape' of ints and \"batch\"")
    return manifest


def shapes_spec(inputs: list[dict[str, Any]], batch: int) -> str:
    """trtexec shape spec, e.g. ``patches:1x49x48,past_key_values.0.key:1x12x50x64``."""
    return ",".join(f"{inp['name']}:" + "x".join(str(batch if d == "batch" else d) for d in inp["shape"])
                    for inp in inputs)


def engine_path(profile: DeviceProfile, bundle_dir: str | os.PathLike, level: int) -> Path:
    return Path(bundle_dir) / "tensorrt" / profile.name / f"level{level}.engine"


def fp16_dir(profile: DeviceProfile, bundle_dir: str | os.PathLike) -> Path:
    """Where the script writes the fp16 copies of the level graphs (TensorRT 11 fp16 profiles)."""
    return Path(bundle_dir) / "tensorrt" / profile.name / "fp16"


def _plan(profile: DeviceProfile, bundle_precision: str) -> BuildPlan:
    """The profile's build plan. An int8 profile needs a QDQ bundle: ``--int8`` then takes its scales from the Q/DQ
    nodes (explicit quantization, no calibration cache); ``--fp16`` lets the unquantized layers run in fp16. A profile
    without ``tensorrt.version`` is taken as TensorRT 10."""
    bundle_int8 = bundle_precision.startswith("int8")
    if profile.precision == "int8" and not bundle_int8:
        raise BundleError(f"profile {profile.name!r} is int8 but the bundle's precision is {bundle_precision!r}: "
                          "quantize it first (QDQ int8 bundle), or use a fp16 profile")
    if profile.precision != "int8" and bundle_int8:
        raise BundleError(f"profile {profile.name!r} is {profile.precision} but the bundle is {bundle_precision!r}: "
                          "use an int8 profile or the float bundle")
    version = _tensorrt(profile).version
    return build_plan(profile.precision, tensorrt_major(version) if version else 10, bundle_precision)


def _flags(plan: BuildPlan) -> list[str]:
    """trtexec's precision flags for a build plan (none on TensorRT 11 and later)."""
    return [f"--{flag.lower()}" for flag in plan.flags]


def _tensorrt(profile: DeviceProfile):
    if profile.backend != "tensorrt" or profile.tensorrt is None:
        raise ProfileError(f"profile {profile.name!r} uses backend {profile.backend!r}; "
                           "trtexec needs a tensorrt profile")
    return profile.tensorrt


def build_command(profile: DeviceProfile, bundle_dir: str | os.PathLike, level: dict[str, Any],
                  bundle_precision: str = "fp32", trtexec: str = "trtexec") -> list[str]:
    """The trtexec build command for one level entry of the manifest."""
    trt = _tensorrt(profile)
    inputs = level["inputs"]
    lo, opt, hi = (trt.opt_batch,) * 3 if trt.dla_core is not None else (1, trt.opt_batch, profile.max_batch)
    plan = _plan(profile, bundle_precision)
    graph = fp16_dir(profile, bundle_dir) / f"level{level['level']}.onnx" if plan.fp16_graph else \
        Path(bundle_dir) / level["file"]
    cmd = [trtexec, f"--onnx={graph}",
           f"--saveEngine={engine_path(profile, bundle_dir, level['level'])}",
           f"--minShapes={shapes_spec(inputs, lo)}", f"--optShapes={shapes_spec(inputs, opt)}",
           f"--maxShapes={shapes_spec(inputs, hi)}", *_flags(plan),
           f"--memPoolSize=workspace:{trt.workspace_mib}M"]
    if trt.dla_core is not None:
        cmd += [f"--useDLACore={trt.dla_core}", "--allowGPUFallback"]
    return cmd + ["--skipInference"]


def run_commands(profile: DeviceProfile, bundle_dir: str | os.PathLike, level: dict[str, Any],
                 trtexec: str = "trtexec") -> list[list[str]]:
    """trtexec timing commands for one level, one per batch size the engine accepts."""
    trt = _tensorrt(profile)
    k = level["level"]
    engine = engine_path(profile, bundle_dir, k)
    batches = [trt.opt_batch] if trt.dla_core is not None else list(profile.batch_sizes)
    cmds = []
    for b in batches:
        cmd = [trtexec, f"--loadEngine={engine}", f"--shapes={shapes_spec(level['inputs'], b)}",
               f"--warmUp={WARMUP_MS}", f"--iterations={profile.iterations}", "--avgRuns=1",
               f"--exportTimes={engine.parent / f'level{k}.b{b}.times.json'}"]
        if trt.dla_core is not None:
            cmd.append(f"--useDLACore={trt.dla_core}")
        cmds.append(cmd)
    return cmds


def trtexec_script(profile: DeviceProfile, bundle_dir: str | os.PathLike, trtexec: str | None = None) -> str:
    """A shell script (setup, builds, timing runs) for every level of the bundle on this profile's device."""
    trt = _tensorrt(profile)
    manifest = read_manifest(bundle_dir)
    precision = str(manifest.get("precision", "fp32"))
    exe = trtexec or (JETSON_TRTEXEC if profile.jetson else "trtexec")
    plan = _plan(profile, precision)
    flags = " ".join(_flags(plan)) or ("fp16 copies of the level graphs" if plan.fp16_graph else "no precision flags")
    levels = sorted(manifest["levels"], key=lambda lv: lv["level"])
    q = shlex.join
    lines = [f"# WaveCLIP: TensorRT engines for bundle {bundle_dir} on {profile.name} ({profile.description})",
             f"# bundle precision {precision} -> {flags}; run these on the device itself (engines are not portable)"]
    expected = [s for s in (profile.jetson and f"JetPack {profile.jetson.jetpack}",
                            trt.version and f"TensorRT {trt.version}") if s]
    if expected:
        lines.append(f"# expected: {', '.join(expected)}")
    if trt.dla_core is not None:
        lines.append(f"# DLA core {trt.dla_core}: static shapes at batch {trt.opt_batch} "
                     "(DLA has no dynamic shapes); unsupported layers fall back to the GPU")
    if profile.jetson:
        j = profile.jetson
        lines += ["", "# 1. power mode and clocks (ids differ between JetPack releases: check the name)",
                  f"sudo nvpmodel -m {j.nvpmodel_id}  # {j.nvpmodel_name}"]
        if j.jetson_clocks:
            lines.append("sudo jetson_clocks")
        lines.append(f"sudo nvpmodel -q  # must report: {j.nvpmodel_name}")
    lines += ["", "# 2. build one engine per level",
              q(["mkdir", "-p", str(engine_path(profile, bundle_dir, 0).parent)])]
    if plan.fp16_graph:
        lines += ["# TensorRT 11 has no --fp16: the engines are built from fp16 copies of the level graphs "
                  "(needs waveclip-edge[tensorrt] here)",
                  q(["python3", "-m", "runtime.backends.trt_precision", str(bundle_dir),
                     str(fp16_dir(profile, bundle_dir))])]
    lines += [q(build_command(profile, bundle_dir, lv, precision, exe)) for lv in levels]
    lines += ["", f"# 3. time each level: {WARMUP_MS} ms warm-up, {profile.iterations} iterations, "
              "--avgRuns=1 so percentiles are over single runs; per-run times in *.times.json",
              "# (level k runs only for images still undecided after level k-1: end-to-end = sum of levels run)"]
    lines += [q(cmd) for lv in levels for cmd in run_commands(profile, bundle_dir, lv, exe)]
    return "\n".join(lines) + "\n"
