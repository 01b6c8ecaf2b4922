"""Device profiles: one TOML file per target under ``devices/profiles/``, loaded and validated here.

A profile names the backend, its execution provider (onnxruntime: an ONNX Runtime provider name; openvino: the
device, "CPU"/"GPU"/"NPU"/"AUTO"; tensorrt: "GPU", or "DLA" together with ``tensorrt.dla_core``), the precision the
bundle is expected in, threads, the batch sizes to time, and human setup notes. TensorRT profiles may carry a
``[tensorrt]`` table, Jetson profiles a ``[jetson]`` table with the expected power mode.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from runtime.backends import BACKENDS, EXTRA as _EXTRAS
from runtime.backends.trt_precision import tensorrt_major

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
PRECISIONS = ("fp32", "fp16", "int8")
OPENVINO_DEVICES = ("CPU", "GPU", "NPU", "AUTO")
TENSORRT_DEVICES = ("GPU", "DLA")
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class ProfileError(ValueError):
    """A profile that cannot be used. Its message is one line naming the file and the field."""


@dataclass(frozen=True)
class TensorRTSettings:
    """Engine build settings (``[tensorrt]`` table)."""

    version: str | None = None  # TensorRT version the profile was written for, e.g. "10.3"
    workspace_mib: int = 1024  # builder workspace pool (trtexec --memPoolSize=workspace:NM)
    opt_batch: int = 1  # batch the engine is tuned for; min is 1, max is max(batch_sizes)
    dla_core: int | None = None  # DLA core to build for (Xavier / AGX Orin); None = GPU


@dataclass(frozen=True)
class JetsonSettings:
    """Expected Jetson power state (``[jetson]`` table)."""

    jetpack: str  # JetPack release the profile was written for, e.g. "6.2"
    nvpmodel_id: int  # sudo nvpmodel -m ID (ids differ between modules and JetPack releases)
    nvpmodel_name: str  # the mode's NAME in /etc/nvpmodel.conf; what `nvpmodel -q` must report
    jetson_clocks: bool = True  # clocks locked with `sudo jetson_clocks` while timing


@dataclass(frozen=True)
class DeviceProfile:
    """One target device: how the runtime is configured there and how it is timed."""

    name: str
    description: str
    backend: str  # onnxruntime | openvino | tensorrt
    execution_provider: str
    precision: str  # fp32 | fp16 | int8
    threads: int  # CPU threads (intra-op); 0 = all cores
    batch_sizes: tuple[int, ...]
    iterations: int = 1000  # timed runs per measurement, after warm-up
    setup: str = ""
    tensorrt: TensorRTSettings | None = None  # set for backend "tensorrt" (defaults when the table is absent)
    jetson: JetsonSettings | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)


def required_extra(backend: str) -> str:
    """The pip extra of waveclip-edge that installs ``backend``."""
    try:
        return _EXTRAS[backend]
    except KeyError:
        raise ProfileError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})") from None


def check_backend_available(profile: DeviceProfile) -> None:
    """Raise :class:`ProfileError` when the profile's backend (or its ONNX Runtime provider) cannot be used here."""
    backend = profile.backend
    try:
        module = importlib.import_module(_MODULES[backend])
    except ImportError:
        hint = " (on Jetson: JetPack's python3-libnvinfer in a venv made with --system-site-packages)" \
            if backend == "tensorrt" else ""
        raise ProfileError(f"backend {backend!r} is not installed: "
                           f"pip install 'waveclip-edge[{required_extra(backend)}]'{hint}") from None
    if backend == "onnxruntime":
        available = module.get_available_providers()
        if profile.execution_provider not in available:
            raise ProfileError(f"{profile.name}: execution provider {profile.execution_provider!r} is not in this "
                               f"onnxruntime build (available: {', '.join(available)})")


def list_profiles(directory: str | os.PathLike = PROFILES_DIR) -> list[DeviceProfile]:
    """All profiles shipped in ``directory``, sorted by name."""
    return [load_profile(str(p)) for p in sorted(Path(directory).glob("*.toml"), key=lambda p: p.stem)]


def profile_names(directory: str | os.PathLike = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load a profile by bare name (from ``devices/profiles/``) or by path (anything with a separator or ``.toml``);
    ``auto``: the shipped profile that fits this machine (:mod:`devices.match`)."""
    s = str(name_or_path)
    if s == "auto":
        from devices.match import auto_profile_name

        name, why = auto_profile_name()
        if name is None:
            raise ProfileError(f"no shipped device profile fits this machine ({why}): name one "
                               "(python -m devices list) or give a .toml path")
        s = name
    if "/" in s or os.sep in s or s.endswith(".toml"):
        path = Path(s)
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
    else:
        path = PROFILES_DIR / f"{s}.toml"
        if not path.is_file():
            raise ProfileError(f"unknown device profile {s!r} (known: {', '.join(profile_names())})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: {' '.join(str(e).split())}") from None
    return parse_profile(data, path)


def parse_profile(data: dict[str, Any], path: str | os.PathLike | None = None) -> DeviceProfile:
    """Validate a parsed TOML table into a :class:`DeviceProfile`."""
    v = _Validator(str(path) if path is not None else "<profile>")
    v.keys(data, "", {"name", "description", "backend", "execution_provider", "precision", "threads", "batch_sizes",
                      "iterations", "setup", "tensorrt", "jetson"})
    name = v.string(data, "name")
    if not _NAME_RE.match(name):
        v.fail("name", f"{name!r} must be lowercase letters, digits and '-' (it names the engine folder)")
    backend = v.choice(data, "backend", BACKENDS)
    provider = v.string(data, "execution_provider")
    batch_sizes = data.get("batch_sizes")
    if (not isinstance(batch_sizes, list) or not batch_sizes
            or not all(_is_int(b) and b >= 1 for b in batch_sizes) or len(set(batch_sizes)) != len(batch_sizes)):
        v.fail("batch_sizes", f"expected a non-empty list of distinct integers >= 1, got {batch_sizes!r}")

    trt_table = data.get("tensorrt")
    if trt_table is not None and backend != "tensorrt":
        v.fail("tensorrt", f"only allowed with backend 'tensorrt' (backend is {backend!r})")
    tensorrt = None
    if backend == "tensorrt":
        t = v.table(data, "tensorrt")
        v.keys(t, "tensorrt.", {"version", "workspace_mib", "opt_batch", "dla_core"})
        tensorrt = TensorRTSettings(
            version=v.string(t, "version", "tensorrt.", required=False),
            workspace_mib=v.integer(t, "workspace_mib", 1, "tensorrt.", default=1024),
            opt_batch=v.integer(t, "opt_batch", 1, "tensorrt.", default=1),
            dla_core=v.integer(t, "dla_core", 0, "tensorrt.", default=None))
        if tensorrt.version is not None:
            try:
                tensorrt_major(tensorrt.version)
            except ValueError as e:
                v.fail("tensorrt.version", str(e))
        if tensorrt.opt_batch > max(batch_sizes):
            v.fail("tensorrt.opt_batch", f"{tensorrt.opt_batch} exceeds the largest batch size {max(batch_sizes)}")
        if provider not in TENSORRT_DEVICES:
            v.fail("execution_provider", f"{provider!r} is not a TensorRT device (expected GPU or DLA)")
        if (provider == "DLA") != (tensorrt.dla_core is not None):
            v.fail("execution_provider", "'DLA' and tensorrt.dla_core go together")
        if tensorrt.dla_core is not None and data.get("precision") == "fp32":
            v.fail("precision", "DLA runs fp16 or int8 only")
    elif backend == "openvino" and provider not in OPENVINO_DEVICES:
        v.fail("execution_provider", f"{provider!r} is not an OpenVINO device (expected {', '.join(OPENVINO_DEVICES)})")
    elif backend == "onnxruntime" and not provider.endswith("ExecutionProvider"):
        v.fail("execution_provider", f"{provider!r} is not an ONNX Runtime provider name (e.g. CPUExecutionProvider)")

    jetson = None
    if "jetson" in data:
        j = v.table(data, "jetson")
        v.keys(j, "jetson.", {"jetpack", "nvpmodel_id", "nvpmodel_name", "jetson_clocks"})
        clocks = j.get("jetson_clocks", True)
        if not isinstance(clocks, bool):
            v.fail("jetson.jetson_clocks", f"expected true or false, got {clocks!r}")
        jetson = JetsonSettings(jetpack=v.string(j, "jetpack", "jetson."),
                                nvpmodel_id=v.integer(j, "nvpmodel_id", 0, "jetson."),
                                nvpmodel_name=v.string(j, "nvpmodel_name", "jetson."), jetson_clocks=clocks)

    return DeviceProfile(
        name=name, description=v.string(data, "description"), backend=backend, execution_provider=provider,
        precision=v.choice(data, "precision", PRECISIONS), threads=v.integer(data, "threads", 0),
        batch_sizes=tuple(batch_sizes), iterations=v.integer(data, "iterations", 1, default=1000),
        setup=v.string(data, "setup", required=False) or "", tensorrt=tensorrt, jetson=jetson,
        path=Path(path) if path is not None else None)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Validator:
    """Field checks that raise one-line :class:`ProfileError` messages ``FILE: FIELD: reason``."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, reason: str) -> None:
        raise ProfileError(f"{self.where}: {key}: {reason}")

    def keys(self, table: dict, prefix: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.fail(prefix + key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def table(self, data: dict, key: str) -> dict:
        t = data.get(key, {})
        if not isinstance(t, dict):
            self.fail(key, f"expected a [{key}] table")
        return t

    def string(self, data: dict, key: str, prefix: str = "", required: bool = True) -> str | None:
        if key not in data:
            if required:
                self.fail(prefix + key, "missing")
            return None
        value = data[key]
        if not isinstance(value, str) or (required and not value.strip()):
            self.fail(prefix + key, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, data: dict, key: str, choices: tuple[str, ...]) -> str:
        value = self.string(data, key)
        if value not in choices:
            self.fail(key, f"unknown value {value!r} (expected one of {', '.join(choices)})")
        return value

    def integer(self, data: dict, key: str, minimum: int, prefix: str = "", default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                self.fail(prefix + key, "missing")
            return default
        value = data[key]
        if not _is_int(value) or value < minimum:
            self.fail(prefix + key, f"expected an integer >= {minimum}, got {value!r}")
        return value
