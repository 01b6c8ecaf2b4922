"""Which shipped device profile fits this machine (``--device auto``): from the board name (Jetson, Raspberry Pi),
the CPU architecture and the x86 integer-kernel flags, the ONNX Runtime or TensorRT profile a user of this machine
would pick by hand from `python -m devices list`. The ``-openvino`` twins are never chosen: name them to use them."""
from __future__ import annotations

from typing import Any

from devices.machine import board_model, cpu_record

BOARDS = (  # substring of /proc/device-tree/model -> profile; the first that matches wins
    ("Jetson AGX Orin", "jetson-agx-orin"),
    ("Orin Nano", "jetson-orin-nano"),
    ("Xavier NX", "jetson-xavier-nx"),
    ("Raspberry Pi 5", "raspberry-pi-5"),
)


def match_profile(cpu: dict[str, Any], board: str | None) -> tuple[str | None, str]:
    """(profile name or None, why) for a :func:`devices.machine.cpu_record` and the board model string."""
    board = (board or "").replace("\x00", "").strip()
    for needle, name in BOARDS:
        if needle.lower() in board.lower():
            return name, f"board {board!r}"
    if "jetson" in board.lower():
        return None, f"board {board!r} is a Jetson without a shipped profile"
    arch = cpu.get("architecture")
    model = cpu.get("model") or "this CPU"
    if arch in ("aarch64", "arm64"):
        return "arm64-cpu", f"{model}: 64-bit Arm"
    flags = cpu.get("flags") or {}
    if arch in ("x86_64", "AMD64") and (flags.get("avx512_vnni") or flags.get("amx_int8")):
        return "x86-avx512-vnni", f"{model}: AVX-512 VNNI" + (" and AMX" if flags.get("amx_int8") else "")
    if arch in ("x86_64", "AMD64") and flags.get("avx2"):
        extra = "AVX-VNNI" if flags.get("avx_vnni") else "AVX-512 without VNNI" if flags.get("avx512f") else "no VNNI"
        return "x86-avx2", f"{model}: AVX2, {extra}"
    return None, f"{model} ({arch}): no shipped profile fits its instruction sets"


def auto_profile_name() -> tuple[str | None, str]:
    """:func:`match_profile` for this machine."""
    return match_profile(cpu_record(), board_model())
